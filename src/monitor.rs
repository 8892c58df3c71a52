//! The probe routes, `/monitor/live` and `/monitor/health`, answered the same way on the
//! public and the admin listener.

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::json;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::responses;
use crate::state::Gateway;

/// Which probe route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Liveness: 200 whenever the process serves.
    Live,
    /// Readiness: 200 while the backend is reachable and chatgate is not draining.
    Health,
}

/// Answers a probe; only `GET` and `HEAD` are allowed.
pub fn answer(
    probe: Probe,
    method: &Method,
    gateway: &Gateway,
) -> Result<Response<ProxyBody>, ProxyError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed);
    }
    Ok(match probe {
        Probe::Live => responses::json(
            StatusCode::OK,
            Bytes::from_static(b"{\"status\":\"alive\"}\n"),
        ),
        Probe::Health => {
            let (status, doc) = health_document(gateway);
            responses::json(status, Bytes::from(format!("{doc}\n")))
        }
    })
}

/// The readiness document and its status: 200 when the backend (at least one worker) is
/// reachable and we are not draining, 503 otherwise.
///
/// `backend` is the one backend's report; with several workers it sums them up (`reachable`
/// while any is, `workers_up` of `workers`), and `workers` lists each worker either way.
pub fn health_document(gateway: &Gateway) -> (StatusCode, serde_json::Value) {
    let workers = &gateway.workers;
    let reachable = workers.any_reachable();
    let (status, code) = match (gateway.is_draining(), reachable) {
        (true, _) => ("draining", StatusCode::SERVICE_UNAVAILABLE),
        (false, true) => ("ok", StatusCode::OK),
        (false, false) => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
    };
    let gauges = gateway.gauges();
    let backend = if workers.several() {
        let up = workers
            .all()
            .iter()
            .filter(|w| w.health.is_reachable())
            .count();
        json!({
            "reachable": reachable,
            "workers": workers.len(),
            "workers_up": up,
            "sessions_known": workers.sessions.len(),
        })
    } else {
        let worker = workers.first();
        worker.health.report(&worker.backend.url.display)
    };
    let doc = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": gateway.uptime().as_secs(),
        "backend": backend,
        "workers": workers.report(),
        "connections": {
            "clients": gauges.client_connections,
            "websockets": gauges.websocket_relays,
        },
        "chat": {
            "answers_in_progress": gateway.chat.limits.in_progress(),
        },
    });
    (code, doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};
    use std::time::Duration;

    fn gateway() -> Gateway {
        let cli = Cli::parse_with(["chatgate"], |_| None).unwrap();
        Gateway::new(Config::from_settings(&cli.settings).unwrap())
    }

    #[tokio::test]
    async fn document_reports_state_and_draining() {
        let gw = gateway();
        let (code, doc) = health_document(&gw);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(doc["status"], "unavailable");
        gw.workers
            .first()
            .health
            .record(Ok(Duration::from_micros(1500)));
        let (code, doc) = health_document(&gw);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(doc["backend"]["reachable"], true);
        assert_eq!(doc["backend"]["latency_ms"], 1.5);
        assert_eq!(doc["workers"][0]["reachable"], true);
        assert_eq!(doc["workers"][0]["index"], 0);
        let _relay = gw.load.websocket_relay();
        let (_, doc) = health_document(&gw);
        assert_eq!(doc["connections"]["websockets"], 1);
        gw.set_draining();
        let (code, doc) = health_document(&gw);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(doc["status"], "draining");
    }

    #[tokio::test]
    async fn probes_take_only_get_and_head() {
        let gw = gateway();
        assert!(answer(Probe::Live, &Method::HEAD, &gw).is_ok());
        assert!(matches!(
            answer(Probe::Health, &Method::POST, &gw),
            Err(ProxyError::MethodNotAllowed)
        ));
    }
}
