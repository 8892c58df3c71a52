//! Start-up time to the first served request: spawns the proxy, polls a URL through it
//! every millisecond until it answers 200, writes the elapsed milliseconds, then stays the
//! proxy's parent until the proxy exits (so `run.sh` can stop it by PID and have it reaped).
//!
//! ```text
//! startup-time --addr 127.0.0.1:18001 --path /page --pid-file p --result-file r \
//!     --log-file proxy.log -- target/release/chatgate --listen 127.0.0.1:18001 ...
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address the proxy listens on.
    #[arg(long)]
    addr: SocketAddr,
    /// Path to request through it.
    #[arg(long, default_value = "/page")]
    path: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 20_000)]
    timeout_ms: u64,
    /// Where to write the proxy's PID.
    #[arg(long)]
    pid_file: PathBuf,
    /// Where to write the start-up time in milliseconds (or `timeout`).
    #[arg(long)]
    result_file: PathBuf,
    /// File that gets the proxy's stdout and stderr.
    #[arg(long)]
    log_file: PathBuf,
    /// The proxy command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("startup-time: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> std::io::Result<ExitCode> {
    let log = File::create(&args.log_file)?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    std::fs::write(&args.pid_file, format!("{}\n", child.id()))?;
    let deadline = started + Duration::from_millis(args.timeout_ms);
    let result = loop {
        if serves(args.addr, &args.path) {
            break format!("{:.2}\n", started.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() >= deadline || child.try_wait()?.is_some() {
            break "timeout\n".to_owned();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    std::fs::write(&args.result_file, result)?;
    let status = child.wait()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// One plain HTTP/1.1 GET; true on a 200 status line.
fn serves(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok()
        && (&head[..9] == b"HTTP/1.1 " || &head[..9] == b"HTTP/1.0 ")
        && &head[9..12] == b"200"
}
