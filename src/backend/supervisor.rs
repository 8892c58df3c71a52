//! Supervised workers: chatgate starts each worker's command, logs its output under its
//! index, restarts it when it exits (with backoff), and stops it after its own drain.
//!
//! No worker outlives chatgate: each is started through util-linux's `setpriv --pdeathsig
//! KILL`, so the kernel kills it when chatgate dies, even by SIGKILL (this crate forbids
//! `unsafe`, so it cannot call `prctl` between fork and exec itself). Each worker leads its
//! own process group, so a stop reaches whatever it started, and a Ctrl-C on a terminal
//! reaches only chatgate, which decides the order.
//!
//! The kernel sends the parent-death signal when the *thread* that forked the worker ends.
//! Workers are forked from the runtime's worker threads (tokio spawns on the calling thread),
//! which live as long as the runtime; chatgate never uses `block_in_place`, which could retire
//! one of them early.
//!
//! Each worker runs in its own app root, `<app dir>/.chatgate/worker-<i>/`: Chainlit keeps
//! uploads in `<APP_ROOT>/.files` and deletes that whole directory when it exits gracefully,
//! so workers sharing one directory would delete each other's uploads.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::pool::Worker;
use crate::config::SupervisedConfig;

/// Longest line of worker output logged as one line (the rest of it is dropped).
pub const MAX_LINE: usize = 8 * 1024;
/// First wait before a restart; doubled per quick exit, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting starts again from the first backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// The running supervisor; [`Supervisor::stop`] ends every worker.
pub struct Supervisor {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Supervisor {
    /// Starts every worker of `workers` with the command of `config`.
    pub fn start(config: &SupervisedConfig, workers: &[Arc<Worker>]) -> io::Result<Supervisor> {
        let app_dir = match &config.app_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()?,
        };
        let app_dir = std::fs::canonicalize(&app_dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("worker app dir {}: {e}", app_dir.display()),
            )
        })?;
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let pdeathsig = Arc::new(AtomicBool::new(true));
        for worker in workers {
            let run = WorkerRun {
                worker: Arc::clone(worker),
                command: config.command_for(worker.index),
                root: app_dir
                    .join(".chatgate")
                    .join(format!("worker-{}", worker.index)),
                app_dir: app_dir.clone(),
                stop_timeout: config.stop_timeout,
                pdeathsig: Arc::clone(&pdeathsig),
            };
            tasks.spawn(run.supervise(stop.clone()));
        }
        tracing::info!(
            workers = workers.len(),
            app_dir = %app_dir.display(),
            command = config.command.join(" "),
            "starting workers"
        );
        Ok(Supervisor { stop, tasks })
    }

    /// Stops every worker (SIGTERM to its group, `--worker-stop-timeout`, then SIGKILL) and
    /// waits until they are gone.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("workers stopped");
    }
}

struct WorkerRun {
    worker: Arc<Worker>,
    command: Vec<String>,
    /// This worker's app root.
    root: PathBuf,
    app_dir: PathBuf,
    stop_timeout: Duration,
    /// Whether `setpriv` was found (cleared, with one warning, when it was not).
    pdeathsig: Arc<AtomicBool>,
}

