//! Broker connections: connecting with TLS and a deadline, and the channel settings each side
//! of a route needs (prefetch on the consumer, publisher confirms on the publisher).

use std::time::Duration;

use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

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

    /// Runs several broker operations with one [`RPC_TIMEOUT`]; the first error wins.
    pub async fn rpc_all(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Vec<lapin::Result<()>>>,
    ) -> Result<(), AmqpError> {
        let all = async { fut.await.into_iter().collect::<lapin::Result<()>>() };
        self.rpc(what, all).await
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

impl Endpoint {
    /// The user the URL authenticates as (`guest` when the URL names none, as lapin does).
    pub fn username(&self) -> String {
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.authority.userinfo.username)
            .unwrap_or_else(|_| "guest".into())
    }
}

/// Queue arguments that dead-letter rejected messages to `dlq` through the default exchange.
pub fn dead_letter_to(dlq: &str) -> lapin::types::FieldTable {
    use lapin::types::AMQPValue;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.into()),
    );
    args
}

/// `props` without `user_id`. RabbitMQ closes the channel when a publish carries a user_id other
/// than the connection's user (unless that user is an impersonator), so such a message is
/// forwarded without it rather than failing forever.
pub fn without_user_id(props: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_user_id_keeps_every_other_property() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert("h".into(), lapin::types::AMQPValue::LongInt(1));
        let full = BasicProperties::default()
            .with_content_type("a".into())
            .with_content_encoding("b".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("d".into())
            .with_expiration("5".into())
            .with_message_id("e".into())
            .with_timestamp(6)
            .with_type("f".into())
            .with_app_id("g".into())
            .with_cluster_id("h".into());
        let stripped = without_user_id(full.clone().with_user_id("mallory".into()));
        assert_eq!(stripped, full);
    }

    #[test]
    fn username_comes_from_the_url() {
        let e = |url: &str| Endpoint {
            url: url.into(),
            tls: None,
            name: String::new(),
        };
        assert_eq!(e("amqp://alice:pw@h:5672/%2f").username(), "alice");
        assert_eq!(e("amqp://h:5672/%2f").username(), "guest");
    }
}
