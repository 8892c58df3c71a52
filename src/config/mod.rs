//! Configuration: flags and `CHATGATE_*` variables parsed once by clap into [`Settings`]
//! (all strings), then validated into the typed [`Config`] the rest of the code uses.
//!
//! Each component keeps its settings in its own file (as linkerd2-proxy does): the clap
//! struct, the typed struct, their validation and their `check-config` lines side by side,
//! so a new setting is added in one file. Validation reports every bad setting, one line
//! each, not only the first.
//!
//! Parsing takes the environment as a lookup function, so tests pass a map instead of
//! mutating the process environment (which races between tests and is `unsafe` in 2024).

mod asset_cache;
mod backend;
mod chat;
mod health;
mod limits;
mod routes;
mod server;
mod shutdown;
mod values;
mod websocket;
mod workers;

use std::ffi::OsString;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

pub use asset_cache::{AssetCacheConfig, AssetCacheSettings};
pub use backend::{BackendConfig, BackendSettings, BackendUrl, parse_backend};
pub use chat::{ChatConfig, ChatSettings};
pub use health::{HealthConfig, HealthSettings};
pub use limits::{
    LimitsConfig, LimitsSettings, Rate, parse_origin, parse_rate, parse_trusted_proxies,
};
pub use routes::{AuthStubMode, DEFAULT_AUTH_STUB, RoutesConfig, RoutesSettings};
pub use server::{LogFormat, ServerConfig, ServerSettings};
pub use shutdown::{ShutdownConfig, ShutdownSettings};
pub use values::{ConfigError, ConfigErrors};
pub use websocket::{WebSocketConfig, WebSocketSettings};
pub use workers::{
    AffinityConfig, MAX_WORKERS, SameSite, SupervisedConfig, WorkersConfig, WorkersSettings,
    available_cpus,
};

use values::Problems;

/// The command line: `chatgate [serve flags]`, `chatgate check-config`, `chatgate healthcheck`.
#[derive(Debug, Parser)]
#[command(
    name = "chatgate",
    version,
    about = "A reverse proxy for Chainlit apps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
    /// Ask a running chatgate's /monitor/health; exit 0 when it answers 200, else 1.
    Healthcheck,
}

/// Every setting, as the user wrote it, grouped by the component that reads it. Each is a
/// flag and a `CHATGATE_*` variable.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub backend: BackendSettings,
    #[command(flatten)]
    pub routes: RoutesSettings,
    #[command(flatten)]
    pub health: HealthSettings,
    #[command(flatten)]
    pub websocket: WebSocketSettings,
    #[command(flatten)]
    pub limits: LimitsSettings,
    #[command(flatten)]
    pub shutdown: ShutdownSettings,
    #[command(flatten)]
    pub chat: ChatSettings,
    #[command(flatten)]
    pub asset_cache: AssetCacheSettings,
    #[command(flatten)]
    pub workers: WorkersSettings,
}

impl Cli {
    /// Parses `args` (program name first) with `env` as the source of `CHATGATE_*` values.
    ///
    /// clap reads the process environment itself; to keep tests hermetic, each argument's
    /// variable is looked up through `env` and turned into that argument's default instead.
    pub fn parse_with(
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Cli, clap::Error> {
        let mut command = Cli::command();
        let overrides: Vec<(clap::Id, String)> = command
            .get_arguments()
            .filter_map(|arg| {
                let name = arg.get_env()?.to_str()?;
                env(name).map(|value| (arg.get_id().clone(), value))
            })
            .collect();
        for (id, value) in overrides {
            command = command.mut_arg(id, |arg| arg.env(None).default_value(value));
        }
        let matches = command.try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }
}

/// Validated configuration. Durations are real durations, addresses real addresses.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub backend: BackendConfig,
    pub routes: RoutesConfig,
    pub health: HealthConfig,
    pub websocket: WebSocketConfig,
    pub limits: LimitsConfig,
    pub shutdown: ShutdownConfig,
    pub chat: ChatConfig,
    pub asset_cache: AssetCacheConfig,
    pub workers: WorkersConfig,
}