impl WorkerRun {
    async fn supervise(self, stop: CancellationToken) {
        let index = self.worker.index;
        let mut backoff = FIRST_BACKOFF;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let mut leader = 0;
            let exit = match self.spawn() {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or(0);
                    leader = pid;
                    self.worker.started(pid);
                    tracing::info!(
                        worker = index,
                        pid,
                        url = self.worker.backend.url.display.as_str(),
                        "worker started"
                    );
                    let mut ready = self.worker.health.subscribe();
                    let mut announced = false;
                    loop {
                        tokio::select! {
                            status = child.wait() => break describe_exit(status),
                            _ = stop.cancelled() => {
                                self.terminate(&mut child, pid).await;
                                self.worker.stopped();
                                return;
                            }
                            changed = ready.changed(), if !announced => {
                                if changed.is_err() {
                                    announced = true;
                                } else if *ready.borrow_and_update() {
                                    announced = true;
                                    tracing::info!(
                                        worker = index,
                                        pid,
                                        after_ms = started.elapsed().as_millis() as u64,
                                        "worker ready"
                                    );
                                }
                            }
                        }
                    }
                }
                Err(e) => format!("could not start: {e}"),
            };
            // A process group outlives its leader: take what it left behind with it.
            if leader != 0 {
                signal_group(leader, Signal::Kill);
            }
            self.worker.exited(format!("worker {exit}"));
            if started.elapsed() >= STABLE_RUN {
                backoff = FIRST_BACKOFF;
            }
            tracing::warn!(
                worker = index,
                exit,
                restarts = self.worker.restarts(),
                restart_in_ms = backoff.as_millis() as u64,
                "worker exited; restarting it"
            );
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Starts the worker: its app root made fresh, its output piped to the log.
    fn spawn(&self) -> io::Result<Child> {
        prepare_app_root(&self.app_dir, &self.root)?;
        let child = if self.pdeathsig.load(Ordering::Relaxed) {
            match self.command(true).spawn() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.pdeathsig.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        "setpriv (util-linux) not found: workers are started without a \
                         parent-death signal and outlive chatgate if it is killed with SIGKILL"
                    );
                    self.command(false).spawn()
                }
                other => other,
            }
        } else {
            self.command(false).spawn()
        };
        let mut child = child?;
        let index = self.worker.index;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(log_lines(out, index, "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(log_lines(err, index, "stderr"));
        }
        Ok(child)
    }

    /// The worker command (through `setpriv --pdeathsig KILL --` when `pdeathsig`), in the
    /// worker's app root and its own process group.
    fn command(&self, pdeathsig: bool) -> Command {
        let mut command = if pdeathsig {
            let mut command = Command::new("setpriv");
            command
                .args(["--pdeathsig", "KILL", "--"])
                .args(&self.command);
            command
        } else {
            let mut command = Command::new(&self.command[0]);
            command.args(&self.command[1..]);
            command
        };
        let port = self.worker.backend.url.port.to_string();
        command
            .current_dir(&self.root)
            .env("CHAINLIT_APP_ROOT", &self.root)
            .env("CHATGATE_WORKER_INDEX", self.worker.index.to_string())
            .env("CHATGATE_WORKER_PORT", port)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: the stop reaches its children; a terminal's Ctrl-C does not.
            .process_group(0)
            // A last resort should this task be dropped without stopping it.
            .kill_on_drop(true);
        command
    }

    /// SIGTERM to the worker's group, a bounded wait, then SIGKILL.
    async fn terminate(&self, child: &mut Child, pid: u32) {
        let index = self.worker.index;
        signal_group(pid, Signal::Term);
        match tokio::time::timeout(self.stop_timeout, child.wait()).await {
            Ok(status) => {
                tracing::info!(
                    worker = index,
                    pid,
                    exit = describe_exit(status),
                    "worker stopped"
                );
            }
            Err(_) => {
                tracing::warn!(
                    worker = index,
                    pid,
                    timeout_s = self.stop_timeout.as_secs_f64(),
                    "worker did not stop in time: SIGKILL"
                );
                signal_group(pid, Signal::Kill);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            }
        }
        // Anything the worker left running in its group goes with it.
        signal_group(pid, Signal::Kill);
    }
}

fn describe_exit(status: io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("could not be waited for: {e}"),
    }
}

enum Signal {
    Term,
    Kill,
}

/// Signals process group `pid` (the worker leads its own group).
#[cfg(unix)]
fn signal_group(pid: u32, signal: Signal) {
    use rustix::process::{Pid, Signal as Sig, kill_process_group};
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let signal = match signal {
        Signal::Term => Sig::TERM,
        Signal::Kill => Sig::KILL,
    };
    // ESRCH: the group is gone already.
    let _ = kill_process_group(pid, signal);
}

