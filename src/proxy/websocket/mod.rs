//! The WebSocket relay: a client's upgrade is answered only after the backend accepted its
//! own (RFC 6455 §4), then messages travel one by one through tokio-tungstenite on both
//! legs, so that chatgate can count, limit, keep alive and close them properly.
//!
//! `handshake.rs` holds the opening handshake of both legs, `pump.rs` the message pump and
//! its close policy, `liveness.rs` the rules that give up on a client (no answer to a ping,
//! no byte taken), `stats.rs` the relay's counts and access line; this file wires them.

pub mod handshake;
pub mod liveness;
pub mod pump;
pub mod stats;

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::backend::affinity::{is_sane_sid, query_param, unknown_session};
use crate::backend::client::{LegError, connect_stream};
use crate::backend::pool::{Pin, Target};
use crate::body::ProxyBody;
use crate::chat::ChatRelay;
use crate::chat::limits::ChatClient;
use crate::client_io::ConnectionWatch;
use crate::error::ProxyError;
use crate::proxy::RequestContext;
use crate::proxy::headers::{backend_request_head, detached};
use crate::state::Gateway;
use handshake::{
    BackendAnswer, backend_handshake, backend_handshake_request, switching_protocols,
    validate_handshake,
};
use liveness::WriteWatch;
use pump::{CLOSE_TIMEOUT, RelaySettings, close_frame};
use stats::{RelayLine, RelayStats};

/// Each leg's read buffer. tungstenite allocates it eagerly (default 128 KiB, ~256 KiB per
/// relay); chat messages are small, and a larger message just takes more reads.
pub const READ_BUFFER: usize = 512;
/// Bytes of small messages gathered before a write; a flush happens anyway whenever the
/// sending side has nothing more ready, so this only batches bursts.
pub const WRITE_BUFFER: usize = 8 * 1024;

