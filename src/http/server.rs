//! The node's HTTP/1.1 server: `axum::serve` with the limits it cannot set.
//!
//! `axum::serve` gives hyper no timer, so a client that sends its request
//! head a byte at a time (slowloris) holds a connection and a task forever.
//! hyper's own header read timeout does not fit either: its clock also runs
//! while a keep-alive connection waits for the next request, so it closes
//! idle pooled connections just as clients send on them. This loop serves
//! the same router (with the caller's address as `ConnectInfo<SocketAddr>`
//! and graceful shutdown, as `axum::serve` does) and watches each
//! connection: a request head must be complete within the read timeout of
//! its first byte, and a connection idle between requests for
//! [`KEEP_ALIVE_IDLE`] is closed.
//!
//! With [`ServeOptions::tls`] the listener speaks HTTPS only (rustls, the
//! certificate current at each handshake; see [`crate::tls`]): the
//! handshake must finish within the head deadline, a plain HTTP request
//! gets a `400` saying to use `https://`, and requests on a connection
//! whose client presented a CA-verified certificate carry [`PeerCertified`].
//! Connection caps, in all and per client address, refuse a connection at
//! once (`503` or `429`, plain HTTP only) instead of queueing it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::tls::{PeerCertified, Tls};

/// Largest request head (request line and headers) accepted; beyond it
/// hyper answers `431` and closes the connection.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most header fields in one request (hyper's default); beyond it `431`.
pub const MAX_HEADERS: usize = 100;
/// A keep-alive connection idle this long between requests is closed.
/// Longer than the idle timeout of common client pools (reqwest: 90 s), so
/// that the close does not race a pooled client's next request.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(120);

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request, since then.
    Idle(Instant),
    /// Bytes of a request head arrived, the first one then.
    Head(Instant),
    /// A request is being served (its body may still be arriving: the
    /// public routes bound that with their own deadline).
    Serving,
}

enum Overdue {
    Head,
    Idle,
}

#[derive(Debug)]
struct ConnWatch(Mutex<Phase>);

impl ConnWatch {
    fn set(&self, p: Phase) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn bytes_read(&self) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Phase::Idle(_) = *p {
            *p = Phase::Head(Instant::now());
        }
    }

    fn overdue(&self, head: Duration) -> Option<Overdue> {
        match *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Head(t) if t.elapsed() > head => Some(Overdue::Head),
            Phase::Idle(t) if t.elapsed() > KEEP_ALIVE_IDLE => Some(Overdue::Idle),
            _ => None,
        }
    }
}

/// A TCP stream that tells its [`ConnWatch`] when bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    watch: Arc<ConnWatch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_read();
        }
        r
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a listener serves: its deadlines, TLS and connection caps.
#[derive(Clone)]
pub struct ServeOptions {
    /// A request head must be complete within this of its first byte (a
    /// TLS handshake too), or the connection is closed.
    pub head_timeout: Duration,
    /// HTTPS only when set.
    pub tls: Option<Arc<Tls>>,
    /// Most connections open at once; beyond it a new one gets `503` and is
    /// closed. 0 = no cap.
    pub max_connections: usize,
    /// Most connections open at once from one client address (IPv6: one
    /// /64); beyond it a new one gets `429` and is closed. 0 = no cap.
    pub max_connections_per_ip: usize,
    /// Counts refused connections by reason (`total`, `per_ip`,
    /// `plain_http`, `tls_handshake`), when given.
    pub refused: Option<prometheus::IntCounterVec>,
    /// Tracks the open connections, when given.
    pub open: Option<prometheus::IntGauge>,
}

impl ServeOptions {
    /// Plain HTTP, no caps.
    pub fn plain(head_timeout: Duration) -> Self {
        Self {
            head_timeout,
            tls: None,
            max_connections: 0,
            max_connections_per_ip: 0,
            refused: None,
            open: None,
        }
    }

    fn count_refused(&self, reason: &str) {
        if let Some(r) = &self.refused {
            r.with_label_values(&[reason]).inc();
        }
    }
}

/// Open connections, in all and per client address.
#[derive(Default)]
struct OpenConnections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Releases a connection's place when the connection ends.
struct ConnSlot {
    open: Arc<Mutex<OpenConnections>>,
    key: IpAddr,
    gauge: Option<prometheus::IntGauge>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.per_ip.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                o.per_ip.remove(&self.key);
            }
        }
        if let Some(g) = &self.gauge {
            g.dec();
        }
    }
}

