//! The log writer: every thread appends its lines to one shared buffer, and one thread
//! writes what has gathered to stdout in a single `write` a few milliseconds later.
//!
//! Written by hand because the crate before it (tracing-appender's non-blocking writer)
//! wakes its thread for every line that finds it idle, and writes whenever its queue runs
//! dry: with the proxy on two cores, where the writer is idle between lines, that was a
//! futex wake, a context switch and a `write` per request (`bench/NOTES.md`, issue 12).
//! Here the writer is woken once per batch (when the buffer goes from empty to non-empty),
//! so a busy second costs at most `1 s / GATHER` wake-ups and writes, and a quiet process
//! none at all.
//!
//! The price is a lock per line, held for one `memcpy` of the line: the lock-free channel
//! it replaces also synchronised per line, and paid the wake-up besides.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, Thread};
use std::time::Duration;

/// How long the writer lets lines gather after the first of a batch: the most a line is
/// delayed on its way to stdout (when stdout keeps up).
const GATHER: Duration = Duration::from_millis(10);

/// The most the buffer holds while stdout is not taking lines (a stalled log collector):
/// beyond it lines are dropped and counted rather than a request blocked or memory grown.
/// With the batch being written, the writer holds at most twice this.
const BUFFER_LIMIT: usize = 4 * 1024 * 1024;

/// How long a shutdown waits for the last lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    dropped: u64,
    stage: Stage,
}

/// Where shutdown is: lines are batched until the writer has written the last batch, and
/// only then go straight to stdout (so no line overtakes an older one).
#[derive(Default, Clone, Copy, PartialEq)]
enum Stage {
    #[default]
    Open,
    /// The guard asked for a last flush; lines are still batched.
    Closing,
    /// The writer is gone.
    Finished,
}

struct Shared {
    pending: Mutex<Pending>,
    writer: Thread,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves whole lines behind: nothing to repair.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where log lines go: cheap to clone, never blocks on stdout. Each `write` call must be
/// whole lines (tracing's formatter writes one event per call; so does the access line).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes what is left when dropped (waiting at most a second for stdout), then stops the
/// writer thread. Keep it alive in `main`.
pub struct FlushGuard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

/// Starts the writer thread, writing to `out`.
pub fn spawn(mut out: impl Write + Send + 'static) -> io::Result<(LogWriter, FlushGuard)> {
    let (ready, handle) = mpsc::channel::<Arc<Shared>>();
    let (finished, done) = mpsc::channel();
    let thread = thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let Ok(shared) = handle.recv() else { return };
            let mut batch = Vec::new();
            let mut clock = crate::ascii::Rfc3339Clock::default();
            loop {
                // Until there is something to do. The state is read first, not trusted to
                // the wake-up: anything else that parks this thread (a blocking write can)
                // may use up the token an `unpark` left.
                loop {
                    let pending = shared.pending();
                    if !pending.lines.is_empty() || pending.dropped > 0 || pending.stage != Stage::Open {
                        break;
                    }
                    drop(pending);
                    thread::park();
                }
                thread::sleep(GATHER);
                let (dropped, stage) = {
                    let mut pending = shared.pending();
                    std::mem::swap(&mut pending.lines, &mut batch);
                    (std::mem::take(&mut pending.dropped), pending.stage)
                };
                if dropped > 0 {
                    batch.extend_from_slice(b"{\"timestamp\":\"");
                    clock.push(&mut batch, std::time::SystemTime::now());
                    batch.extend_from_slice(b"\",\"level\":\"WARN\",\"message\":\"log lines dropped: stdout was not keeping up\",\"dropped\":");
                    crate::ascii::push_int(&mut batch, dropped);
                    batch.extend_from_slice(b"}\n");
                }
                if !batch.is_empty() {
                    // Nothing to tell anyone if stdout is gone; the lines are lost either way.
                    let _ = out.write_all(&batch).and_then(|()| out.flush());
                    batch.clear();
                    // A burst can grow the batch: don't keep megabytes for a quiet hour.
                    batch.shrink_to(64 * 1024);
                }
                if stage == Stage::Closing {
                    let mut pending = shared.pending();
                    if pending.lines.is_empty() && pending.dropped == 0 {
                        pending.stage = Stage::Finished;
                        let _ = finished.send(());
                        return;
                    }
                    // Lines came in while the last batch was written: one more round.
                }
            }
        })?;
    let shared = Arc::new(Shared {
        pending: Mutex::default(),
        writer: thread.thread().clone(),
    });
    let _ = ready.send(Arc::clone(&shared));
    let guard = FlushGuard {
        shared: Arc::clone(&shared),
        done,
    };
    Ok((LogWriter { shared }, guard))
}