impl Config {
    /// Validates every setting; every bad one is reported, one line each.
    pub fn from_settings(s: &Settings) -> Result<Config, ConfigErrors> {
        let mut problems = Problems::default();
        let server = ServerConfig::validate(&s.server, &mut problems);
        let backend = BackendConfig::validate(&s.backend, &mut problems);
        let routes = RoutesConfig::validate(&s.routes, &mut problems);
        let health = HealthConfig::validate(&s.health, &mut problems);
        let websocket = WebSocketConfig::validate(&s.websocket, &mut problems);
        let limits = LimitsConfig::validate(&s.limits, &mut problems);
        let shutdown = ShutdownConfig::validate(&s.shutdown, &mut problems);
        let asset_cache = AssetCacheConfig::validate(&s.asset_cache, &mut problems);
        let workers = WorkersConfig::validate(&s.workers, &mut problems);
        if let (Some(backend), Some(workers)) = (&backend, &workers) {
            if workers.supervised.is_some() && backend.urls.len() > 1 {
                problems.check::<()>(Err(ConfigError {
                    flag: "--workers".into(),
                    env: "CHATGATE_WORKERS".into(),
                    value: s.workers.workers.clone(),
                    reason: "chatgate starts the workers itself (a command after `--`), so \
                             --backend / CHATGATE_BACKEND must be one URL, not a list"
                        .into(),
                }));
            }
        }
        let chat = ChatConfig::validate(&s.chat, &mut problems);
        match (
            server,
            backend,
            routes,
            health,
            websocket,
            limits,
            shutdown,
            asset_cache,
            workers,
            chat,
        ) {
            (
                Some(server),
                Some(backend),
                Some(routes),
                Some(health),
                Some(websocket),
                Some(limits),
                Some(shutdown),
                Some(asset_cache),
                Some(workers),
                Some(chat),
            ) if problems.is_empty() => Ok(Config {
                server,
                backend,
                routes,
                health,
                websocket,
                limits,
                shutdown,
                asset_cache,
                workers,
                chat,
            }),
            _ => Err(problems.into_errors()),
        }
    }

    /// Every worker's URL, in index order: the supervised workers on `--backend`'s host at
    /// `--worker-port-base + i`, or `--backend`'s list.
    pub fn worker_urls(&self) -> Vec<BackendUrl> {
        let Some(supervised) = &self.workers.supervised else {
            return self.backend.urls.clone();
        };
        let url = &self.backend.url;
        (0..supervised.count)
            .filter_map(|i| {
                let port = supervised.port(i);
                parse_backend(&format!("{}://{}:{port}", url.scheme, url.authority.host())).ok()
            })
            .collect()
    }

    /// The effective configuration as `key = value` lines for `check-config`. The backend is
    /// shown without credentials; the stub body by its size only.
    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        self.server.describe(&mut lines);
        self.backend.describe(&mut lines);
        self.routes.describe(&mut lines);
        self.health.describe(&mut lines);
        self.websocket.describe(&mut lines);
        self.limits.describe(&mut lines);
        self.shutdown.describe(&mut lines);
        self.asset_cache.describe(&mut lines);
        self.workers.describe(&mut lines);
        self.chat.describe(&mut lines);
        lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use std::collections::HashMap;
    use std::time::Duration;

