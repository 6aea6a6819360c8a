//! What `optimus bench` reports: its rows, the delivery core's targets held
//! against them, and the table and SVG chart they are shown as.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct BridgeRow {
    pub strategy: &'static str,
    pub workers: usize,
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    /// `rate` over the ceiling (pipelined XADD, no bridge).
    pub of_ceiling: f64,
    pub commands_per_message: f64,
    pub cpu_us_per_message: f64,
    pub peak_rss_mib: f64,
    /// Redis memory the protocol keeps per message beyond the stream entry.
    pub redis_bytes_per_message: f64,
    /// Entries that stand before one published earlier.
    pub out_of_order: u64,
    pub lost: u64,
    pub duplicates: u64,
}

impl BridgeRow {
    /// Lost or duplicated messages, or (for a strategy that keeps order)
    /// entries out of order.
    pub fn failed(&self) -> bool {
        self.lost + self.duplicates > 0 || (self.strategy != "race" && self.out_of_order > 0)
    }
}

/// A burst bridged by a pool of processes (fenced, default settings: the
/// writer and STANDBYS=2 standbys read every message, the other processes
/// wait), or with every process reading (STANDBYS=all).
#[derive(Debug, Clone, Serialize)]
pub struct ProcessesRow {
    pub processes: usize,
    /// The setting that differs from the defaults ("" for none).
    pub setting: String,
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    pub of_ceiling: f64,
    /// Redis's CPU (INFO used_cpu_sys + used_cpu_user) over the row, per
    /// message.
    pub redis_cpu_us_per_message: f64,
    /// The processes' CPU together, per message.
    pub bridge_cpu_us_per_message: f64,
    pub out_of_order: u64,
    pub lost: u64,
    pub duplicates: u64,
}

