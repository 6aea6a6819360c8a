//! `optimus top`: a live view of every consume and work process on the
//! server (what `ctl status` reads, with each process's last monitoring
//! figures) and of the streams' length and consumer groups, redrawn every
//! second in the terminal (ratatui); `q` quits.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use optimus::control::{self, ProcessRow, Status};
use optimus::manage::GroupInfo;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

use super::Exit;
use super::connect::ConnectArgs;

/// `optimus top` flags.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// The streams to show (length, consumer groups' lag and pending),
    /// comma-separated.
    #[arg(
        long,
        env = "OUTPUT_STREAM",
        default_value = "messages:processed",
        value_delimiter = ','
    )]
    pub streams: Vec<String>,
    /// The work processes' WORK_CONSUMERS_LIST.
    #[arg(long, env = "WORK_CONSUMERS_LIST", default_value = "work:ids")]
    pub work_consumers_list: String,
}

/// One stream as the view shows it.
struct StreamView {
    name: String,
    length: Option<u64>,
    groups: Vec<GroupInfo>,
}

/// What one refresh read.
struct View {
    server: String,
    status: Result<Status, String>,
    streams: Vec<StreamView>,
}

/// Runs the view until `q` (or Esc, or Ctrl-C).
pub async fn run(connect: &ConnectArgs, args: TopArgs) -> Result<(), Exit> {
    if !std::io::stdout().is_terminal() {
        return Err(Exit::Refused(
            "optimus top needs a terminal; `optimus ctl status --json` gives the processes' figures as JSON".into(),
        ));
    }
    let endpoint = connect.endpoint()?;
    let server = endpoint.to_string();
    let mut conn = optimus::connect::open(&endpoint)
        .await
        .map_err(|err| Exit::redis(&server, &err))?;
    let mut terminal = ratatui::init();
    let result = async {
        loop {
            let view = gather(&mut conn, &server, &args, endpoint.is_cluster()).await;
            terminal.draw(|frame| draw(frame, &view))?;
            let quit = tokio::task::spawn_blocking(|| wait_for_quit(Duration::from_secs(1)))
                .await
                .map_err(std::io::Error::other)??;
            if quit {
                return Ok::<(), std::io::Error>(());
            }
        }
    }
    .await;
    ratatui::restore();
    result.map_err(|err| Exit::failed(format_args!("optimus top: {err}")))
}

/// Waits up to `wait` for a key; whether it asks to quit.
fn wait_for_quit(wait: Duration) -> std::io::Result<bool> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                return Ok(true);
            }
        }
    }
}

async fn gather(
    conn: &mut optimus::connect::Conn,
    server: &str,
    args: &TopArgs,
    cluster: bool,
) -> View {
    let status = control::status(conn, &args.work_consumers_list, cluster)
        .await
        .map_err(|err| optimus::connect::explain(&err));
    let mut streams = Vec::new();
    for name in &args.streams {
        let length: Option<u64> = redis::cmd("XLEN").arg(name).query_async(conn).await.ok();
        let groups = optimus::manage::list_groups(conn, name)
            .await
            .unwrap_or_default();
        streams.push(StreamView {
            name: name.clone(),
            length,
            groups,
        });
    }
    View {
        server: server.to_string(),
        status,
        streams,
    }
}

/// A figure of the process's last monitoring line, or `-`.
fn figure(p: &ProcessRow, name: &str) -> String {
    p.figures.get(name).cloned().unwrap_or_else(|| "-".into())
}

fn draw(frame: &mut ratatui::Frame, view: &View) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let [head, processes, streams] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(6),
        Constraint::Min(6),
    ])
    .areas(frame.area());

    let (switch, total, rows) = match &view.status {
        Ok(status) => (
            status
                .stop
                .as_ref()
                .map_or("off".to_string(), |v| format!("ON ({v})")),
            status
                .total
                .map_or("not set".to_string(), |n| format!("{n} (ctl scale)")),
            status.processes.clone(),
        ),
        Err(err) => (format!("? ({err})"), "?".into(), Vec::new()),
    };
    let header = vec![
        Line::from(format!("optimus top  {}  (q quits)", view.server)).style(bold),
        Line::from(format!("kill switch: {switch}   total workers: {total}")),
    ];
    frame.render_widget(Paragraph::new(header), head);

    let widths = [
        Constraint::Length(8),
        Constraint::Length(16),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(9),
    ];
    let table = Table::new(
        rows.iter().map(|p| {
            let done = if p.kind == "work" {
                "handled"
            } else {
                "written"
            };
            Row::new(vec![
                p.kind.to_string(),
                p.host.clone(),
                p.pid.clone(),
                p.workers.to_string(),
                p.rate.clone().unwrap_or_else(|| "-".into()),
                figure(p, "received"),
                figure(p, done),
                figure(p, "pending"),
                figure(p, "gaps"),
                figure(p, "reconnects"),
                figure(p, "overflow"),
            ])
        }),
        widths,
    )
    .header(
        Row::new(vec![
            "kind",
            "host",
            "pid",
            "workers",
            "rate/s",
            "received",
            "written",
            "pending",
            "gaps",
            "reconnects",
            "overflow",
        ])
        .style(bold),
    )
    .block(Block::bordered().title(format!("processes ({})", rows.len())));
    frame.render_widget(table, processes);

    let mut stream_rows = Vec::new();
    for s in &view.streams {
        let length = s.length.map_or("-".into(), |n| n.to_string());
        if s.groups.is_empty() {
            stream_rows.push(Row::new(vec![
                s.name.clone(),
                length.clone(),
                "-".into(),
                String::new(),
                String::new(),
                String::new(),
            ]));
        }
        for (i, g) in s.groups.iter().enumerate() {
            stream_rows.push(Row::new(vec![
                if i == 0 {
                    s.name.clone()
                } else {
                    String::new()
                },
                if i == 0 {
                    length.clone()
                } else {
                    String::new()
                },
                g.name.clone(),
                g.lag.map_or("?".into(), |n| n.to_string()),
                g.pending.to_string(),
                g.consumers.to_string(),
            ]));
        }
    }
    let table = Table::new(
        stream_rows,
        [
            Constraint::Length(28),
            Constraint::Length(10),
            Constraint::Length(16),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(9),
        ],
    )
    .header(
        Row::new(vec![
            "stream",
            "length",
            "group",
            "lag",
            "pending",
            "consumers",
        ])
        .style(bold),
    )
    .block(Block::bordered().title("streams"));
    frame.render_widget(table, streams);
}