    fn config(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = std::iter::once("chatgate").chain(args.iter().copied());
        let cli = Cli::parse_with(argv, |k| env.get(k).cloned()).map_err(|e| e.to_string())?;
        Config::from_settings(&cli.settings).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_listen_on_8000_in_front_of_8080() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.backend.url.display, "http://127.0.0.1:8080");
        assert_eq!(
            c.routes.chat_redirect_status,
            StatusCode::TEMPORARY_REDIRECT
        );
        assert_eq!(c.routes.auth_stub, AuthStubMode::On);
        assert_eq!(c.shutdown.grace, Duration::from_secs(20));
        assert!(c.backend.wait.is_none());
        assert!(c.limits.trusted_proxies.is_empty());
    }

    #[test]
    fn environment_sets_values_and_flags_win_over_it() {
        let env = [
            ("CHATGATE_LISTEN", "127.0.0.1:9000"),
            ("CHATGATE_BACKEND", "http://b:1"),
        ];
        let c = config(&[], &env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.backend.url.display, "http://b:1");
        let c = config(&["--listen", "127.0.0.1:9001"], &env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9001".parse().unwrap());
    }

    #[test]
    fn bad_values_name_the_setting() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case<'_>] = &[
            (
                &["--backend", "ftp://x"],
                &[],
                "--backend / CHATGATE_BACKEND",
            ),
            (&["--backend", "http://"], &[], "CHATGATE_BACKEND"),
            (&["--backend", "http://x/app"], &[], "CHATGATE_BACKEND"),
            (&[], &[("CHATGATE_LISTEN", "nowhere")], "CHATGATE_LISTEN"),
            (
                &["--trusted-proxies", "10.0.0.0/8,bogus"],
                &[],
                "CHATGATE_TRUSTED_PROXIES",
            ),
            (&["--auth-stub", "maybe"], &[], "CHATGATE_AUTH_STUB"),
            (
                &["--auth-stub-file", "/nonexistent/stub.json"],
                &[],
                "CHATGATE_AUTH_STUB_FILE",
            ),
            (
                &["--chat-redirect-status", "200"],
                &[],
                "CHATGATE_CHAT_REDIRECT_STATUS",
            ),
            (&["--shutdown-grace=-1"], &[], "CHATGATE_SHUTDOWN_GRACE"),
            (&["--health-interval", "0"], &[], "CHATGATE_HEALTH_INTERVAL"),
            (
                &["--socketio-path", "ws/socket.io"],
                &[],
                "CHATGATE_SOCKETIO_PATH",
            ),
            (&["--max-headers", "lots"], &[], "CHATGATE_MAX_HEADERS"),
            (
                &["--rate-limit-websocket", "10/fortnight"],
                &[],
                "CHATGATE_RATE_LIMIT_WEBSOCKET",
            ),
            (
                &["--allowed-origins", "chat.example"],
                &[],
                "CHATGATE_ALLOWED_ORIGINS",
            ),
            (
                &["--harden-cookies", "maybe"],
                &[],
                "CHATGATE_HARDEN_COOKIES",
            ),
            (&["--admin-listen", "9100"], &[], "CHATGATE_ADMIN_LISTEN"),
            (&["--max-body-bytes", "1G"], &[], "CHATGATE_MAX_BODY_BYTES"),
            (
                &["--asset-cache-bytes", "64M"],
                &[],
                "CHATGATE_ASSET_CACHE_BYTES",
            ),
            (
                &["--asset-cache-max-file", "0"],
                &[],
                "CHATGATE_ASSET_CACHE_MAX_FILE",
            ),
            (
                &["--asset-cache-paths", "/assets/,static"],
                &[],
                "CHATGATE_ASSET_CACHE_PATHS",
            ),
            (
                &[],
                &[("CHATGATE_ASSET_CACHE_PATHS", "/a%2Fb/")],
                "CHATGATE_ASSET_CACHE_PATHS",
            ),
            (
                &["--asset-cache-revalidate", "0"],
                &[],
                "CHATGATE_ASSET_CACHE_REVALIDATE",
            ),
            (&["--workers", "0"], &[], "CHATGATE_WORKERS"),
            (&["--workers", "lots"], &[], "CHATGATE_WORKERS"),
            (&["--workers", "2"], &[], "CHATGATE_WORKERS"),
            (&["--workers", "2", "--", "x"], &[], "CHATGATE_WORKERS"),
            (
                &[
                    "--workers",
                    "2",
                    "--backend",
                    "http://a:1,http://b:2",
                    "--",
                    "x",
                    "{port}",
                ],
                &[],
                "CHATGATE_BACKEND",
            ),
            (
                &[
                    "--workers",
                    "3",
                    "--worker-port-base",
                    "65534",
                    "--",
                    "x",
                    "{port}",
                ],
                &[],
                "CHATGATE_WORKER_PORT_BASE",
            ),
            (
                &["--backend", "http://a:1,,http://b:2"],
                &[],
                "CHATGATE_BACKEND",
            ),
            (
                &["--backend", "http://a:1,http://a:1"],
                &[],
                "CHATGATE_BACKEND",
            ),
            (
                &["--affinity-samesite", "maybe"],
                &[],
                "CHATGATE_AFFINITY_SAMESITE",
            ),
            (
                &["--affinity-cookie", "a b"],
                &[],
                "CHATGATE_AFFINITY_COOKIE",
            ),
            (
                &["--worker-stop-timeout", "0"],
                &[],
                "CHATGATE_WORKER_STOP_TIMEOUT",
            ),
        ];
        for (args, env, expected) in cases {
            let err = config(args, env).unwrap_err();
            assert!(err.contains(expected), "{args:?} {env:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }

    #[test]
    fn every_bad_setting_is_reported_not_only_the_first() {
        let err = config(
            &[
                "--listen",
                "nowhere",
                "--ws-ping-interval",
                "0",
                "--shutdown-grace",
                "x",
            ],
            &[("CHATGATE_BACKEND", "ftp://x")],
        )
        .unwrap_err();
        assert_eq!(err.lines().count(), 4, "{err}");
        for name in [
            "CHATGATE_LISTEN",
            "CHATGATE_WS_PING_INTERVAL",
            "CHATGATE_SHUTDOWN_GRACE",
            "CHATGATE_BACKEND",
        ] {
            assert!(err.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn asset_cache_defaults_and_off_switch() {
        let c = config(&[], &[]).unwrap();
        assert!(c.asset_cache.is_enabled());
        assert_eq!(c.asset_cache.max_bytes, 64 << 20);
        assert_eq!(c.asset_cache.max_file, 16 << 20);
        assert_eq!(c.asset_cache.paths, ["/assets/"]);
        assert_eq!(c.asset_cache.revalidate, Duration::from_secs(60));
        let off = config(&["--asset-cache-bytes", "0"], &[]).unwrap();
        assert!(!off.asset_cache.is_enabled());
        assert!(off.describe().contains("asset_cache_bytes = 0 (off)"));
        let two = config(
            &[],
            &[("CHATGATE_ASSET_CACHE_PATHS", " /assets/, /public/ ")],
        )
        .unwrap();
        assert_eq!(two.asset_cache.paths, ["/assets/", "/public/"]);
        let none = config(&["--asset-cache-paths", ""], &[]).unwrap();
        assert!(!none.asset_cache.is_enabled());
    }

    #[test]
    fn backend_credentials_never_reach_the_display_form() {
        let b = parse_backend("https://user:secret@app.internal:8443").unwrap();
        assert_eq!(b.display, "https://app.internal:8443");
        assert_eq!(b.port, 8443);
        assert!(!format!("{b:?}").contains("secret"));
        let c = config(&["--backend", "http://u:hunter2@127.0.0.1:9"], &[]).unwrap();
        assert!(!c.describe().contains("hunter2"));
    }

    #[test]
    fn describe_lists_every_setting_once() {
        let c = config(&[], &[]).unwrap();
        let text = c.describe();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        let mut unique = keys.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(keys.len(), unique.len(), "{text}");
        // Every flag of the command line has its line (flag names use '-', keys '_').
        let command = Cli::command();
        for arg in command.get_arguments() {
            if let Some(flag) = arg.get_long() {
                if flag == "auth-stub-file" {
                    assert!(keys.contains(&"auth_stub_body"), "{text}");
                    continue;
                }
                let key = flag.replace('-', "_");
                assert!(keys.contains(&key.as_str()), "{key} missing: {text}");
            }
        }
    }

    #[test]
    fn workers_take_a_command_with_a_port_each() {
        let c = config(
            &[
                "--workers",
                "2",
                "--worker-port-base",
                "9001",
                "--",
                "chainlit",
                "run",
                "app.py",
                "--port={port}",
            ],
            &[],
        )
        .unwrap();
        let supervised = c.workers.supervised.as_ref().unwrap();
        assert_eq!(supervised.count, 2);
        assert_eq!(
            supervised.command_for(1),
            ["chainlit", "run", "app.py", "--port=9002"]
        );
        let urls: Vec<String> = c.worker_urls().into_iter().map(|u| u.display).collect();
        assert_eq!(urls, ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]);
        let auto = config(&["--workers", "auto", "--", "x", "{port}"], &[]).unwrap();
        assert_eq!(
            auto.workers.supervised.unwrap().count,
            available_cpus().min(MAX_WORKERS)
        );
    }

    #[test]
    fn one_worker_and_no_command_is_todays_single_backend() {
        let c = config(&[], &[]).unwrap();
        assert!(c.workers.supervised.is_none());
        assert_eq!(c.worker_urls().len(), 1);
        let listed = config(&[], &[("CHATGATE_BACKEND", "http://a:1, http://b:2")]).unwrap();
        assert_eq!(listed.worker_urls().len(), 2);
        assert_eq!(listed.backend.url.display, "http://a:1");
        assert_eq!(listed.workers.affinity.cookie, "chatgate_worker");
        assert_eq!(listed.workers.affinity.same_site, SameSite::Lax);
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::parse_with(["chatgate", "check-config"], |_| None).unwrap();
        assert_eq!(cli.command, Some(Command::CheckConfig));
        let cli = Cli::parse_with(
            ["chatgate", "healthcheck", "--listen", "127.0.0.1:1"],
            |_| None,
        )
        .unwrap();
        assert_eq!(cli.command, Some(Command::Healthcheck));
        assert_eq!(cli.settings.server.listen, "127.0.0.1:1");
    }
}
