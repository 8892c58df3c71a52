//! WebSocket churn soak (issue 7): keeps `--connections` WebSockets open through the proxy for
//! `--duration` seconds. Each one sends a few messages spread over a random short lifetime,
//! checks every echo byte for byte, closes with 1000, waits for the close reply and for the
//! server to close TCP (RFC 6455 §7.1.1), and is replaced at once by a new one. Prints a
//! progress line to stderr every `--progress` seconds and one JSON summary on stdout.
//!
//! ```text
//! ws-soak --url ws://127.0.0.1:8000/ws/echo --connections 5000 --duration 180
//! # progress t=10.0 live=4998 opened=17012 completed=12014 failed=0 messages=36050
//! # {"connections":5000,...,"opened":331102,"completed":326104,"failed":0,...}
//! ```
//!
//! Bounded: every connect, read, close and TCP shutdown has `--timeout`; a slot that fails
//! `--max-consecutive-failures` times in a row gives up; the whole run is cut off at
//! duration + ramp + 3 × timeout + 5 s whatever happens. Exit status 0 when the run finished
//! and at least one connection completed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

#[derive(Parser)]
struct Args {
    /// ws:// URL of an echo endpoint (through the proxy under test). Loopback only.
    #[arg(long)]
    url: String,
    /// Connections kept open at once.
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Seconds of churn; no new connection starts after this.
    #[arg(long, default_value_t = 180.0)]
    duration: f64,
    /// Seconds over which the first connections are started, so the proxy's accept backlog
    /// sees a ramp rather than thousands of SYNs at once.
    #[arg(long, default_value_t = 10.0)]
    ramp: f64,
    /// Shortest connection lifetime, seconds.
    #[arg(long, default_value_t = 0.5)]
    min_lifetime: f64,
    /// Longest connection lifetime, seconds.
    #[arg(long, default_value_t = 5.0)]
    max_lifetime: f64,
    /// Messages per connection, spread evenly over its lifetime.
    #[arg(long, default_value_t = 3)]
    messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Seconds allowed for each connect+handshake, echo, close reply and TCP close.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// A slot stops after this many failed connections in a row.
    #[arg(long, default_value_t = 20)]
    max_consecutive_failures: u32,
    /// Seconds between progress lines on stderr (0 = none).
    #[arg(long, default_value_t = 10.0)]
    progress: f64,
    /// Seed for the lifetimes (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Runtime worker threads (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Counters shared by every slot. Failures are kept by kind, with the first message seen.
#[derive(Default)]
struct SoakStats {
    opened: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    messages: AtomicU64,
    live: AtomicU64,
    peak_live: AtomicU64,
    /// Sum of the open time of every connection, in microseconds (for the mean concurrency).
    open_us: AtomicU64,
    slots_gave_up: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, (u64, String)>>,
}

impl SoakStats {
    fn fail(&self, failure: Failure) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut failures) = self.failures.lock() {
            let entry = failures
                .entry(failure.kind)
                .or_insert_with(|| (0, failure.detail));
            entry.0 += 1;
        }
    }

    fn progress_line(&self, started: Instant) -> String {
        format!(
            "progress t={:.1} live={} opened={} completed={} failed={} messages={}",
            started.elapsed().as_secs_f64(),
            self.live.load(Ordering::Relaxed),
            self.opened.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.messages.load(Ordering::Relaxed),
        )
    }
}

/// Why one connection failed: a fixed kind to count by, and the error text.
struct Failure {
    kind: &'static str,
    detail: String,
}

fn failure(kind: &'static str, detail: impl ToString) -> Failure {
    Failure {
        kind,
        detail: detail.to_string(),
    }
}

/// Counts a connection as live while it is held; keeps the peak.
struct LiveGuard<'a> {
    stats: &'a SoakStats,
    opened_at: Instant,
}