impl ProcessesRow {
    /// Lost, duplicated or out-of-order messages.
    pub fn failed(&self) -> bool {
        self.lost + self.duplicates + self.out_of_order > 0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    pub strategy: &'static str,
    pub workers: usize,
    pub rate: u64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub lost: u64,
    pub duplicates: u64,
}

/// The bridge at a steady rate: does it keep up, and in how much memory.
#[derive(Debug, Clone, Serialize)]
pub struct SteadyRow {
    pub strategy: &'static str,
    pub workers: usize,
    pub target_rate: u64,
    /// Messages bridged per second over the run (publish start to last entry).
    pub rate: f64,
    pub messages: u64,
    pub cpu_us_per_message: f64,
    pub peak_rss_mib: f64,
    pub lost: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub redis_version: String,
    pub payload_bytes: usize,
    pub ceiling_rate: f64,
    pub publisher_rate: f64,
    pub redis_cli_pipe_rate: f64,
    pub bridge: Vec<BridgeRow>,
    /// The fenced 2-worker burst with DEDUP_WINDOW=0: the default window's
    /// cost is the difference.
    pub dedup_off: Option<BridgeRow>,
    /// The fenced 2-worker burst on a server with one replica, without and
    /// with MIN_REPLICAS_ACKED=1: the setting's cost is the difference.
    pub replica_rows: Option<[BridgeRow; 2]>,
    /// The fenced 2-worker latency on that server, without and with
    /// MIN_REPLICAS_ACKED=1.
    pub replica_latency: Option<[LatencyRow; 2]>,
    pub processes: Vec<ProcessesRow>,
    pub latency: Vec<LatencyRow>,
    pub steady: Vec<SteadyRow>,
    /// The delivery core's targets, against this run (fenced rows).
    pub targets: Vec<Target>,
}

/// One of the delivery core's targets, and what this run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// The targets the fenced rows of `report` can be held against (those whose
/// rows were measured): every burst row exact and in order, 2 workers at
/// 200,000/s, 8 workers at 0.8 of 2, CPU per message flat with workers
/// (the most at most 1.5 times the least), p99 at most 2 ms, at most 16
/// bytes per message in Redis beside the stream.
pub fn targets(report: &Report) -> Vec<Target> {
    let rows: Vec<&BridgeRow> = report
        .bridge
        .iter()
        .filter(|r| r.strategy == "fenced")
        .collect();
    let mut out = Vec::new();
    let mut add = |target: &str, measured: String, met: bool| {
        out.push(Target {
            target: target.to_string(),
            measured,
            met,
        })
    };
    if rows.is_empty() {
        return processes_target(report, out);
    }
    let bad: u64 = rows
        .iter()
        .map(|r| r.lost + r.duplicates + r.out_of_order)
        .sum();
    add(
        "every burst: 0 lost, 0 twice, 0 out of order",
        format!("{bad} in {} rows", rows.len()),
        bad == 0,
    );
    let at = |n: usize| rows.iter().find(|r| r.workers == n);
    if let Some(two) = at(2) {
        add(
            "2 workers: at least 200,000 messages/s",
            format!("{:.0}/s ({:.2} of the ceiling)", two.rate, two.of_ceiling),
            two.rate >= 200_000.0,
        );
        if let Some(eight) = at(8) {
            let ratio = eight.rate / two.rate;
            add(
                "8 workers: at least 0.8 of 2 workers",
                format!("{:.0}/s = {ratio:.2}", eight.rate),
                ratio >= 0.8,
            );
        }
    }
    let cpu: Vec<f64> = rows.iter().map(|r| r.cpu_us_per_message).collect();
    let (least, most) = cpu
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
    if rows.len() > 1 {
        add(
            "CPU per message flat with workers (most at most 1.5 x least)",
            format!("{least:.1} to {most:.1} µs"),
            most <= least * 1.5,
        );
    }
    if let Some(l) = report.latency.iter().find(|l| l.strategy == "fenced") {
        add(
            "p99 at a steady 10,000/s: at most 2 ms",
            format!("{:.1} ms (at {}/s)", l.p99_ms, l.rate),
            l.p99_ms <= 2.0,
        );
    }
    let bytes = rows
        .iter()
        .map(|r| r.redis_bytes_per_message)
        .fold(0.0f64, f64::max);
    add(
        "Redis memory beside the stream: at most 16 B per message",
        format!("{bytes:.1} B at most"),
        bytes <= 16.0,
    );
    processes_target(report, out)
}

/// The pools of processes' target, after `out`: Redis's CPU per message
/// with 8 processes against 2 (default settings).
fn processes_target(report: &Report, mut out: Vec<Target>) -> Vec<Target> {
    let pool = |n: usize| {
        report
            .processes
            .iter()
            .find(|r| r.processes == n && r.setting.is_empty())
    };
    if let (Some(two), Some(eight)) = (pool(2), pool(8)) {
        let ratio = eight.redis_cpu_us_per_message / two.redis_cpu_us_per_message.max(1e-9);
        out.push(Target {
            target: "Redis CPU per message, 8 processes: at most 1.5 x 2 processes".to_string(),
            measured: format!(
                "{:.1} µs and {:.1} µs = {ratio:.2}",
                eight.redis_cpu_us_per_message, two.redis_cpu_us_per_message
            ),
            met: ratio <= 1.5,
        });
    }
    out
}

impl Report {
    /// Rows with lost or duplicated messages: failures, not results.
    pub fn failures(&self) -> usize {
        self.bridge
            .iter()
            .chain(self.dedup_off.iter())
            .chain(self.replica_rows.iter().flatten())
            .filter(|r| r.failed())
            .count()
            + self
                .latency
                .iter()
                .chain(self.replica_latency.iter().flatten())
                .filter(|r| r.lost + r.duplicates > 0)
                .count()
            + self
                .steady
                .iter()
                .filter(|r| r.lost + r.duplicates > 0)
                .count()
            + self.processes.iter().filter(|r| r.failed()).count()
    }
}

/// The results as a Markdown table.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "machine: {}; redis {}; payload {} bytes\n\n",
        report.machine, report.redis_version, report.payload_bytes
    );
    out += &format!(
        "ceiling (pipelined XADD): {:.0}/s; optimus publish: {:.0}/s = {:.2} of redis-cli --pipe ({:.0}/s)\n\n",
        report.ceiling_rate,
        report.publisher_rate,
        report.publisher_rate / report.redis_cli_pipe_rate,
        report.redis_cli_pipe_rate
    );
    out += &bridge_table(report);
    out += &dedup_table(report);
    if let Some([off, on]) = &report.replica_rows {
        out += &setting_table(
            "fenced, 2 workers, 1 replica",
            &[
                ("MIN_REPLICAS_ACKED=0 (default)", off),
                ("MIN_REPLICAS_ACKED=1", on),
            ],
        );
    }
    out += &processes_table(report);
    let rows = report.latency.iter().map(|l| (l.strategy.to_string(), l));
    out += &latency_table(rows.collect());
    if let Some([off, on]) = &report.replica_latency {
        out += &latency_table(vec![
            (
                "fenced, 1 replica, MIN_REPLICAS_ACKED=0 (default)".into(),
                off,
            ),
            ("fenced, 1 replica, MIN_REPLICAS_ACKED=1".into(), on),
        ]);
    }
    out += &steady_table(report);
    out += &targets_table("target (fenced)", &report.targets);
    out
}

