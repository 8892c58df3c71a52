//! chatgate: a reverse proxy for Chainlit apps. Streams HTTP both ways, relays WebSockets
//! message by message, answers the platform's probes, and drains on shutdown.
//!
//! `main.rs` parses the configuration and calls [`server::run`]; everything else lives here.
//! Layers, each importing only from those below it:
//!
//! - `server` (accept loop, drain, the watched client socket of `client_io`) and `admin`
//!   (metrics port) call
//! - `gateway` (the request pipeline), which calls
//! - `proxy` (`forward`, `websocket`: moving bytes to the backend) and `monitor` (probes),
//!   which use
//! - `state` (shared handles), `backend` (client, probe), `asset_cache` (content-hashed
//!   static files from memory; the pipeline hands it the forwarder), `limits`, `telemetry`,
//!   `body`, `error`, `responses`, `proxy::headers` (pure functions over the request's
//!   `RequestContext`, defined in `proxy/mod.rs`), and the leaves `config`, `routes`,
//!   `metrics`, `asset_cache::{negotiate, policy}`, `client_io`, `ascii` (hot-path
//!   formatting).

pub mod asset_cache;
pub mod config;
pub mod healthcheck;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod telemetry;

mod admin;
mod ascii;
mod backend;
mod body;
mod chat;
mod client_io;
mod error;
mod gateway;
mod limits;
mod metrics;
mod monitor;
mod responses;
mod state;
mod timer;