impl<'a> LiveGuard<'a> {
    fn new(stats: &'a SoakStats) -> Self {
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let live = stats.live.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_live.fetch_max(live, Ordering::Relaxed);
        LiveGuard {
            stats,
            opened_at: Instant::now(),
        }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.stats.live.fetch_sub(1, Ordering::Relaxed);
        let micros = u64::try_from(self.opened_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.open_us.fetch_add(micros, Ordering::Relaxed);
    }
}

/// What one slot measured: handshake times and echo round trips, in microseconds.
#[derive(Default)]
struct SlotReport {
    connect_us: Vec<u32>,
    round_trip_us: Vec<u32>,
}

/// The run's fixed parameters, shared by the slots.
struct Plan {
    url: String,
    authority: String,
    deadline: Instant,
    min_lifetime: Duration,
    max_lifetime: Duration,
    messages: usize,
    size: usize,
    timeout: Duration,
    max_consecutive_failures: u32,
}

/// splitmix64: spreads lifetimes and nothing else. Hand-written because the bench crate
/// takes no `rand` dependency and this needs no statistical quality.
struct Lifetimes(u64);

impl Lifetimes {
    fn next_unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&mut self, min: Duration, max: Duration) -> Duration {
        min + (max.saturating_sub(min)).mul_f64(self.next_unit())
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let authority = match loopback_authority(&args.url) {
        Ok(authority) => authority,
        Err(err) => {
            eprintln!("ws-soak: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let seconds_ok = |v: f64, min: f64| v.is_finite() && v >= min && v < 1e7;
    let valid = args.connections > 0
        && seconds_ok(args.duration, 0.001)
        && seconds_ok(args.min_lifetime, 0.001)
        && seconds_ok(args.max_lifetime, args.min_lifetime)
        && seconds_ok(args.timeout, 0.001)
        && seconds_ok(args.ramp, 0.0)
        && seconds_ok(args.progress, 0.0);
    if !valid {
        eprintln!(
            "ws-soak: need connections > 0, duration > 0, 0 < min-lifetime <= max-lifetime, timeout > 0, ramp >= 0, progress >= 0"
        );
        return std::process::ExitCode::from(2);
    }
    let runtime = match chatgate_bench::runtime(args.threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ws-soak: runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(soak(args, authority))
}

/// The `host:port` of a `ws://` URL, refused unless it is a loopback address: the soak
/// opens hundreds of thousands of connections and must never point them elsewhere.
fn loopback_authority(url: &str) -> Result<String, String> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let addr: std::net::SocketAddr = authority
        .parse()
        .map_err(|_| format!("{authority}: expected an IP:port"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{authority} is not a loopback address"));
    }
    Ok(authority.to_owned())
}

async fn soak(args: Args, authority: String) -> std::process::ExitCode {
    let started = Instant::now();
    let duration = Duration::from_secs_f64(args.duration);
    let timeout = Duration::from_secs_f64(args.timeout);
    let plan = Arc::new(Plan {
        url: args.url.clone(),
        authority,
        deadline: started + duration,
        min_lifetime: Duration::from_secs_f64(args.min_lifetime),
        max_lifetime: Duration::from_secs_f64(args.max_lifetime),
        messages: args.messages,
        size: args.size,
        timeout,
        max_consecutive_failures: args.max_consecutive_failures.max(1),
    });
    let stats = Arc::new(SoakStats::default());
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let ramp = Duration::from_secs_f64(args.ramp);

    let mut slots = tokio::task::JoinSet::new();
    for index in 0..args.connections {
        let start_at = started + ramp.mul_f64(index as f64 / args.connections as f64);
        let rng = Lifetimes(seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        slots.spawn(slot(
            index,
            start_at,
            rng,
            Arc::clone(&plan),
            Arc::clone(&stats),
        ));
    }

    let progress = (args.progress > 0.0).then(|| {
        let stats = Arc::clone(&stats);
        let every = Duration::from_secs_f64(args.progress);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticks.tick().await;
                eprintln!("{}", stats.progress_line(started));
            }
        })
    });

    // Hard bound: the last connection starts before the deadline, lives at most
    // max-lifetime (cut to the deadline) and then waits at most three timeouts.
    let cut_off = duration + ramp + timeout * 3 + Duration::from_secs(5);
    let mut report = SlotReport::default();
    let mut panicked = 0u64;
    let finished = tokio::time::timeout(cut_off, async {
        while let Some(joined) = slots.join_next().await {
            match joined {
                Ok(slot_report) => {
                    report.connect_us.extend(slot_report.connect_us);
                    report.round_trip_us.extend(slot_report.round_trip_us);
                }
                Err(_) => panicked += 1,
            }
        }
    })
    .await
    .is_ok();
    let still_open = stats.live.load(Ordering::Relaxed);
    slots.abort_all();
    if let Some(progress) = progress {
        progress.abort();
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("{}", stats.progress_line(started));

    report.connect_us.sort_unstable();
    report.round_trip_us.sort_unstable();
    println!(
        "{}",
        summary_json(
            &args, seed, elapsed, &stats, &report, finished, still_open, panicked
        )
    );
    if finished && panicked == 0 && stats.completed.load(Ordering::Relaxed) > 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// One of the `--connections` slots: opens, uses and closes connections back to back until
/// the deadline.
async fn slot(
    index: usize,
    start_at: Instant,
    mut rng: Lifetimes,
    plan: Arc<Plan>,
    stats: Arc<SoakStats>,
) -> SlotReport {
    tokio::time::sleep_until(start_at.into()).await;
    let mut report = SlotReport::default();
    let mut consecutive_failures = 0u32;
    let mut serial = 0u64;
    loop {
        let now = Instant::now();
        if now >= plan.deadline {
            break;
        }
        let lifetime = rng
            .pick(plan.min_lifetime, plan.max_lifetime)
            .min(plan.deadline - now);
        serial += 1;
        match connection(index, serial, lifetime, &plan, &stats, &mut report).await {
            Ok(()) => {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                consecutive_failures = 0;
            }
            Err(err) => {
                stats.fail(err);
                consecutive_failures += 1;
                if consecutive_failures >= plan.max_consecutive_failures {
                    stats.slots_gave_up.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                // Back off a little so a refusing proxy is not hammered in a tight loop.
                let pause = Duration::from_millis(100 * u64::from(consecutive_failures));
                tokio::time::sleep(pause.min(Duration::from_secs(2))).await;
            }
        }
    }
    report
}

type Client = tokio_tungstenite::WebSocketStream<TcpStream>;

/// One connection's whole life: handshake, `messages` echoes spread over `lifetime`, close
/// 1000, the close reply, then the server's TCP FIN.
async fn connection(
    index: usize,
    serial: u64,
    lifetime: Duration,
    plan: &Plan,
    stats: &SoakStats,
    report: &mut SlotReport,
) -> Result<(), Failure> {
    let connect_started = Instant::now();
    let mut ws = tokio::time::timeout(plan.timeout, connect(&plan.url, &plan.authority))
        .await
        .map_err(|_| failure("connect timeout", "connect + handshake timed out"))??;
    let _live = LiveGuard::new(stats);
    report.connect_us.push(micros(connect_started.elapsed()));
    let opened_at = Instant::now();

    for n in 0..plan.messages {
        // Messages at lifetime × (n+1)/(messages+1), so the connection idles between them.
        let due = opened_at + lifetime.mul_f64((n + 1) as f64 / (plan.messages + 1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let text = payload(index, serial, n, plan.size);
        let sent = Instant::now();
        tokio::time::timeout(plan.timeout, ws.send(Message::Text(text.clone())))
            .await
            .map_err(|_| failure("send timeout", "send timed out"))?
            .map_err(|err| failure("send error", err))?;
        let echoed = tokio::time::timeout(plan.timeout, next_data(&mut ws))
            .await
            .map_err(|_| failure("echo timeout", "no echo within the timeout"))??;
        if echoed != text {
            return Err(failure(
                "echo mismatch",
                format!(
                    "sent {} bytes, got {} different ones",
                    text.len(),
                    echoed.len()
                ),
            ));
        }
        report.round_trip_us.push(micros(sent.elapsed()));
        stats.messages.fetch_add(1, Ordering::Relaxed);
    }

    tokio::time::sleep_until((opened_at + lifetime).into()).await;
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: Utf8Bytes::from_static("soak done"),
    };
    tokio::time::timeout(plan.timeout, ws.close(Some(close)))
        .await
        .map_err(|_| failure("close timeout", "sending close timed out"))?
        .map_err(|err| failure("close send error", err))?;
    let reply = tokio::time::timeout(plan.timeout, close_reply(&mut ws))
        .await
        .map_err(|_| failure("close reply timeout", "no close reply within the timeout"))??;
    match reply {
        Some(CloseCode::Normal) => {}
        Some(code) => {
            return Err(failure(
                "close code",
                format!("close reply {}", u16::from(code)),
            ));
        }
        None => return Err(failure("close code", "close reply without a code")),
    }
    // RFC 6455 §7.1.1: the server closes TCP first. A relay that lingers after the close
    // handshake would show here, before it shows as a leaked descriptor.
    let mut rest = [0u8; 64];
    match tokio::time::timeout(plan.timeout, ws.get_mut().read(&mut rest)).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => Err(failure(
            "bytes after close",
            format!("{n} bytes after the close handshake"),
        )),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => {
            Err(failure("reset after close", err))
        }
        Ok(Err(err)) => Err(failure("tcp error after close", err)),
        Err(_) => Err(failure(
            "tcp not closed by server",
            "the server kept TCP open after the close handshake",
        )),
    }
}

async fn connect(url: &str, authority: &str) -> Result<Client, Failure> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|err| failure("connect error", err))?;
    let _ = stream.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        stream,
        Some(chatgate_bench::small_ws_config()),
    )
    .await
    .map_err(|err| match err {
        WsError::Http(response) => failure(
            "handshake refused",
            format!("HTTP {}", response.status().as_u16()),
        ),
        other => failure("handshake error", other),
    })?;
    Ok(ws)
}

/// The next data message; control frames are skipped (tungstenite answers pings itself).
async fn next_data(ws: &mut Client) -> Result<Utf8Bytes, Failure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Binary(_))) => {
                return Err(failure("echo mismatch", "binary reply to a text message"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(failure(
                    "closed by peer",
                    format!(
                        "close {} before the echo",
                        frame.map_or(0, |f| u16::from(f.code))
                    ),
                ));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Err(err)) => return Err(failure("receive error", err)),
            None => return Err(failure("closed by peer", "stream ended before the echo")),
        }
    }
}