/// The burst rows.
fn bridge_table(report: &Report) -> String {
    let mut out = String::new();
    let failed = |failed: bool| if failed { " FAILED" } else { "" };
    out += &markdown(
        &[
            "strategy",
            "workers",
            "messages/s",
            "of ceiling",
            "commands/msg",
            "CPU µs/msg",
            "peak RSS MiB",
            "Redis B/msg",
            "out of order",
            "lost",
            "duplicates",
        ],
        report.bridge.iter().map(|r| {
            vec![
                r.strategy.to_string(),
                r.workers.to_string(),
                format!("{:.0}", r.rate),
                format!("{:.2}", r.of_ceiling),
                format!("{:.2}", r.commands_per_message),
                format!("{:.1}", r.cpu_us_per_message),
                format!("{:.1}", r.peak_rss_mib),
                format!("{:.1}", r.redis_bytes_per_message),
                r.out_of_order.to_string(),
                r.lost.to_string(),
                format!("{}{}", r.duplicates, failed(r.failed())),
            ]
        }),
    );
    out
}

/// What DEDUP_WINDOW costs (fenced, 2 workers).
fn dedup_table(report: &Report) -> String {
    match (
        &report.dedup_off,
        report
            .bridge
            .iter()
            .find(|r| r.strategy == "fenced" && r.workers == 2),
    ) {
        (Some(off), Some(on)) => setting_table(
            "fenced, 2 workers",
            &[("DEDUP_WINDOW=5 (default)", on), ("DEDUP_WINDOW=0", off)],
        ),
        _ => String::new(),
    }
}

/// Rows of one burst under settings that differ in one: what it costs.
fn setting_table(title: &str, rows: &[(&str, &BridgeRow)]) -> String {
    let failed = |failed: bool| if failed { " FAILED" } else { "" };
    let mut out = String::from("\n");
    out += &markdown(
        &[
            title,
            "messages/s",
            "CPU µs/msg",
            "peak RSS MiB",
            "lost",
            "duplicates",
        ],
        rows.iter().map(|(name, r)| {
            vec![
                name.to_string(),
                format!("{:.0}", r.rate),
                format!("{:.1}", r.cpu_us_per_message),
                format!("{:.1}", r.peak_rss_mib),
                r.lost.to_string(),
                format!("{}{}", r.duplicates, failed(r.failed())),
            ]
        }),
    );
    out
}

/// The pools of processes.
fn processes_table(report: &Report) -> String {
    let mut out = String::new();
    let failed = |failed: bool| if failed { " FAILED" } else { "" };
    if !report.processes.is_empty() {
        out += "\n";
        out += &markdown(
            &[
                "fenced pool",
                "messages/s",
                "of ceiling",
                "Redis CPU µs/msg",
                "bridges' CPU µs/msg",
                "out of order",
                "lost",
                "duplicates",
            ],
            report.processes.iter().map(|r| {
                let setting = match r.setting.as_str() {
                    "" => String::new(),
                    setting => format!(", {setting}"),
                };
                vec![
                    format!("{} processes{setting}", r.processes),
                    format!("{:.0}", r.rate),
                    format!("{:.2}", r.of_ceiling),
                    format!("{:.1}", r.redis_cpu_us_per_message),
                    format!("{:.1}", r.bridge_cpu_us_per_message),
                    r.out_of_order.to_string(),
                    r.lost.to_string(),
                    format!("{}{}", r.duplicates, failed(r.failed())),
                ]
            }),
        );
    }
    out
}

