//! `optimus ctl`: the control plane (kill switch, scale, strategy handoff,
//! status).

use clap::Subcommand;
use optimus::control;

use super::Exit;
use super::connect::ConnectArgs;

#[derive(Subcommand)]
pub enum CtlAction {
    /// Set the kill switch: every consume and work process stops gracefully.
    Stop,
    /// Clear the kill switch: processes can run again (start them again).
    Resume,
    /// Set the total number of bridge workers, split across the live consume
    /// processes (the remainder spread); they start and stop workers within
    /// a second or two. `--off` goes back to each process's CONSUMERS_COUNT.
    ///
    /// 0 stops every bridge worker on every host, so it needs --yes.
    #[command(group(clap::ArgGroup::new("total").required(true).args(["workers", "off"])))]
    #[command(allow_negative_numbers = true)]
    Scale {
        workers: Option<String>,
        #[arg(long)]
        off: bool,
        /// Confirms a total of 0.
        #[arg(long)]
        yes: bool,
    },
    /// Change the strategy of a running pool without losing or duplicating
    /// a message: start processes of the new strategy after this, and stop
    /// the old ones once the new ones have taken the handoff mark (see the
    /// "Changing the strategy" in docs/protocol.md).
    Strategy {
        /// The strategy to hand the pool to.
        #[arg(value_parser = super::strategy_parser())]
        strategy: optimus::Strategy,
        /// The pool's stream (its bookkeeping keys are named after it).
        #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
        stream: String,
    },
    /// The kill switch, the total set with `ctl scale`, and the live consume
    /// and work processes: host, pid, workers, and the rate of each (messages
    /// written or entries handled per second over its last monitoring
    /// interval).
    Status {
        /// The work processes' WORK_CONSUMERS_LIST.
        #[arg(long, env = "WORK_CONSUMERS_LIST", default_value = "work:ids")]
        work_consumers_list: String,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// Carries out the action and prints what it did.
pub async fn run(connect: &ConnectArgs, action: CtlAction) -> Result<(), Exit> {
    let endpoint = connect.endpoint()?;
    let server = endpoint.to_string();
    // `ctl scale`'s total, checked before anything is changed.
    let total = match &action {
        CtlAction::Scale { workers, yes, .. } => control::parse_total(workers.as_deref(), *yes)?,
        _ => None,
    };
    let text = act(&endpoint, action, total)
        .await
        .map_err(|err| Exit::redis(&server, &err))?;
    println!("{text}");
    Ok(())
}

async fn act(
    endpoint: &optimus::Endpoint,
    action: CtlAction,
    total: Option<usize>,
) -> Result<String, redis::RedisError> {
    let mut conn = optimus::connect::open(endpoint).await?;
    match action {
        CtlAction::Status {
            work_consumers_list,
            json,
        } => {
            let status =
                control::status(&mut conn, &work_consumers_list, endpoint.is_cluster()).await?;
            Ok(match json {
                true => serde_json::to_string(&status).expect("plain data"),
                false => status.to_string(),
            })
        }
        CtlAction::Stop => {
            let who = format!("{}:{}", optimus::host_name(), std::process::id());
            control::stop(&mut conn, &who).await?;
            Ok(format!(
                "kill switch set ({}): every consume and work process stops within seconds",
                control::STOP_KEY
            ))
        }
        CtlAction::Scale { .. } => {
            control::set_scale(&mut conn, total).await?;
            Ok(match total {
                Some(0) => "total bridge workers set to 0: no consume process bridges anything now (ctl scale N or --off to resume)".to_string(),
                Some(n) => format!("total bridge workers set to {n}: the consume processes share them"),
                None => "total cleared: each consume process runs its CONSUMERS_COUNT".to_string(),
            })
        }
        CtlAction::Strategy { strategy, stream } => {
            let db = endpoint.info().map_or(0, |info| info.redis_settings().db());
            let pool = optimus::Pool::in_db(&stream, db);
            optimus::hand_over(&mut conn, &pool, strategy).await
        }
        CtlAction::Resume => Ok(if control::resume(&mut conn).await? {
            "kill switch cleared: processes may run again".to_string()
        } else {
            "kill switch was not set".to_string()
        }),
    }
}
