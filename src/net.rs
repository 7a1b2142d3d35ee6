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

/// A plaintext or TLS connection; STARTTLS turns the one into the other.
pub enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
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
            Conn::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
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
