//! chatgate: a reverse proxy for Chainlit apps. Streams HTTP both ways, relays WebSockets
//! message by message, answers the platform's probes, and drains on shutdown.
//!
//! `main.rs` parses the configuration and calls [`server::run`]; everything else lives here.

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod gateway;
pub mod health;
pub mod healthcheck;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod telemetry;
