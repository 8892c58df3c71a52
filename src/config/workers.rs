//! Settings of the workers: how many Chainlit processes chatgate starts and supervises (the
//! worker command after `--`), and the affinity cookie that keeps a visitor on its worker.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::values::{Line, Problems, count, duration_line, invalid, positive_seconds};

/// Most workers one chatgate supervises (the `worker` metric label stays bounded).
pub const MAX_WORKERS: usize = 64;

#[derive(Debug, Clone, Args)]
pub struct WorkersSettings {
    /// Chainlit processes to start and supervise, a number or `auto` (one per CPU available
    /// to chatgate); the worker command follows `--`. 1 without a command: --backend only.
    #[arg(long, env = "CHATGATE_WORKERS", default_value = "1", global = true)]
    pub workers: String,
    /// Port of the first supervised worker; worker i listens on this + i.
    #[arg(
        long,
        env = "CHATGATE_WORKER_PORT_BASE",
        default_value = "8081",
        global = true
    )]
    pub worker_port_base: String,
    /// Seconds a supervised worker gets after SIGTERM (chatgate's own drain done) before SIGKILL.
    #[arg(
        long,
        env = "CHATGATE_WORKER_STOP_TIMEOUT",
        default_value = "5",
        global = true
    )]
    pub worker_stop_timeout: String,
    /// The app directory the workers share (default: the working directory). Each worker runs
    /// in `<dir>/.chatgate/worker-<i>/`, links to every entry of it but its own `.files`.
    #[arg(
        long,
        env = "CHATGATE_WORKER_APP_DIR",
        default_value = "",
        global = true
    )]
    pub worker_app_dir: String,
    /// Name of the cookie that keeps a visitor on its worker (several workers only).
    #[arg(
        long,
        env = "CHATGATE_AFFINITY_COOKIE",
        default_value = "chatgate_worker",
        global = true
    )]
    pub affinity_cookie: String,
    /// SameSite of the affinity cookie: Lax, Strict or None (None, for a chat embedded in
    /// another site, also makes it Secure).
    #[arg(
        long,
        env = "CHATGATE_AFFINITY_SAMESITE",
        default_value = "Lax",
        global = true
    )]
    pub affinity_samesite: String,
    /// The worker command, after `--`; `{port}` in it becomes each worker's port.
    #[arg(last = true, value_name = "WORKER_COMMAND")]
    pub worker_command: Vec<String>,
}

/// The affinity cookie's SameSite attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// How the affinity cookie is written.
#[derive(Debug, Clone)]
pub struct AffinityConfig {
    pub cookie: String,
    pub same_site: SameSite,
}

/// Workers chatgate starts itself.
#[derive(Debug, Clone)]
pub struct SupervisedConfig {
    pub count: usize,
    pub port_base: u16,
    /// The command, `{port}` not yet replaced.
    pub command: Vec<String>,
    pub stop_timeout: Duration,
    /// `None`: the working directory at start.
    pub app_dir: Option<PathBuf>,
}

impl SupervisedConfig {
    /// Worker `index`'s port.
    pub fn port(&self, index: usize) -> u16 {
        // Validated: port_base + count - 1 fits in a port.
        self.port_base.saturating_add(index as u16)
    }