/// Relays a WebSocket upgrade: backend first, then the client's 101, then messages.
///
/// A worker that refuses the connection hands the client to another (re-pointing its
/// cookie), unless the upgrade belongs to an Engine.IO session of that worker: that gets
/// Engine.IO's "unknown session" answer, and the client reconnects.
pub async fn relay(
    gw: &Gateway,
    mut req: Request<Incoming>,
    ctx: &RequestContext,
    path_and_query: Option<PathAndQuery>,
    target: Target,
    secure: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_key = validate_handshake(&req)?;
    if gw.shutdown.is_cancelled() || gw.is_draining() {
        return Err(ProxyError::Draining);
    }
    // The relay outlives the HTTP connection it came on (hyper lets go of it at the
    // upgrade), so it holds a connection slot of its own.
    let slot = Arc::clone(&gw.connection_slots)
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let client_watch = req.extensions().get::<Arc<ConnectionWatch>>().cloned();
    let (mut parts, _body) = req.into_parts();
    let Target {
        mut worker,
        pin,
        mut set_cookie,
        ..
    } = target;
    let mut stream = loop {
        match connect_stream(&worker.backend, &gw.tls).await {
            Ok(stream) => break stream,
            Err(LegError::Refused(e)) => {
                worker.health.passive_refused();
                if pin == Pin::Session {
                    let sid = query_param(ctx.uri.query(), "sid").unwrap_or_default();
                    gw.workers.sessions.forget(sid);
                    return Ok(unknown_session(sid));
                }
                match gw.workers.fallback(&worker) {
                    Some(other) => {
                        worker = Arc::clone(other);
                        set_cookie = true;
                    }
                    None => return Err(LegError::Refused(e).into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let backend = &worker.backend;
    backend_request_head(&mut parts, ctx, backend, path_and_query);
    let ws_scheme = if backend.url.is_https() { "wss" } else { "ws" };
    let backend_uri = Uri::builder()
        .scheme(ws_scheme)
        .authority(backend.url.authority.clone())
        .path_and_query(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
        .build()
        .map_err(|_| ProxyError::BadRequest("unusable request target"))?;
    let request = backend_handshake_request(backend_uri, parts.headers);

    let config = ws_config(gw);
    let timeout = gw.config.websocket.handshake_timeout;
    let cookie = (set_cookie && gw.workers.several()).then(|| worker.set_cookie(secure));
    let epoch = worker.health.epoch();
    let answer = tokio::time::timeout(timeout, backend_handshake(&mut stream, &request)).await;
    if let Ok(Ok(_)) = &answer {
        // Whatever it answered, the backend is there.
        worker.health.passive_success(epoch);
    }
    let (backend_headers, leftover) = match answer {
        Err(_) => return Err(ProxyError::BackendTimeout(timeout)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(BackendAnswer::Refused(mut refusal))) => {
            if let Some(cookie) = cookie {
                refusal.headers_mut().append(header::SET_COOKIE, cookie);
            }
            return Ok(*refusal);
        }
        Ok(Ok(BackendAnswer::Accepted { headers, leftover })) => (headers, leftover),
    };
    // Built from what was read, so that `read_buffer_size` applies to this leg too
    // (tungstenite's own client handshake would leave its 4 KiB read buffer behind).
    let backend_ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Client, Some(config)).await;

    let mut response = switching_protocols(&client_key, &backend_headers);
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    let settings = RelaySettings {
        ping_interval: gw.config.websocket.ping_interval,
        pong_timeout: gw.config.websocket.pong_timeout,
        shutdown: gw.shutdown.clone(),
        metrics: Arc::clone(&gw.metrics),
        drain_grace: gw.config.shutdown.grace,
    };
    let mut chat = ChatRelay::new(Arc::clone(&gw.chat), chat_client(ctx), worker.index);
    let mut line = RelayLine {
        path: ctx.uri.path().to_owned(),
        // A client's id is a slice of hyper's read buffer: a clone would hold that buffer
        // for the relay's life (~3.8 KiB per idle relay, bench/NOTES.md).
        request_id: detached(&ctx.request_id),
        client: ctx.client,
        started: Instant::now(),
        stats: RelayStats::default(),
    };
    let counted = (gw.load.websocket_relay(), worker.hold_relay());
    let handshake_timeout = gw.config.websocket.handshake_timeout;
    gw.tasks.spawn(async move {
        let _slot = slot;
        // hyper hands the socket over once the 101 is written: a client that reads nothing
        // is cut by the connection's write watchdog meanwhile, and this bounds the wait too.
        let upgraded = tokio::time::timeout(handshake_timeout, on_upgrade).await;
        match upgraded {
            Ok(Ok(upgraded)) => {
                if let Some(watch) = &client_watch {
                    watch.hand_over();
                }
                let client_ws = WebSocketStream::from_raw_socket(
                    WriteWatch::new(TokioIo::new(upgraded)),
                    Role::Server,
                    Some(config),
                )
                .await;
                line.stats = pump::pump(client_ws, backend_ws, &settings, &mut chat).await;
            }
            failed => {
                line.stats.error = Some(match failed {
                    Ok(Err(e)) => format!("client upgrade failed: {e}"),
                    _ => format!("the 101 was not written within {handshake_timeout:?}"),
                });
                let mut backend_ws = backend_ws;
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT,
                    backend_ws.close(Some(close_frame(CloseCode::Away, "client went away"))),
                )
                .await;
            }
        }
        chat.finish(&line.path, line.request_id.to_str().unwrap_or("-"));
        // Counted as closed before it stops counting as open: a scrape never sees neither.
        settings.metrics.websocket_closed(line.stats.close_code);
        drop(counted);
        line.emit();
    });
    Ok(response)
}

/// Who the relay's chat messages count against: its Engine.IO session when the upgrade
/// names one (`sid`), else the client's address.
fn chat_client(ctx: &RequestContext) -> ChatClient {
    match query_param(ctx.uri.query(), "sid").filter(|sid| is_sane_sid(sid)) {
        Some(sid) => ChatClient::Session(sid.to_owned()),
        None => ChatClient::Address(ctx.client),
    }
}

fn ws_config(gw: &Gateway) -> WebSocketConfig {
    let limits = &gw.config.websocket;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + limits.max_message + 64)
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_frame))
}

#[cfg(test)]
mod future_size {
    use super::*;

    fn returned_size<A, B, C, D, R>(_f: impl Fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn an_idle_relay_holds_a_small_pump() {
        // The pump's future lives as long as the relay: with its close paths inline it
        // was 2,528 bytes (release), part of every idle relay's memory. It is also part of
        // the relay's spawned future (2,960 bytes at 4576cdb, 2,952 now), whose tokio task
        // cell sits just under jemalloc's 3,584-byte class: 8 bytes more moved it to the
        // next class, 0.5 KiB per idle relay (bench/NOTES.md). This bound does not guard
        // that edge; the bench's idle figure does.
        let size = returned_size(
            pump::pump::<TokioIo<hyper::upgrade::Upgraded>, crate::backend::client::BackendStream>,
        );
        assert!(size <= 2100, "the pump's future is {size} bytes");
    }
}
