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
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let url = args.url.clone();
        let authority = authority.clone();
        tasks.spawn(async move {
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                let stream = TcpStream::connect(&authority)
                    .await
                    .map_err(|err| format!("connect: {err}"))?;
                tokio_tungstenite::client_async_with_config(
                    url,
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