    /// Worker `index`'s command line, `{port}` replaced in every argument.
    pub fn command_for(&self, index: usize) -> Vec<String> {
        let port = self.port(index).to_string();
        self.command
            .iter()
            .map(|arg| arg.replace("{port}", &port))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct WorkersConfig {
    /// `Some` when chatgate starts the workers (a command after `--`).
    pub supervised: Option<SupervisedConfig>,
    pub affinity: AffinityConfig,
}

/// What `--workers auto` means: the CPUs this process may use (cgroup quotas and affinity
/// masks included, as `available_parallelism` reads them).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl WorkersConfig {
    pub(super) fn validate(s: &WorkersSettings, p: &mut Problems) -> Option<WorkersConfig> {
        let workers = p.check(match s.workers.trim() {
            "auto" => Ok(available_cpus().min(MAX_WORKERS)),
            n => count("workers", n, 1, MAX_WORKERS).map_err(|mut e| {
                e.reason = format!("{} (or auto)", e.reason);
                e
            }),
        });
        let port_base = p.check(count("worker-port-base", &s.worker_port_base, 1, 65535));
        let stop_timeout = p.check(positive_seconds(
            "worker-stop-timeout",
            &s.worker_stop_timeout,
        ));
        let cookie = p.check(cookie_name(&s.affinity_cookie));
        let same_site = p.check(
            match s.affinity_samesite.trim().to_ascii_lowercase().as_str() {
                "lax" => Ok(SameSite::Lax),
                "strict" => Ok(SameSite::Strict),
                "none" => Ok(SameSite::None),
                _ => Err(invalid(
                    "affinity-samesite",
                    &s.affinity_samesite,
                    "expected Lax, Strict or None",
                )),
            },
        );
        let command: Vec<String> = s.worker_command.clone();
        let supervised = match (workers, port_base) {
            (Some(count), Some(base)) if base + count - 1 > 65535 => {
                p.check::<()>(Err(invalid(
                    "worker-port-base",
                    &s.worker_port_base,
                    format!("{count} workers from this port run past 65535"),
                )));
                None
            }
            (Some(n), _) if n > 1 && command.is_empty() => {
                p.check::<()>(Err(invalid(
                    "workers",
                    &s.workers,
                    "several workers need the worker command after `--` \
                     (chatgate --workers 2 -- chainlit run app.py --port {port})",
                )));
                None
            }
            (Some(n), Some(base)) if !command.is_empty() => {
                if !command.iter().any(|arg| arg.contains("{port}")) && n > 1 {
                    p.check::<()>(Err(invalid(
                        "workers",
                        &s.workers,
                        "the worker command must contain {port}: each worker needs its own port",
                    )));
                }
                let app_dir = s.worker_app_dir.trim();
                if !app_dir.is_empty() && !std::path::Path::new(app_dir).is_dir() {
                    p.check::<()>(Err(invalid(
                        "worker-app-dir",
                        &s.worker_app_dir,
                        "not a directory",
                    )));
                }
                Some(SupervisedConfig {
                    count: n,
                    port_base: base as u16,
                    command,
                    stop_timeout: stop_timeout?,
                    app_dir: (!app_dir.is_empty()).then(|| PathBuf::from(app_dir)),
                })
            }
            _ => None,
        };
        Some(WorkersConfig {
            supervised,
            affinity: AffinityConfig {
                cookie: cookie?,
                same_site: same_site?,
            },
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        let (workers, base, stop, dir, command) = match &self.supervised {
            Some(s) => (
                s.count.to_string(),
                s.port_base.to_string(),
                duration_line(s.stop_timeout),
                s.app_dir
                    .as_ref()
                    .map_or("(working directory)".to_owned(), |d| {
                        d.display().to_string()
                    }),
                s.command.join(" "),
            ),
            None => (
                "(--backend)".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "(none)".to_owned(),
            ),
        };
        lines.extend([
            ("workers", workers),
            ("worker_port_base", base),
            ("worker_stop_timeout", stop),
            ("worker_app_dir", dir),
            ("worker_command", command),
            ("affinity_cookie", self.affinity.cookie.clone()),
            (
                "affinity_samesite",
                self.affinity.same_site.as_str().to_owned(),
            ),
        ]);
    }
}

/// A cookie name is an RFC 6265 §4.1.1 token (RFC 9110 `tchar`s); kept short.
fn cookie_name(value: &str) -> Result<String, super::ConfigError> {
    let name = value.trim();
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > 64 || !name.bytes().all(tchar) {
        return Err(invalid(
            "affinity-cookie",
            value,
            "expected a cookie name: 1 to 64 letters, digits or !#$%&'*+-.^_`|~",
        ));
    }
    Ok(name.to_owned())
}
