//! Broker connections: connecting with TLS and a deadline, and the channel settings each side
//! of a route needs (prefetch on the consumer, publisher confirms on the publisher).

use std::time::Duration;

use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::config::{redact_url, Tls};

/// Deadline for connecting, opening a channel, or any other broker RPC that is not a publish.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker operation that failed; the URL in it is redacted.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker answered with an error or the connection broke.
    #[error("{what} ({url}): {source}")]
    Broker {
        /// What was being done.
        what: &'static str,
        /// Redacted URL.
        url: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// The broker did not answer within the deadline.
    #[error("{what} ({url}): no answer within {timeout:?}")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// Redacted URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A TLS file could not be read.
    #[error("reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One broker endpoint: URL, TLS, and a connection name shown in the management UI.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL with credentials (never logged: use `redacted`).
    pub url: String,
    /// TLS files, for amqps://.
    pub tls: Option<Tls>,
    /// `connection_name` client property.
    pub name: String,
}

impl Endpoint {
    /// The URL without its password.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }

    /// Runs `fut` with [`RPC_TIMEOUT`], naming `what` in the error.
    pub async fn rpc<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T, AmqpError> {
        match tokio::time::timeout(RPC_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(AmqpError::Broker {
                what,
                url: self.redacted(),
                source,
            }),
            Err(_) => Err(AmqpError::Timeout {
                what,
                url: self.redacted(),
                timeout: RPC_TIMEOUT,
            }),
        }
    }

    /// Opens a connection.
    pub async fn connect(&self) -> Result<Connection, AmqpError> {
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let tls = self.tls_config()?;
        let runtime = lapin::runtime::default_runtime().map_err(|source| AmqpError::Broker {
            what: "starting the AMQP runtime",
            url: self.redacted(),
            source,
        })?;
        self.rpc(
            "connecting",
            Connection::connect_with_config(&self.url, props, tls, runtime),
        )
        .await
    }

    fn tls_config(&self) -> Result<OwnedTLSConfig, AmqpError> {
        let Some(tls) = &self.tls else {
            return Ok(OwnedTLSConfig::default());
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| AmqpError::TlsFile {
                path: path.display().to_string(),
                source,
            })
        };
        let cert_chain = match &tls.ca_file {
            Some(path) => Some(String::from_utf8_lossy(&read(path)?).into_owned()),
            None => None,
        };
        let identity = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    /// A consumer channel with `prefetch` unacked deliveries at most.
    pub async fn consumer_channel(
        &self,
        conn: &Connection,
        prefetch: u16,
    ) -> Result<Channel, AmqpError> {
        let channel = self.rpc("opening a channel", conn.create_channel()).await?;
        self.rpc(
            "setting prefetch (basic.qos)",
            channel.basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        Ok(channel)
    }

    /// A publisher channel in confirm mode.
    pub async fn publisher_channel(&self, conn: &Connection) -> Result<Channel, AmqpError> {
        let channel = self.rpc("opening a channel", conn.create_channel()).await?;
        self.rpc(
            "enabling publisher confirms",
            channel.confirm_select(ConfirmSelectOptions { nowait: false }),
        )
        .await?;
        Ok(channel)
    }
}
