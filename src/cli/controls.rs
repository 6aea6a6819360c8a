//! What `consume` and `work` share around their run: METRICS_ADDR (a
//! Prometheus endpoint) and IDLE_TIMEOUT, with the kill switch's watch.

use optimus::Endpoint;
use optimus::control::Activity;
use optimus::settings::{ConfigError, parse_idle_timeout, parse_metrics_addr};
use tokio_util::sync::CancellationToken;

use super::Exit;

/// METRICS_ADDR and IDLE_TIMEOUT, checked.
pub struct Controls {
    metrics_addr: Option<std::net::SocketAddr>,
    idle_timeout: Option<std::time::Duration>,
}

impl Controls {
    pub fn parse(
        metrics_addr: &Option<String>,
        idle_timeout: &Option<String>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            metrics_addr: parse_metrics_addr(metrics_addr.as_deref())?,
            idle_timeout: parse_idle_timeout(idle_timeout.as_deref())?,
        })
    }

    /// Watches the kill switch and, with IDLE_TIMEOUT, the `activity` count;
    /// with METRICS_ADDR, serves the `registry` and the probes (`link` tells
    /// `/readyz` whether Redis is reached). An address that cannot be
    /// listened on is a bad setting.
    pub async fn start(
        self,
        endpoint: &Endpoint,
        activity: impl Fn() -> Activity + Send + 'static,
        registry: impl FnOnce() -> prometheus_client::registry::Registry,
        link: impl Fn() -> optimus::monitor::Link + Send + Sync + 'static,
        shutdown: &CancellationToken,
    ) -> Result<(), Exit> {
        tokio::spawn(optimus::control::watch(
            endpoint.clone(),
            activity,
            self.idle_timeout,
            shutdown.clone(),
        ));
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        let ready = std::sync::Arc::new(move || link().ready());
        match optimus::metrics::serve(addr, registry(), ready, shutdown.clone()).await {
            Ok(_) => {
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
                Ok(())
            }
            Err(err) => Err(Exit::Refused(format!(
                "invalid METRICS_ADDR=\"{addr}\": cannot listen there: {err}"
            ))),
        }
    }
}
