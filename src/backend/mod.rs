//! The backend: how chatgate reaches it (the transport, and the keep-alive connection each
//! client connection owns, `owned`), what it knows of its health (the probe and its verdict), and, with several
//! workers, which worker a request belongs to (`pool`, `affinity`, `sessions`) and the
//! workers chatgate starts itself (`supervisor`).

pub mod affinity;
pub mod client;
pub mod health;
pub mod owned;
pub mod pool;
pub mod sessions;
pub mod supervisor;
