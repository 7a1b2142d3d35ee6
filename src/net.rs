//! Connection plumbing shared by every protocol listener: plaintext-or-TLS streams, admission
//! limits (total and per client IP), and a tracker so shutdown can wait for sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// An admitted connection; `guard` holds its admission slots for as long as it lives.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: std::net::SocketAddr,
    pub guard: ConnGuard,
}

/// Accepts connections until shutdown. Connections over the limits get `refusal` (the
/// protocol's "try later" line) and are closed; admitted ones go to `on_conn`.
pub async fn accept_loop(
    name: &str,
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
    refusal: &'static [u8],
    mut on_conn: impl FnMut(Accepted),
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning (as mini-redis does).
                    tracing::warn!(error = %e, listener = %name, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        match limits.admit(peer.ip()) {
            Ok(guard) => {
                let _ = stream.set_nodelay(true);
                no_quick_ack(&stream);
                on_conn(Accepted {
                    stream,
                    peer,
                    guard,
                });
            }
            Err(reason) => {
                crate::metrics::METRICS
                    .connections_refused
                    .with_label_values(&[name, reason])
                    .inc();
                let mut s = stream;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        s.write_all(refusal),
                    )
                    .await;
                });
            }
        }
    }
}

/// Leaves Linux's quick-ack mode, which it enters after the handshake: there it answers the
/// client's first command with a bare ACK although our reply follows within microseconds.
/// Mail protocols are request/reply, so delayed ACKs (RFC 1122 §4.2.3.2) ride on the reply:
/// one packet (and one wake-up of the client's kernel path) fewer per connection. Bulk DATA is
/// unaffected: every second full segment is still acknowledged at once.
fn no_quick_ack(stream: &TcpStream) {
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(stream).set_tcp_quickack(false);
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

/// A plaintext or TLS connection; STARTTLS turns the one into the other.
pub enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Our side is the client (outbound SMTP).
    TlsClient(Box<tokio_rustls::client::TlsStream<S>>),
    Gone,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// Time allowed for a TLS handshake (implicit TLS or after STARTTLS/STLS).
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// STARTTLS / STLS: discards whatever plaintext the client pipelined behind the command
    /// (RFC 3207 §4.2, RFC 2595 §4; CVE-2011-0411: it must never run inside TLS), then
    /// hand-shakes in place. `None`: the handshake failed or timed out; close the connection.
    pub async fn upgrade(
        &mut self,
        pending: &mut Vec<u8>,
        tls: Arc<rustls::ServerConfig>,
    ) -> Option<crate::smtp::session::TlsInfo> {
        if !pending.is_empty() {
            tracing::warn!(
                bytes = pending.len(),
                "discarding plaintext pipelined after STARTTLS/STLS"
            );
            pending.clear();
        }
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Gone) else {
            return None;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(s)) => {
                let info = crate::tls::describe(s.get_ref().1);
                *self = Conn::Tls(Box::new(s));
                Some(info)
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Client side of STARTTLS: hand-shakes in place. Anything the server sent before the
    /// handshake must already have been discarded by the caller (RFC 3207 §4.2 applies both
    /// ways).
    pub async fn upgrade_client(
        &mut self,
        tls: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Result<crate::smtp::session::TlsInfo, std::io::Error> {
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Gone) else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        let connector = tokio_rustls::TlsConnector::from(tls);
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(name, stream)).await {
            Ok(Ok(s)) => {
                let info = crate::tls::describe(s.get_ref().1);
                *self = Conn::TlsClient(Box::new(s));
                Ok(info)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Ends the connection: TLS sends its close_notify; plain TCP is closed by dropping the
    /// socket (an explicit shutdown mostly fails with ENOTCONN: the client already hung up).
    pub async fn finish(&mut self) {
        if let Conn::Tls(_) | Conn::TlsClient(_) = self {
            let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
        }
    }
}

/// A command line taken off the input buffer.
pub enum Line {
    /// The line without its CRLF (or bare LF).
    Text(Vec<u8>),
    /// It was longer than the limit; it has been dropped.
    TooLong,
}

/// Takes the next complete line off `rbuf`, if there is one. `discarding` carries over an
/// over-long line whose start was dropped by [`drop_overlong`].
pub fn take_line(rbuf: &mut Vec<u8>, limit: usize, discarding: &mut bool) -> Option<Line> {
    let pos = rbuf.iter().position(|&b| b == b'\n')?;
    if *discarding || pos + 1 > limit {
        *discarding = false;
        rbuf.drain(..=pos);
        return Some(Line::TooLong);
    }
    let end = if pos > 0 && rbuf[pos - 1] == b'\r' {
        pos - 1
    } else {
        pos
    };
    let line = rbuf[..end].to_vec();
    rbuf.drain(..=pos);
    Some(Line::Text(line))
}

/// With no complete line buffered: a partial line already over the limit is dropped as it
/// arrives (memory stays bounded) and answered once its end is seen.
pub fn drop_overlong(rbuf: &mut Vec<u8>, limit: usize, discarding: &mut bool) {
    if rbuf.len() > limit {
        *discarding = true;
        rbuf.clear();
    }
}

/// Connection admission: a global cap and a per-client-IP cap.
pub struct ConnLimits {
    global: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// Held for the life of a connection; frees its slots on drop.
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.limits.per_ip.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnLimits {
            global: Arc::new(Semaphore::new(max)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
        })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, &'static str> {
        let permit = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| "max_connections")?;
        let mut m = self.per_ip.lock().map_err(|_| "internal")?;
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err("per_ip");
        }
        *n += 1;
        Ok(ConnGuard {
            _permit: permit,
            limits: self.clone(),
            ip,
        })
    }
}

/// Tracks session tasks so shutdown can wait for them.
pub mod tokio_util_tasks {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    #[derive(Clone, Default)]
    pub struct Tracker {
        inner: Arc<(AtomicUsize, Notify)>,
    }

    struct Done(Arc<(AtomicUsize, Notify)>);
    impl Drop for Done {
        fn drop(&mut self) {
            if self.0.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.0.1.notify_waiters();
            }
        }
    }

    impl Tracker {
        pub fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
            self.inner.0.fetch_add(1, Ordering::AcqRel);
            let done = Done(self.inner.clone());
            tokio::spawn(async move {
                let _done = done;
                f.await
            });
        }

        /// Waits until every spawned task has finished.
        pub async fn wait(&self) {
            loop {
                let notified = self.inner.1.notified();
                if self.inner.0.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        }
    }
}
