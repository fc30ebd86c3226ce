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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
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

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting, lets open requests finish and returns when every connection
/// has closed. A request head must be complete within `head_timeout` of
/// its first byte, or the connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    head_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = http1::Builder::new();
    builder
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let check_every = (head_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
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
                let cw = Arc::new(ConnWatch(Mutex::new(Phase::Idle(Instant::now()))));
                let (on_request, on_response) = (cw.clone(), cw.clone());
                let service = app
                    .clone()
                    .map_request(move |mut req: hyper::Request<Incoming>| {
                        on_request.set(Phase::Serving);
                        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                        req
                    })
                    .map_response(move |resp| {
                        on_response.set(Phase::Idle(Instant::now()));
                        resp
                    });
                let io = TokioIo::new(WatchedIo { inner: stream, watch: cw.clone() });
                let conn = builder.serve_connection(io, TowerToHyperService::new(service));
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
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
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
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
