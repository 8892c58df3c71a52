//! WebSocket echo load: each connection sends one text message, waits for its echo, and
//! repeats until the duration is up. Prints one `key=value` line for `run.sh`.
//!
//! ```text
//! ws-load --url ws://127.0.0.1:18080/ws/echo --connections 64 --duration 10
//! # messages=512345 seconds=10.000 msgs_per_s=51234.5 p50_us=1201 p99_us=2410 errors=0
//! ```
//!
//! `--probe` sends one message on one connection and exits 0 if it came back: `run.sh` uses
//! it to tell whether a proxy relays WebSockets at all.

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Parser)]
struct Args {
    /// ws:// URL of the echo endpoint.
    #[arg(long)]
    url: String,
    /// Concurrent connections, each with one message in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Runtime worker threads (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// `plain` (the letter m, repeated) or `socketio`: a Chainlit user message,
    /// `42["client_message",{...}]`, padded to `--size`, which chatgate's chat reader parses
    /// (and the echo makes it parse one on the way back too).
    #[arg(long, default_value = "plain")]
    shape: String,
    /// One round trip on one connection; exit status says whether it worked.
    #[arg(long)]
    probe: bool,
}

/// What one connection measured: round-trip times in microseconds.
struct ConnectionReport {
    round_trips_us: Vec<u32>,
    error: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match chatgate_bench::runtime(args.threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ws-load: runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if args.probe {
            return probe(&args.url).await;
        }
        load(&args).await
    })
}

async fn probe(url: &str) -> std::process::ExitCode {
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let report = connection(url.to_owned(), payload(16), Instant::now(), true).await;
        match report.error {
            None if report.round_trips_us.len() == 1 => Ok(()),
            None => Err("no echo".to_owned()),
            Some(err) => Err(err),
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(err)) => {
            eprintln!("ws-load: probe failed: {err}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("ws-load: probe timed out");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn load(args: &Args) -> std::process::ExitCode {
    let text = if args.shape == "socketio" {
        socketio_payload(args.size)
    } else {
        payload(args.size)
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        tasks.spawn(connection(args.url.clone(), text.clone(), deadline, false));
    }
    let mut samples = Vec::new();
    let mut errors = 0usize;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(report) => {
                if let Some(err) = report.error {
                    errors += 1;
                    eprintln!("ws-load: connection error: {err}");
                }
                samples.extend(report.round_trips_us);
            }
            Err(err) => {
                errors += 1;
                eprintln!("ws-load: task failed: {err}");
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    samples.sort_unstable();
    let p50 = chatgate_bench::percentile(&samples, 0.50).unwrap_or(0);
    let p99 = chatgate_bench::percentile(&samples, 0.99).unwrap_or(0);
    println!(
        "messages={} seconds={seconds:.3} msgs_per_s={:.1} p50_us={p50} p99_us={p99} errors={errors}",
        samples.len(),
        samples.len() as f64 / seconds,
    );
    if samples.is_empty() || errors > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

fn payload(size: usize) -> Utf8Bytes {
    // Text frames, as Socket.IO (and so Chainlit) sends them.
    Utf8Bytes::from("m".repeat(size))
}

fn socketio_payload(size: usize) -> Utf8Bytes {
    let head = r#"42["client_message",{"message":{"threadId":"","id":"6f1c2a9e-0d3b-4c1e-9a51-3f0b8f2d7c11","name":"User","type":"user_message","output":""#;
    let tail = r#""},"fileReferences":[]}]"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    Utf8Bytes::from(format!("{head}{}{tail}", "m".repeat(pad)))
}

/// Runs one connection until `deadline` (or for one round trip when `once`).
async fn connection(
    url: String,
    text: Utf8Bytes,
    deadline: Instant,
    once: bool,
) -> ConnectionReport {
    let mut report = ConnectionReport {
        round_trips_us: Vec::with_capacity(if once { 1 } else { 64 * 1024 }),
        error: None,
    };
    let mut ws = match connect(&url).await {
        Ok(ws) => ws,
        Err(err) => {
            report.error = Some(err);
            return report;
        }
    };
    loop {
        let sent = Instant::now();
        if let Err(err) = ws.send(Message::Text(text.clone())).await {
            report.error = Some(format!("send: {err}"));
            break;
        }
        match ws.next().await {
            Some(Ok(Message::Text(echoed))) if echoed.len() == text.len() => {}
            Some(Ok(other)) => {
                report.error = Some(format!("unexpected reply: {other:?}"));
                break;
            }
            Some(Err(err)) => {
                report.error = Some(format!("receive: {err}"));
                break;
            }
            None => {
                report.error = Some("closed by peer".to_owned());
                break;
            }
        }
        let now = Instant::now();
        let micros = now.duration_since(sent).as_micros();
        report
            .round_trips_us
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
        if once || now >= deadline {
            break;
        }
    }
    let _ = ws.close(None).await;
    report
}

type Client = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(url: &str) -> Result<Client, String> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|err| format!("connect {authority}: {err}"))?;
    let _ = stream.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        stream,
        Some(chatgate_bench::small_ws_config()),
    )
    .await
    .map_err(|err| format!("handshake: {err}"))?;
    Ok(ws)
}