/// Reads until the close handshake completes; the code of the peer's close frame.
async fn close_reply(ws: &mut Client) -> Result<Option<CloseCode>, Failure> {
    let mut code = None;
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => code = frame.map(|f| f.code),
            Some(Ok(_)) => {}
            None | Some(Err(WsError::ConnectionClosed)) => return Ok(code),
            Some(Err(err)) => return Err(failure("close error", err)),
        }
    }
}

/// A text payload unique to (slot, connection, message), padded to `size`, so an echo routed
/// to the wrong connection or truncated is caught.
fn payload(index: usize, serial: u64, n: usize, size: usize) -> Utf8Bytes {
    let mut text = format!("{index}:{serial}:{n}:");
    while text.len() < size {
        text.push('m');
    }
    Utf8Bytes::from(text)
}

fn micros(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)
}

#[allow(clippy::too_many_arguments)]
fn summary_json(
    args: &Args,
    seed: u64,
    elapsed: f64,
    stats: &SoakStats,
    report: &SlotReport,
    finished: bool,
    still_open: u64,
    panicked: u64,
) -> String {
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let pct = |samples: &[u32], q: f64| chatgate_bench::percentile(samples, q).unwrap_or(0);
    let mut json = String::new();
    let _ = write!(
        json,
        concat!(
            "{{\"url\":\"{}\",\"connections\":{},\"duration_s\":{},\"lifetime_s\":[{},{}],",
            "\"messages_per_connection\":{},\"message_bytes\":{},\"seed\":{},",
            "\"elapsed_s\":{:.3},\"finished\":{},\"opened\":{},\"completed\":{},\"failed\":{},",
            "\"messages\":{},\"peak_live\":{},\"mean_live\":{:.1},\"still_open_at_cut_off\":{},",
            "\"slots_gave_up\":{},\"panicked\":{},",
            "\"connect_ms\":{{\"p50\":{:.2},\"p99\":{:.2},\"max\":{:.2}}},",
            "\"echo_ms\":{{\"p50\":{:.2},\"p99\":{:.2},\"max\":{:.2}}},\"failures\":{{"
        ),
        json_escape(&args.url),
        args.connections,
        args.duration,
        args.min_lifetime,
        args.max_lifetime,
        args.messages,
        args.size,
        seed,
        elapsed,
        finished,
        load(&stats.opened),
        load(&stats.completed),
        load(&stats.failed),
        load(&stats.messages),
        load(&stats.peak_live),
        load(&stats.open_us) as f64 / 1e6 / elapsed,
        still_open,
        load(&stats.slots_gave_up),
        panicked,
        f64::from(pct(&report.connect_us, 0.50)) / 1e3,
        f64::from(pct(&report.connect_us, 0.99)) / 1e3,
        f64::from(report.connect_us.last().copied().unwrap_or(0)) / 1e3,
        f64::from(pct(&report.round_trip_us, 0.50)) / 1e3,
        f64::from(pct(&report.round_trip_us, 0.99)) / 1e3,
        f64::from(report.round_trip_us.last().copied().unwrap_or(0)) / 1e3,
    );
    if let Ok(failures) = stats.failures.lock() {
        for (i, (kind, (count, example))) in failures.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            let _ = write!(
                json,
                "{comma}\"{}\":{{\"count\":{count},\"example\":\"{}\"}}",
                json_escape(kind),
                json_escape(example)
            );
        }
    }
    json.push_str("}}");
    json
}

/// JSON string escaping (RFC 8259 §7) for the few strings the summary carries.
fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}
