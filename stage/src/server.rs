//! Serving HTTP connections (the gateway's ingest, the api's reads): how many may be open, and
//! how long each may take to speak.
//!
//! Invariants:
//! - at most [`ConnectionLimits::max_connections`] connections are open at once; at the cap the
//!   gateway stops accepting (new connections wait in the kernel's backlog) rather than cutting
//!   connections whose requests are in progress;
//! - no client holds a connection without speaking: a request head must be complete within
//!   [`ConnectionLimits::header_read_timeout`] of its first byte, and a connection with no
//!   request in progress is closed after [`ConnectionLimits::idle_timeout`] (the body deadline
//!   is the handler's, so it can answer 408 instead of dropping the socket);
//! - on shutdown nothing new is accepted, idle connections close at once, and requests in
//!   progress are answered before their connection closes.
//!
//! Mechanism: hyper's own header timeout also runs while a keep-alive connection waits for its
//! next request, so it cannot give header and idle limits different values. Instead each
//! connection has a `Clock`: its socket marks the first byte of a request head, the service
//! marks the start and end of each request, and a supervisor beside the connection closes it
//! when the deadline of its current state passes.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bounds on connections; see the module invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest from the first byte of a request to the end of its headers. Slow-header clients
    /// (slowloris) are what it is for; a real client sends its headers in one packet.
    pub header_read_timeout: Duration,
    /// Longest a keep-alive connection may wait for its next request. Longer than the header
    /// timeout, so batching clients keep their connections between batches.
    pub idle_timeout: Duration,
    /// Most connections open at once: every open socket costs a file descriptor and buffers,
    /// and a flood of idle ones must not exhaust them for the clients that send events.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// Marker for "no request head has started".
const NONE: u64 = u64::MAX;

