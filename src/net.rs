//! Connection guards shared by the daemon's network listeners (the registry's HTTP, the gRPC
//! TCP listener): TLS from the `[tls]` settings, and the deadlines hyper does not keep for a
//! connection that opens and then says nothing, or stops reading what it asked for.

use std::sync::Arc;

use anyhow::Context as _;

/// TLS from the daemon's `[tls]` settings, offering the `alpn` protocols (the registry
/// listener's HTTP/2 and HTTP/1.1, the gRPC listener's HTTP/2).
pub(crate) fn tls_acceptor(
    tls: &crate::config::Tls,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading {}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading key {}", tls.key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots.add(c.with_context(|| format!("parsing {}", ca.display()))?)?;
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("TLS certificate and key")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The TLS handshake of an accepted connection, bounded by `within` (else every connection
/// that never finishes it, a port scan or a client left silent, holds a descriptor and a
/// task for good). None when it failed or ran out of time, logged for `listener`.
pub(crate) async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    conn: tokio::net::TcpStream,
    within: std::time::Duration,
    listener: &'static str,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    match tokio::time::timeout(within, acceptor.accept(conn)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(listener, peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(listener, peer, "TLS handshake not finished in time");
            None
        }
    }
}

/// HTTP/2's preface, the most hyper reads before it knows the protocol.
const PREFACE_LEN: usize = 24;

/// A connection held to the idle timeout where hyper has no timer of its own: its first
/// [`PREFACE_LEN`] bytes must arrive in time (hyper's HTTP/1.1-or-HTTP/2 detection waits for
/// ever; past it, hyper's own timers take over), and a write that the client leaves
/// blocked that long (it stopped reading) ends the connection. A stalled download pins the
/// piece hyper was writing (a 256 KiB chunk buffer: 500 clients that sent a GET and never
/// read held +165 MiB), so it must not pin it for good.
pub(crate) struct Guarded<T> {
    io: T,
    idle: std::time::Duration,
    /// Whether a blocked write ends the connection too (not for gRPC, whose HTTP/2
    /// keepalive pings find a client that stopped reading).
    stall_writes: bool,
    /// Bytes still to come before the opening deadline is lifted.
    opening: usize,
    open_by: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The blocked write's deadline, when `write_armed`.
    write_by: std::pin::Pin<Box<tokio::time::Sleep>>,
    write_armed: bool,
}

impl<T> Guarded<T> {
    pub(crate) fn new(io: T, idle: std::time::Duration) -> Self {
        Guarded {
            stall_writes: true,
            ..Guarded::opening(io, idle)
        }
    }

    /// The connection it guards.
    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }

    /// Only the opening deadline: the first [`PREFACE_LEN`] bytes within `idle`.
    pub(crate) fn opening(io: T, idle: std::time::Duration) -> Self {
        Guarded {
            io,
            idle,
            stall_writes: false,
            opening: PREFACE_LEN,
            open_by: Box::pin(tokio::time::sleep(idle)),
            write_by: Box::pin(tokio::time::sleep(idle)),
            write_armed: false,
        }
    }

    /// What a write's outcome means for the stall deadline: progress disarms it, a blocked
    /// write arms it (once) and fails when it has passed.
    fn stalled<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::future::Future as _;
        if r.is_ready() || !self.stall_writes {
            self.write_armed = false;
            return r;
        }
        if !self.write_armed {
            let by = tokio::time::Instant::now() + self.idle;
            self.write_by.as_mut().reset(by);
            self.write_armed = true;
        }
        if self.write_by.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing within the idle timeout",
            )));
        }
        r
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        let this = &mut *self;
        if this.opening > 0 && this.open_by.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client sent no request within the idle timeout",
            )));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            this.opening = if n == 0 {
                0
            } else {
                this.opening.saturating_sub(n)
            };
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.stalled(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.stalled(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.stalled(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