/// Latency at a steady rate, each row with its label.
fn latency_table(rows: Vec<(String, &LatencyRow)>) -> String {
    let mut out = String::new();
    out += "\n";
    out += &markdown(
        &[
            "strategy",
            "latency at",
            "workers",
            "samples",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "lost",
            "duplicates",
        ],
        rows.into_iter().map(|(label, l)| {
            vec![
                label,
                format!("{}/s", l.rate),
                l.workers.to_string(),
                l.samples.to_string(),
                format!("{:.1}", l.p50_ms),
                format!("{:.1}", l.p99_ms),
                format!("{:.1}", l.p999_ms),
                l.lost.to_string(),
                l.duplicates.to_string(),
            ]
        }),
    );
    out
}

/// A steady rate held.
fn steady_table(report: &Report) -> String {
    let mut out = String::new();
    if !report.steady.is_empty() {
        out += "\n";
        out += &markdown(
            &[
                "strategy",
                "steady at",
                "workers",
                "achieved/s",
                "CPU µs/msg",
                "peak RSS MiB",
                "lost",
                "duplicates",
            ],
            report.steady.iter().map(|r| {
                vec![
                    r.strategy.to_string(),
                    format!("{}/s", r.target_rate),
                    r.workers.to_string(),
                    format!("{:.0}", r.rate),
                    format!("{:.1}", r.cpu_us_per_message),
                    format!("{:.1}", r.peak_rss_mib),
                    r.lost.to_string(),
                    r.duplicates.to_string(),
                ]
            }),
        );
    }
    out
}

/// The targets, met or not, under `title`.
pub(super) fn targets_table(title: &str, targets: &[Target]) -> String {
    let mut out = String::new();
    if !targets.is_empty() {
        out += "\n";
        out += &markdown(
            &[title, "this run", ""],
            targets.iter().map(|t| {
                let met = if t.met { "met" } else { "NOT MET" };
                vec![t.target.clone(), t.measured.clone(), met.to_string()]
            }),
        );
    }
    out
}

/// A Markdown table: the header, its rule, and a line per row.
pub(super) fn markdown(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        headers.join(" | "),
        "---|".repeat(headers.len())
    );
    for row in rows {
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

/// Throughput against workers, with the ceiling as a dashed line.
pub fn svg(report: &Report) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 70.0, 50.0, 30.0, 20.0);
    let max = report
        .bridge
        .iter()
        .map(|r| r.rate)
        .fold(report.ceiling_rate, f64::max)
        * 1.1;
    let workers: Vec<usize> = report.bridge.iter().map(|r| r.workers).collect();
    let max_w = workers.iter().copied().max().unwrap_or(1).max(2) as f64;
    let x = |n: usize| left + (n as f64).log2() / max_w.log2() * (w - left - right);
    let y = |v: f64| h - bottom - v / max * (h - bottom - top);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">optimus bridge throughput (messages/s)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
"#,
        w / 2.0,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}k</text>\n",
            left - 6.0,
            y(v) + 4.0,
            v / 1000.0
        );
    }
    for &n in &workers {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
            x(n),
            h - bottom + 18.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">workers</text>\n",
        (left + w - right) / 2.0,
        h - 10.0
    );
    s += &format!(
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"gray\" stroke-dasharray=\"6 4\"/>\n<text x=\"{1}\" y=\"{2}\" text-anchor=\"end\" fill=\"gray\">ceiling (pipelined XADD) {3:.0}/s</text>\n",
        y(report.ceiling_rate),
        w - right,
        y(report.ceiling_rate) - 6.0,
        report.ceiling_rate
    );
    let mut strategies: Vec<&str> = report.bridge.iter().map(|r| r.strategy).collect();
    strategies.dedup();
    for (i, strategy) in strategies.iter().enumerate() {
        let color = ["steelblue", "darkorange", "seagreen"][i % 3];
        let rows: Vec<&BridgeRow> = report
            .bridge
            .iter()
            .filter(|r| r.strategy == *strategy)
            .collect();
        let points: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.workers), y(r.rate)))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            points.join(" ")
        );
        for r in rows {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>\n",
                x(r.workers),
                y(r.rate),
                x(r.workers),
                // The first line's labels above its points, the others' below.
                if i == 0 {
                    y(r.rate) - 8.0
                } else {
                    y(r.rate) + 18.0
                },
                r.rate
            );
        }
        let ly = top + 40.0 + 16.0 * i as f64;
        s += &format!(
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{2}\" y=\"{3}\">{strategy}</text>\n",
            w - right - 140.0,
            w - right - 120.0,
            w - right - 114.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    s
}