/// One connection's timing state, shared by its socket, its service and its supervisor.
#[derive(Debug)]
struct Clock {
    origin: Instant,
    /// Milliseconds since `origin` when the connection last became idle (accepted, or a
    /// response produced).
    idle_since: AtomicU64,
    /// Milliseconds since `origin` of the first byte read while idle ([`NONE`] when none).
    head_started: AtomicU64,
    /// Requests whose response has not been produced yet.
    in_flight: AtomicUsize,
    /// Wakes the supervisor when the state changes (its deadline may be earlier now).
    changed: Notify,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            idle_since: AtomicU64::new(0),
            // A new connection owes its first request head from the moment it is accepted:
            // one that never sends a byte is closed at the header deadline, not held for the
            // (longer) keep-alive idle time.
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived: with no request in progress they start a request head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NONE
        {
            self.head_started.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// A request's head is complete and its handler runs until the guard drops.
    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Release);
        self.changed.notify_one();
        RequestGuard(self.clone())
    }

    /// Resolves with the name of the limit once the connection overstayed it.
    async fn expired(&self, limits: &ConnectionLimits) -> &'static str {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        loop {
            let notified = self.changed.notified();
            let now = self.now_ms();
            let head = self.head_started.load(Ordering::Acquire);
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                // The handler bounds its own work (body deadline, delivery timeout).
                None
            } else if head != NONE {
                Some((
                    head.saturating_add(millis(limits.header_read_timeout)),
                    "header_read_timeout",
                ))
            } else {
                let idle = self.idle_since.load(Ordering::Acquire);
                Some((
                    idle.saturating_add(millis(limits.idle_timeout)),
                    "idle_timeout",
                ))
            };
            match deadline {
                Some((at, limit)) if now >= at => return limit,
                Some((at, _)) => {
                    let wake = self.origin + Duration::from_millis(at);
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(wake) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// Marks its request finished (the connection idle again) when dropped, however the handler
/// ended.
#[derive(Debug)]
struct RequestGuard(Arc<Clock>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let clock = &self.0;
        clock.idle_since.store(clock.now_ms(), Ordering::Release);
        clock.in_flight.fetch_sub(1, Ordering::AcqRel);
        clock.changed.notify_one();
    }
}

/// A socket that tells its [`Clock`] when bytes arrive.
#[derive(Debug)]
struct Watched {
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// What a server counts, registered by the server's owner under its own names.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// Connections open now.
    pub open_connections: prometheus::IntGauge,
    /// Requests whose handler panicked (each answered 500 `internal`): a bug, for an alert.
    pub handler_panics: prometheus::IntCounter,
}

/// Accepts and serves connections on `listener` until `shutdown`, then waits until every
/// connection has closed (each within its limits).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut at_cap = false;
    loop {
        // A slot first: at the cap, new connections wait in the backlog, unaccepted.
        if slots.available_permits() == 0 && !at_cap {
            at_cap = true;
            tracing::warn!(
                max_connections = limits.max_connections,
                "Connection cap reached; new connections wait until one closes."
            );
        }
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        if at_cap && slots.available_permits() >= limits.max_connections / 2 {
            at_cap = false;
        }
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or a peer gone before accept: keep serving the
                    // connections we have, and try again shortly.
                    tracing::warn!(error = %e, "Accepting a connection failed.");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let shutdown = shutdown.clone();
        let open = metrics.open_connections.clone();
        let panics = metrics.handler_panics.clone();
        connections.spawn(async move {
            // Counted down however the connection ends (a panic included).
            let _open = OpenConnection::new(open);
            connection(stream, app, limits, panics, shutdown).await;
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// One open connection, counted on the gauge while it lives.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The answer to a request whose handler panicked: 500, code `internal`, as the servers'
/// other errors are written.
fn internal_error() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"error":{"code":"internal","message":"the server failed on this request; it is logged"}}"#,
    )
        .into_response()
}

/// Serves one connection until the client closes it, a limit expires, or shutdown.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    panics: prometheus::IntCounter,
    shutdown: CancellationToken,
) {
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        stream,
        clock: clock.clone(),
    });
    let requests = clock.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = requests.begin_request();
        let mut app = app.clone();
        let panics = panics.clone();
        async move {
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            // The call made inside too: what it does before its future is polled included.
            let call = async move { tower_service::Service::call(&mut app, request).await };
            // A handler that panics is a bug, but it must not take the connection down without
            // an answer (the client saw its connection reset): it is answered 500 `internal`.
            let response = match futures::FutureExt::catch_unwind(AssertUnwindSafe(call)).await {
                Ok(response) => response,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(%method, path, panic = what, "A request's handler panicked.");
                    panics.inc();
                    Ok(internal_error())
                }
            };
            drop(guard);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Replaced by the clock above, which tells header and idle time apart.
        .header_read_timeout(None::<Duration>)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "Connection ended with an error.");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            limit = clock.expired(&limits) => {
                // Dropping the connection closes the socket; nothing is in progress on it.
                tracing::debug!(limit, "Connection closed by its time limit.");
                return;
            }
        }
    }
}

/// The key of `Authorization: Bearer <key>`; the scheme is case-insensitive (RFC 9110 11.1),
/// so `bearer` and `BEARER` are read as every server of Neruba reads them.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request on a fresh connection, read to its end (the request asks to close).
    async fn get(at: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(at).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_500_and_its_connection_counted_out() {
        // Was: the connection was reset without an answer, and the open-connections gauge
        // stayed one higher for good.
        let app = Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    if std::hint::black_box(true) {
                        panic!("a handler's bug");
                    }
                    "never"
                }),
            )
            .route("/fine", axum::routing::get(|| async { "fine" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let at = listener.local_addr().expect("address");
        let metrics = ServerMetrics {
            open_connections: prometheus::IntGauge::new("open", "open connections").expect("gauge"),
            handler_panics: prometheus::IntCounter::new("panics", "handler panics")
                .expect("counter"),
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            ConnectionLimits::default(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let answer = get(at, "/boom").await;
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(
            answer.ends_with(
                r#"{"error":{"code":"internal","message":"the server failed on this request; it is logged"}}"#
            ),
            "{answer}"
        );
        // The server goes on serving, and the connection was counted out (its task no longer
        // unwinds; the count is a guard all the same, should one).
        let answer = get(at, "/fine").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("fine"),
            "{answer}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.open_connections.get() != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.open_connections.get(), 0);
        // Counted once, for the one request that panicked.
        assert_eq!(metrics.handler_panics.get(), 1);
        shutdown.cancel();
        server.await.expect("server");
    }
}