/// A short answer written straight to a connection that is refused before
/// HTTP is spoken on it.
/// The body has the API's error shape: `{"error": code, "message": ...}`.
async fn refuse_raw(
    mut stream: TcpStream,
    status: &str,
    code: &str,
    retry_after: bool,
    message: &str,
) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let retry = if retry_after {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        use tokio::io::AsyncReadExt;
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        // Read what the client sent until it closes (lingering close):
        // closing with its request unread would reset the connection, and
        // the client could lose the answer.
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting, lets open requests finish and returns when every connection
/// has closed. A request head must be complete within `head_timeout` of
/// its first byte, or the connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = http1::Builder::new();
    builder
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let head_timeout = opts.head_timeout;
    let check_every = (head_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let open = Arc::new(Mutex::new(OpenConnections::default()));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                };
                let key = super::limit::ip_key(peer.ip());
                let refusal = {
                    let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
                    let from_ip = o.per_ip.get(&key).copied().unwrap_or(0);
                    if opts.max_connections > 0 && o.total >= opts.max_connections {
                        Some("total")
                    } else if opts.max_connections_per_ip > 0 && from_ip >= opts.max_connections_per_ip {
                        Some("per_ip")
                    } else {
                        o.total += 1;
                        *o.per_ip.entry(key).or_default() += 1;
                        None
                    }
                };
                if let Some(reason) = refusal {
                    opts.count_refused(reason);
                    tracing::debug!(%peer, reason, "connection refused: too many open connections");
                    // Over a cap, a TLS listener closes at once (an answer
                    // would need a handshake, which is what the cap saves).
                    if opts.tls.is_none() {
                        let (status, code, message) = if reason == "total" {
                            ("503 Service Unavailable", "unavailable", format!("this server has {} connections open, its limit; retry later", opts.max_connections))
                        } else {
                            ("429 Too Many Requests", "too_many_requests", format!("this client address has {} connections open, the limit per address", opts.max_connections_per_ip))
                        };
                        connections.spawn(async move { refuse_raw(stream, status, code, true, &message).await });
                    }
                    continue;
                }
                if let Some(g) = &opts.open {
                    g.inc();
                }
                let slot = ConnSlot { open: open.clone(), key, gauge: opts.open.clone() };
                let conn = Conn {
                    app: app.clone(),
                    builder: builder.clone(),
                    peer,
                    head_timeout,
                    check_every,
                    stop: stop_rx.clone(),
                };
                let opts = opts.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    match opts.tls.clone() {
                        None => {
                            let cw = Conn::new_watch();
                            let io = WatchedIo { inner: stream, watch: cw.clone() };
                            conn.drive(io, cw, false).await;
                        }
                        Some(tls) => conn.drive_tls(stream, &tls, &opts).await,
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// One accepted connection and what serving it needs.
struct Conn {
    app: Router,
    builder: http1::Builder,
    peer: SocketAddr,
    head_timeout: Duration,
    check_every: Duration,
    stop: watch::Receiver<bool>,
}

impl Conn {
    fn new_watch() -> Arc<ConnWatch> {
        Arc::new(ConnWatch(Mutex::new(Phase::Idle(Instant::now()))))
    }

    /// The TLS handshake (within the head deadline), then HTTP. A client
    /// speaking plain HTTP gets a `400` that says to use `https://`.
    async fn drive_tls(self, stream: TcpStream, tls: &Tls, opts: &ServeOptions) {
        let peer = self.peer;
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(self.head_timeout, stream.peek(&mut first)).await;
        match peeked {
            Ok(Ok(1)) => {}
            _ => return,
        }
        // A TLS record starts with 0x16 (handshake); a request line with a
        // method's first letter.
        if first[0].is_ascii_alphabetic() {
            opts.count_refused("plain_http");
            refuse_raw(
                stream,
                "400 Bad Request",
                "invalid_request",
                false,
                "this server speaks HTTPS only: use https:// in the URL",
            )
            .await;
            return;
        }
        let cw = Self::new_watch();
        cw.bytes_read();
        let io = WatchedIo {
            inner: stream,
            watch: cw.clone(),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let mut stop = self.stop.clone();
        let accepted = tokio::select! {
            r = tokio::time::timeout(self.head_timeout, acceptor.accept(io)) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                opts.count_refused("tls_handshake");
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                opts.count_refused("tls_handshake");
                tracing::debug!(%peer, "TLS handshake not complete in time: connection closed");
                return;
            }
        };
        // The verifier accepted whatever certificate was presented.
        let certified = tls.mutual() && stream.get_ref().1.peer_certificates().is_some();
        cw.set(Phase::Idle(Instant::now()));
        self.drive(stream, cw, certified).await
    }

    /// Serves HTTP/1.1 on `io` until the connection ends, closing it when a
    /// request head is overdue or it has been idle too long.
    async fn drive<I>(self, io: I, cw: Arc<ConnWatch>, certified: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            builder,
            peer,
            head_timeout,
            check_every,
            mut stop,
        } = self;
        let (on_request, on_response) = (cw.clone(), cw.clone());
        let service = app
            .map_request(move |mut req: hyper::Request<Incoming>| {
                on_request.set(Phase::Serving);
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                if certified {
                    req.extensions_mut().insert(PeerCertified);
                }
                req
            })
            .map_response(move |resp| {
                on_response.set(Phase::Idle(Instant::now()));
                resp
            });
        let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let mut conn = std::pin::pin!(conn);
        let mut tick = tokio::time::interval(check_every);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = tick.tick() => match cw.overdue(head_timeout) {
                    Some(Overdue::Head) => {
                        tracing::debug!(%peer, "request head not complete in time: connection closed");
                        return;
                    }
                    Some(Overdue::Idle) if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                },
            }
        }
    }
}

async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    // Out of file descriptors, most likely: give connections time to close.
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
