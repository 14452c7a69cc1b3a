//! Broker connections: connecting with TLS and a deadline, and the channel settings each side
//! of a route needs (prefetch on the consumer, publisher confirms on the publisher).
//!
//! Also what keeps deeply nested headers from aborting the process. lapin (through
//! amq-protocol's nom parser) parses, clones, drops and serializes header tables recursively,
//! so each level of nesting costs stack, and overflowing a thread's stack aborts the whole
//! process. A publisher's content header must fit in one frame of its own `frame_max`, at most
//! the broker's (RabbitMQ's default and usual value: [`FRAME_MAX`]), and each level of nesting
//! takes at least 5 bytes of it: that bounds the depth of anything dedupd receives. lapin parses
//! any frame the broker sends before it compares it with the negotiated `frame_max`, so the
//! bound is the broker's setting, not ours; the binary gives every thread that touches headers
//! [`HEADER_STACK_SIZE`], measured to hold a [`FRAME_MAX`] frame of the worst nesting. Then
//! [`header_depth`] lets the pipeline refuse nesting deeper than [`MAX_HEADER_DEPTH`] before
//! it does anything else recursive with it or passes it on.

use std::sync::Arc;
use std::time::Duration;

use async_rs::Runtime;

use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::tcp::{
    AsyncTcpStream, OwnedIdentity, OwnedTLSConfig, RustlsConnector, RustlsConnectorConfig,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{SecretUrl, Tls};

/// Deadline for connecting, opening a channel, or any other broker RPC that is not a publish.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// The `frame_max` dedupd negotiates unless the URL sets `?frame_max=N`: RabbitMQ's default,
/// the frame size [`HEADER_STACK_SIZE`] is measured for. Pinned so that a broker offering no
/// limit (0) does not make lapin size its buffers for 4 GiB frames.
pub const FRAME_MAX: u32 = 131_072;

/// Deepest header nesting dedupd forwards: the headers table itself is depth 1, each table or
/// array inside adds one. Deeper messages are rejected (`unparsable`): many consumer client
/// libraries recurse on header tables and would crash on them, and real headers (`x-death`
/// included) stay far below this.
pub const MAX_HEADER_DEPTH: usize = 64;

/// Stack per byte of a header frame, at most, that lapin's I/O thread takes to parse it, with
/// margin (parsing costs most; cloning, dropping and serializing less). Measured with
/// `tests/poison.rs` `stack_use_per_nesting_level`: the worst is arrays in the debug build,
/// 11.5 KB per level of 5 bytes (2.3 KB a byte), and tables in release, 1.8 KB per level of 6
/// bytes (0.3 KB a byte). Tests run the debug build.
const STACK_PER_FRAME_BYTE: usize = if cfg!(debug_assertions) { 3 << 10 } else { 512 };

/// Stack for every thread that parses, clones, drops or serializes message headers: a
/// [`FRAME_MAX`] frame of the worst nesting at [`STACK_PER_FRAME_BYTE`], plus 8 MiB for
/// everything else the thread does: 72 MiB in release, 392 MiB in the debug build. Address
/// space only: a page becomes resident when touched, once a message needs it.
pub const HEADER_STACK_SIZE: usize = FRAME_MAX as usize * STACK_PER_FRAME_BYTE + (8 << 20);

/// How deeply `props`' headers nest: 0 without headers, 1 for a table of plain values, one more
/// per table or array inside. Iterative, so any depth is safe to measure on any stack.
pub fn header_depth(props: &BasicProperties) -> usize {
    let Some(headers) = props.headers() else {
        return 0;
    };
    let mut deepest = 1;
    let mut todo: Vec<(&AMQPValue, usize)> = headers.inner().values().map(|v| (v, 1)).collect();
    while let Some((value, depth)) = todo.pop() {
        match value {
            AMQPValue::FieldTable(table) => {
                deepest = deepest.max(depth + 1);
                todo.extend(table.inner().values().map(|v| (v, depth + 1)));
            }
            AMQPValue::FieldArray(array) => {
                deepest = deepest.max(depth + 1);
                todo.extend(array.as_slice().iter().map(|v| (v, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// `url` with `frame_max` = [`FRAME_MAX`] unless it sets one (an operator whose broker allows
/// larger frames raises it there, and `RUST_MIN_STACK` with it: see the README).
fn pinned_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    if uri.query.frame_max.unwrap_or(0) == 0 {
        uri.query.frame_max = Some(FRAME_MAX);
    }
    Ok(uri)
}

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
    /// The URL does not parse (config validation normally catches this first).
    #[error("{url}: {reason}")]
    Url {
        /// Redacted URL.
        url: String,
        /// The parser's message.
        reason: String,
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

/// One broker endpoint: URL, TLS, and a connection name shown in the management UI. `Debug`
/// shows the URL without its password.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL with credentials; shown without its password (use `redacted`).
    pub url: SecretUrl,
    /// TLS files, for amqps://.
    pub tls: Option<Tls>,
    /// `connection_name` client property.
    pub name: String,
}

impl Endpoint {
    /// The URL without its password.
    pub fn redacted(&self) -> String {
        self.url.redacted()
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

    /// Opens a connection, with `frame_max` pinned to [`FRAME_MAX`] unless the URL sets it.
    pub async fn connect(&self) -> Result<Connection, AmqpError> {
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let uri = pinned_uri(self.url.expose()).map_err(|reason| AmqpError::Url {
            url: self.redacted(),
            reason,
        })?;
        let tls = self.tls_config()?;
        let runtime = lapin::runtime::default_runtime().map_err(|source| AmqpError::Broker {
            what: "starting the AMQP runtime",
            url: self.redacted(),
            source,
        })?;
        let Some(connector) = self.exclusive_ca_connector()? else {
            let connecting = Connection::connect_uri_with_config(uri, props, tls, runtime);
            return self.rpc("connecting", connecting).await;
        };
        // lapin's own TLS path adds `ca_file` to the system's roots; this one trusts it alone.
        let connector = Arc::new(connector);
        let connect = async move |uri: AMQPUri, runtime: Runtime<_>| {
            let host = uri.authority.host.clone();
            let addrs = runtime.to_socket_addrs((host.clone(), uri.authority.port));
            let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(stream.into_rustls(&connector, &host).await?)
        };
        let connecting = Connection::connector(uri, runtime, connect, props);
        self.rpc("connecting", connecting).await
    }

    /// With `ca_file`: a TLS connector that verifies the server with that CA alone (not the
    /// system's roots as well), with the client certificate when one is set. `None` without
    /// TLS settings or without `ca_file` (the system roots then verify the server).
    fn exclusive_ca_connector(&self) -> Result<Option<RustlsConnector>, AmqpError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let Some(ca_file) = &tls.ca_file else {
            return Ok(None);
        };
        let pem_error = |path: &std::path::Path, what: String| AmqpError::TlsFile {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
        };
        let certs = |path: &std::path::Path| {
            let pem = read_tls_file(path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(path, format!("not a PEM certificate file: {e}")))?;
            if certs.is_empty() {
                return Err(pem_error(path, "no PEM certificate in it".into()));
            }
            Ok(certs)
        };
        let mut config = RustlsConnectorConfig::default();
        config.add_parsable_certificates(certs(ca_file)?);
        let connector = match (&tls.cert_file, &tls.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let key =
                    PrivateKeyDer::from_pem_slice(&read_tls_file(key_file)?).map_err(|e| {
                        pem_error(key_file, format!("not an unencrypted PEM private key: {e}"))
                    })?;
                config.connector_with_single_cert(certs(cert_file)?, key)
            }
            _ => config.connector_with_no_client_auth(),
        };
        connector.map(Some).map_err(|source| AmqpError::TlsFile {
            path: ca_file.display().to_string(),
            source,
        })
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
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.authority.userinfo.username)
            .unwrap_or_else(|_| "guest".into())
    }
}

/// Queue arguments that dead-letter rejected messages to `dlq` through the default exchange.
pub fn dead_letter_to(dlq: &str) -> FieldTable {
    let mut args = FieldTable::default();
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

/// `props` with header `name` set to the string `value` (replacing one of that name): the
/// other headers, of every AMQP type, and every other property stay as they are.
pub fn with_header(props: BasicProperties, name: &str, value: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(name.into(), AMQPValue::LongString(value.into()));
    props.with_headers(headers)
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

/// A TLS file's bytes, naming the file in the error.
fn read_tls_file(path: &std::path::Path) -> Result<Vec<u8>, AmqpError> {
    std::fs::read(path).map_err(|source| AmqpError::TlsFile {
        path: path.display().to_string(),
        source,
    })
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

    fn nested(depth: usize, table: bool) -> BasicProperties {
        let mut value = AMQPValue::Void;
        for _ in 1..depth {
            value = if table {
                let mut t = FieldTable::default();
                t.insert("k".into(), value);
                AMQPValue::FieldTable(t)
            } else {
                AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), value].into())
            };
        }
        let mut headers = FieldTable::default();
        headers.insert("a".into(), AMQPValue::LongInt(1));
        headers.insert("deep".into(), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn header_depth_counts_tables_and_arrays() {
        assert_eq!(header_depth(&BasicProperties::default()), 0);
        let empty = BasicProperties::default().with_headers(FieldTable::default());
        assert_eq!(header_depth(&empty), 1);
        for depth in [1, 2, 3, MAX_HEADER_DEPTH, MAX_HEADER_DEPTH + 1] {
            assert_eq!(header_depth(&nested(depth, true)), depth);
            assert_eq!(header_depth(&nested(depth, false)), depth);
        }
    }

    #[test]
    fn frame_max_is_pinned_unless_the_url_sets_it() {
        let pinned = |url: &str| pinned_uri(url).map(|u| u.query.frame_max);
        assert_eq!(pinned("amqp://h/%2f"), Ok(Some(FRAME_MAX)));
        assert_eq!(pinned("amqp://h/%2f?frame_max=0"), Ok(Some(FRAME_MAX)));
        assert_eq!(pinned("amqp://h/%2f?frame_max=8192"), Ok(Some(8192)));
        assert_eq!(
            pinned("amqp://h/%2f?frame_max=1048576"),
            Ok(Some(1_048_576))
        );
        assert!(pinned("nonsense://").is_err());
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
