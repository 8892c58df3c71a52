//! The backend: how chatgate reaches it (the pooled HTTP client and the WebSocket leg's
//! transport), what it knows of its health (the probe and its verdict), and, with several
//! workers, which worker a request belongs to (`pool`, `affinity`, `sessions`) and the
//! workers chatgate starts itself (`supervisor`).

pub mod affinity;
pub mod client;
pub mod health;
pub mod pool;
pub mod sessions;
pub mod supervisor;
