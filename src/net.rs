//! Listening sockets: optional TLS (rustls with the `ring` provider, optional
//! client-certificate verification) and a per-port connection limit. Every
//! port (OTLP/gRPC, OTLP/HTTP, API) accepts through [`Acceptor`], so TLS and
//! the limit behave the same everywhere.
//!
//! A background task accepts TCP connections while it holds a permit of the
//! connection semaphore; at the limit it stops accepting (clients wait in the
//! kernel backlog). TLS handshakes run in their own tasks with a timeout so a
//! slow or silent client cannot hold up the others.

use crate::config::TlsConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a rustls server config; errors name the config key at fault.
pub fn load_tls(cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, (&'static str, String)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("cert_file", format!("cannot read certificates from {}: {e}", cfg.cert_file.display())))?;
    if certs.is_empty() {
        return Err(("cert_file", format!("{} holds no PEM certificate", cfg.cert_file.display())));
    }
    // The error text names the file only: never the key material.
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|_| ("key_file", format!("cannot read a PEM private key from {}", cfg.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert_file", e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ("client_ca_file", format!("cannot read certificates from {}: {e}", ca.display())))?;
            if cas.is_empty() {
                return Err(("client_ca_file", format!("{} holds no PEM certificate", ca.display())));
            }
            for c in cas {
                roots.add(c).map_err(|e| ("client_ca_file", format!("{}: {e}", ca.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ("client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| ("key_file", format!("certificate and key do not form a usable pair: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection; dropping it frees its connection slot.
pub struct Conn {
    io: Io,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Connection info handed to tonic.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        ConnInfo { remote: self.remote }
    }
}

/// Connection info handed to axum (`ConnectInfo<ConnInfo>`), for per-client limits.
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Acceptor>> for ConnInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Acceptor>) -> ConnInfo {
        ConnInfo { remote: *stream.remote_addr() }
    }
}

/// Accepted (and, with TLS, handshaken) connections of one port.
pub struct Acceptor {
    rx: mpsc::Receiver<Conn>,
    local: SocketAddr,
}

impl Acceptor {
    /// Starts accepting on `listener`. Accepting stops when the acceptor is dropped.
    pub fn spawn(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        max_connections: usize,
        what: &'static str,
    ) -> Acceptor {
        let local = listener.local_addr().expect("bound listener has an address");
        let (tx, rx) = mpsc::channel::<Conn>(16);
        let slots = Arc::new(Semaphore::new(max_connections));
        let tls = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                    _ = tx.closed() => return,
                };
                let (tcp, remote) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, port = what, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                match &tls {
                    None => {
                        if tx.send(Conn { io: Io::Plain(tcp), remote, _permit: permit }).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => {
                                    let _ = tx.send(Conn { io: Io::Tls(Box::new(s)), remote, _permit: permit }).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, %remote, port = what, "TLS handshake failed")
                                }
                                Err(_) => {
                                    tracing::debug!(%remote, port = what, "TLS handshake timed out")
                                }
                            }
                        });
                    }
                }
            }
        });
        Acceptor { rx, local }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The connections as a stream, for tonic.
    pub fn into_stream(self) -> impl tokio_stream::Stream<Item = Result<Conn, io::Error>> + Send + 'static {
        use tokio_stream::StreamExt;
        tokio_stream::wrappers::ReceiverStream::new(self.rx).map(Ok)
    }
}

impl axum::serve::Listener for Acceptor {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => {
                let remote = c.remote;
                (c, remote)
            }
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
