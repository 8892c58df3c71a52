//! The `chatgate` binary: parse configuration, set up logging, run the library.

use std::process::ExitCode;
use std::time::Duration;

use chatgate::config::{Cli, Command, Config};

// jemalloc with its background threads hands freed memory back to the system within
// seconds, even when no request arrives to trigger it: glibc's malloc (and mimalloc) kept
// the peak (~70 MiB) after a burst of 5,000 relays had drained (bench/SOAK.md).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::parse_with(std::env::args_os(), |name| std::env::var(name).ok()) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and exit 0; a usage error exits 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let config = match Config::from_settings(&cli.settings) {
        Ok(config) => config,
        Err(errors) => {
            // One line per bad setting, each naming its flag and variable.
            for error in &errors.0 {
                eprintln!("chatgate: {error}");
            }
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime_builder().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chatgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            print!("{}", config.describe());
            ExitCode::SUCCESS
        }
        Some(Command::Healthcheck) => {
            match runtime.block_on(chatgate::healthcheck::check(
                config.server.listen,
                Duration::from_secs(3),
            )) {
                Ok(200) => ExitCode::SUCCESS,
                Ok(status) => {
                    eprintln!("chatgate healthcheck: /monitor/health answered {status}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("chatgate healthcheck: {e}");
                    ExitCode::from(1)
                }
            }
        }
        None => {
            let code = runtime.block_on(serve(config));
            // Work stuck in the blocking pool (a DNS lookup) must not hold the exit past the
            // grace period.
            runtime.shutdown_timeout(Duration::from_secs(1));
            code
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let signals = match chatgate::shutdown::Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("chatgate: cannot install the SIGTERM/SIGINT handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "chatgate: cannot listen on --listen / CHATGATE_LISTEN {}: {e}",
                config.server.listen
            );
            return ExitCode::from(2);
        }
    };
    let admin = match config.server.admin_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(admin) => Some(admin),
            Err(e) => {
                eprintln!(
                    "chatgate: cannot listen on --admin-listen / CHATGATE_ADMIN_LISTEN {addr}: {e}"
                );
                return ExitCode::from(2);
            }
        },
    };
    let _log_guard = match chatgate::telemetry::init(config.server.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("chatgate: cannot start the log writer thread: {e}");
            return ExitCode::from(2);
        }
    };
    // Each relayed WebSocket holds two descriptors: take all the kernel allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    chatgate::server::run(config, listener, admin, signals.recv()).await;
    ExitCode::SUCCESS
}

/// The runtime for the CPUs chatgate may use (its affinity mask and cgroup quota): with one,
/// the current-thread scheduler, which skips the multi-threaded one's work-stealing
/// bookkeeping (about 5% of the CPU of a small proxied request, bench/NOTES.md); with
/// more, one worker thread per CPU.
fn runtime_builder() -> tokio::runtime::Builder {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}
