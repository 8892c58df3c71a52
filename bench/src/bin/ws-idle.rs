//! Opens many WebSocket connections and holds them idle, so `run.sh` can read the proxy's
//! resident memory with them open. Prints `ready connected=N failed=M` once every
//! connection has been attempted, then waits until it is killed or `--hold` runs out.
//!
//! ```text
//! ws-idle --url ws://127.0.0.1:18080/ws/idle --connections 5000 > idle.out &
//! grep -q '^ready' idle.out && cat /proc/$PROXY_PID/status | grep VmRSS
//! ```

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[derive(Parser)]
struct Args {
    /// ws:// URL to connect to.
    #[arg(long)]
    url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Handshakes in flight at once (keeps the listen backlog from overflowing).
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Seconds to hold the connections before exiting on its own.
    #[arg(long, default_value_t = 300)]
    hold: u64,
    /// A header field every handshake carries, `name: value` (repeatable): what a platform
    /// ingress adds, such as Envoy's `x-request-id`.
    #[arg(long = "header")]
    headers: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match chatgate_bench::runtime(1) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ws-idle: runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(hold_idle(args))
}

async fn hold_idle(args: Args) -> std::process::ExitCode {
    let Some(authority) = args
        .url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .map(str::to_owned)
    else {
        eprintln!("ws-idle: not a ws:// URL: {}", args.url);
        return std::process::ExitCode::FAILURE;
    };
    let mut extra = Vec::new();
    for field in &args.headers {
        let parsed = field.split_once(':').and_then(|(name, value)| {
            let name = http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
            let value = http::HeaderValue::from_str(value.trim()).ok()?;
            Some((name, value))
        });
        let Some(parsed) = parsed else {
            eprintln!("ws-idle: --header {field:?}: use `name: value`");
            return std::process::ExitCode::FAILURE;
        };
        extra.push(parsed);
    }
    let extra = Arc::new(extra);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let url = args.url.clone();
        let authority = authority.clone();
        let extra = Arc::clone(&extra);
        tasks.spawn(async move {
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                let mut request = url
                    .into_client_request()
                    .map_err(|err| format!("request: {err}"))?;
                for (name, value) in extra.iter() {
                    request.headers_mut().append(name.clone(), value.clone());
                }
                let stream = TcpStream::connect(&authority)
                    .await
                    .map_err(|err| format!("connect: {err}"))?;
                tokio_tungstenite::client_async_with_config(
                    request,
                    stream,
                    Some(chatgate_bench::small_ws_config()),
                )
                .await
                .map(|(ws, _)| ws)
                .map_err(|err| format!("handshake: {err}"))
            })
            .await;
            drop(permit);
            match outcome {
                Ok(result) => result,
                Err(_) => Err("timed out".to_owned()),
            }
        });
    }
    // Held, never polled: an idle client is exactly what this measures.
    let mut open = Vec::with_capacity(args.connections);
    let mut first_error = None;
    let mut failed = 0usize;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(ws)) => open.push(ws),
            Ok(Err(err)) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
            Err(err) => {
                failed += 1;
                first_error.get_or_insert(err.to_string());
            }
        }
    }
    if let Some(err) = first_error {
        eprintln!("ws-idle: {failed} connections failed, first: {err}");
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "ready connected={} failed={failed}", open.len());
    let _ = stdout.flush();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    drop(open);
    std::process::ExitCode::SUCCESS
}
