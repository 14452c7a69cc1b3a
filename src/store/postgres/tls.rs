//! TLS for `postgres://…?sslmode=require`: a `tokio_postgres` connector over rustls (0.23, as
//! the Redis and AMQP connections use), honoring `store.tls`.
//!
//! The server is always verified: against `store.tls.ca_file` alone when it is set (a private
//! CA or a self-signed server certificate), else against the webpki roots, as `rediss://`
//! does; the certificate must name the URL's host. (libpq's `sslmode=require` encrypts without
//! verifying unless a root file exists; dedupd does not offer an unverified mode.)
//! `cert_file` and `key_file` add a client certificate (mutual TLS). The files are read once,
//! at open, so a bad file fails `open` with its name.
//!
//! Written here rather than taken from `tokio-postgres-rustls`: it is the one small trait
//! impl below, and the rustls stack is already in the build. It offers no SCRAM channel
//! binding (`tls-server-end-point`): with `channel_binding` at its default (`prefer`) the
//! server authenticates as without TLS.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::config::Tls;
use crate::store::StoreError;

/// Makes a TLS connection per PostgreSQL connection, for the host being connected to.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
}

impl RustlsConnect {
    /// A connector from `store.tls` (`None`: the webpki roots, no client certificate).
    pub fn new(tls: Option<&Tls>) -> Result<Self, StoreError> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        match tls.and_then(|t| t.ca_file.as_deref()) {
            Some(ca_file) => {
                let (added, _) = roots.add_parsable_certificates(certificates(ca_file, "ca_file")?);
                if added == 0 {
                    return Err(tls_error("ca_file", ca_file, "no usable CA certificate"));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Config(format!("store.tls: {e}")))?
            .with_root_certificates(roots);
        let config = match tls.map(|t| (&t.cert_file, &t.key_file)) {
            Some((Some(cert_file), Some(key_file))) => {
                let pem = read(key_file, "key_file")?;
                let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    tls_error(
                        "key_file",
                        key_file,
                        &format!("not an unencrypted PEM private key: {e}"),
                    )
                })?;
                builder
                    .with_client_auth_cert(certificates(cert_file, "cert_file")?, key)
                    .map_err(|e| tls_error("cert_file", cert_file, &e.to_string()))?
            }
            Some((None, None)) | None => builder.with_no_client_auth(),
            Some(_) => {
                return Err(StoreError::Config(
                    "store.tls: cert_file and key_file go together (mutual TLS needs both)".into(),
                ))
            }
        };
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| tls_error(what, path, &e.to_string()))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, path, &format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn tls_error(what: &str, path: &Path, detail: &str) -> StoreError {
    StoreError::Config(format!("store.tls.{what} {}: {detail}", path.display()))
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnectOne, io::Error> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne {
            config: self.config.clone(),
            name,
        })
    }
}

/// The TLS handshake of one connection.
pub struct RustlsConnectOne {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { connector.connect(self.name, stream).await.map(RustlsStream) })
    }
}

/// A TLS stream as `tokio_postgres` wants it.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