impl LogWriter {
    /// Appends whole lines; never waits for stdout.
    pub fn append(&self, lines: &[u8]) {
        let mut pending = self.shared.pending();
        if pending.stage == Stage::Finished {
            // After shutdown's last batch: straight out, nothing left to batch with.
            drop(pending);
            let _ = io::stdout().lock().write_all(lines);
            return;
        }
        // The writer has nothing to do when the buffer (and the drop count) is empty: this
        // line starts a batch and wakes it.
        let first = pending.lines.is_empty() && pending.dropped == 0;
        if pending.lines.len() + lines.len() > BUFFER_LIMIT {
            pending.dropped += 1;
        } else {
            pending.lines.extend_from_slice(lines);
        }
        drop(pending);
        if first {
            // A syscall only when the writer is parked; otherwise it sets a flag.
            self.shared.writer.unpark();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.pending().stage = Stage::Closing;
        self.shared.writer.unpark();
        let _ = self.done.recv_timeout(FLUSH_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `out` the test can read: what the writer thread wrote, and when.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wait_for(out: &Captured, len: usize) -> Vec<u8> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let seen = out.0.lock().unwrap().clone();
            if seen.len() >= len || std::time::Instant::now() > deadline {
                return seen;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// stdout whose first `holds` writes each wait for the test, telling it when they do.
    struct Held {
        out: Captured,
        holds: usize,
        blocked: mpsc::Sender<()>,
        open: mpsc::Receiver<()>,
    }

    /// The fake, the signal that a write is waiting, and the handle that lets one through.
    fn held(out: &Captured, holds: usize) -> (Held, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (blocked, writer_blocked) = mpsc::channel();
        let (let_go, open) = mpsc::channel();
        let fake = Held {
            out: out.clone(),
            holds,
            blocked,
            open,
        };
        (fake, writer_blocked, let_go)
    }

    impl Write for Held {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.holds > 0 {
                self.holds -= 1;
                let _ = self.blocked.send(());
                let _ = self.open.recv();
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_each_threads_order() {
        let out = Captured::default();
        let (writer, guard) = spawn(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                thread::spawn(move || {
                    for i in 0..1000 {
                        writer.append(format!("t{t} line {i:04}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| format!("t{t} line {i:04}")).collect();
            assert_eq!(mine, expected);
        }
    }

    #[test]
    fn a_quiet_line_is_written_without_waiting_for_more() {
        let out = Captured::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        writer.append(b"one\n");
        assert_eq!(wait_for(&out, 4), b"one\n");
        writer.append(b"two\n");
        assert_eq!(wait_for(&out, 8), b"one\ntwo\n");
    }

    #[test]
    fn a_stalled_stdout_costs_dropped_lines_not_memory_and_says_so() {
        // stdout that takes nothing until the test lets it go.
        let out = Captured::default();
        let (stalled, writer_blocked, let_go) = held(&out, usize::MAX);
        let (writer, guard) = spawn(stalled).unwrap();
        writer.append(b"first\n");
        writer_blocked
            .recv_timeout(Duration::from_secs(5))
            .expect("the writer takes the first line");
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        for _ in 0..(BUFFER_LIMIT / line.len() + 100) {
            writer.append(&line);
        }
        assert!(writer.shared.pending().lines.len() <= BUFFER_LIMIT);
        assert!(writer.shared.pending().dropped >= 100);
        // Let every write through from here on.
        for _ in 0..16 {
            let _ = let_go.send(());
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("first\n"));
        let report = text
            .lines()
            .find(|l| l.contains("\"dropped\":"))
            .expect("the drop is reported");
        let report: serde_json::Value = serde_json::from_str(report).unwrap();
        assert!(report["dropped"].as_u64().unwrap() >= 100);
        assert!(report["timestamp"].is_string());
        for l in text.lines() {
            assert!(
                l == "first" || l.len() == 1023 || l.contains("dropped"),
                "whole lines only"
            );
        }
    }

    #[test]
    fn lines_written_during_shutdown_keep_their_order() {
        let out = Captured::default();
        let (slow, writer_blocked, let_go) = held(&out, 1);
        let (writer, guard) = spawn(slow).unwrap();
        writer.append(b"before\n");
        writer_blocked.recv_timeout(Duration::from_secs(5)).unwrap();
        // Shutdown begins while "before" is still being written...
        let shutdown = thread::spawn(move || drop(guard));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while writer.shared.pending().stage != Stage::Closing {
            assert!(std::time::Instant::now() < deadline, "shutdown began");
            thread::yield_now();
        }
        // ...and a line that comes in then is batched behind it, not written ahead of it
        // (or past the writer, straight to the process's stdout).
        writer.append(b"during\n");
        let_go.send(()).unwrap();
        shutdown.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "before\nduring\n");
        assert!(writer.shared.pending().stage == Stage::Finished);
    }
}