#[cfg(not(unix))]
fn signal_group(_pid: u32, _signal: Signal) {}

/// Makes `root` a fresh app root for one worker: a link to every entry of `app_dir` except
/// `.files` (each worker has its own) and `.chatgate` (the worker roots), so the worker reads
/// the same app, `.chainlit/` (config, translations), `public/` and `.env`. The welcome
/// files `chainlit*.md` are copied instead: Chainlit refuses a translated one that resolves
/// outside its root.
pub fn prepare_app_root(app_dir: &Path, root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(root)?;
    for entry in std::fs::read_dir(app_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text == ".files" || text == ".chatgate" {
            continue;
        }
        let source = app_dir.join(&name);
        let target = root.join(&name);
        let welcome = text.starts_with("chainlit") && text.ends_with(".md");
        if welcome && entry.file_type()?.is_file() {
            std::fs::copy(&source, &target)?;
        } else {
            link(&source, &target)?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn link(source: &Path, target: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(source, target)
}

#[cfg(not(unix))]
fn link(source: &Path, target: &Path) -> io::Result<()> {
    if source.is_dir() {
        Ok(())
    } else {
        std::fs::copy(source, target).map(|_| ())
    }
}

/// Logs a worker's output line by line, each line at most [`MAX_LINE`] bytes.
async fn log_lines(stream: impl AsyncRead + Unpin, worker: usize, name: &'static str) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        match read_line_bounded(&mut reader, &mut line, MAX_LINE).await {
            Ok(None) => return,
            Ok(Some(truncated)) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\r', '\n']);
                tracing::info!(
                    worker,
                    stream = name,
                    truncated,
                    line = text,
                    "worker output"
                );
            }
            Err(_) => return,
        }
    }
}

/// Reads one line into `line` (cleared first), keeping at most `max` bytes of it and
/// skipping the rest up to its newline. `None` at the end of the stream; else whether the
/// line was cut. (`read_until` has no bound: a worker printing without newlines would grow
/// the buffer without end.)
pub async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<bool>> {
    line.clear();
    let mut truncated = false;
    let mut any = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(any.then_some(truncated));
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(line.len());
        if chunk.len() > room {
            truncated = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(truncated));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_the_rest_of_a_long_one_dropped() {
        let input: &[u8] = b"short\nlonger than eight\nlast";
        let mut reader = BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        while let Some(cut) = read_line_bounded(&mut reader, &mut line, 8).await.unwrap() {
            out.push((String::from_utf8(line.clone()).unwrap(), cut));
        }
        assert_eq!(
            out,
            [
                ("short".to_owned(), false),
                ("longer t".to_owned(), true),
                ("last".to_owned(), false)
            ]
        );
    }

    #[test]
    fn an_app_root_links_everything_but_the_uploads() {
        let base = std::env::temp_dir().join(format!("chatgate-approot-{}", std::process::id()));
        let app = base.join("app");
        std::fs::create_dir_all(app.join(".chainlit")).unwrap();
        std::fs::create_dir_all(app.join(".files/s1")).unwrap();
        std::fs::create_dir_all(app.join("public")).unwrap();
        std::fs::write(app.join("app.py"), "print()").unwrap();
        std::fs::write(app.join("chainlit_fr.md"), "Bonjour").unwrap();
        let root = app.join(".chatgate/worker-0");
        prepare_app_root(&app, &root).unwrap();
        // Again: a restart makes it fresh, and the worker's own uploads go.
        std::fs::create_dir_all(root.join(".files/old")).unwrap();
        prepare_app_root(&app, &root).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".chainlit", "app.py", "chainlit_fr.md", "public"]);
        assert!(
            std::fs::symlink_metadata(root.join("app.py"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            !std::fs::symlink_metadata(root.join("chainlit_fr.md"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            app.join(".files/s1").is_dir(),
            "the app's own .files untouched"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
