//! The rules serde cannot express: URLs that parse, TLS files that exist, bounds on every
//! duration and size, names the broker would accept, and routes that cannot loop. Each rule
//! returns the first problem as [`ConfigError::Invalid`], naming the dotted key, what is wrong,
//! and how to fix it (usually with the default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use lapin::uri::AMQPUri;

use super::secret::{redact_in_text, redact_url};
use super::{
    fmt_duration, Config, ConfigError, KeySpec, Route, StoreConfig, StoreKind, StoreUrl, Tls,
    Tuning,
};

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Longest AMQP short string (queue, exchange and routing key names, header names, consumer
/// tags): the broker refuses longer ones, so a route with one would fail at run time.
const MAX_SHORTSTR: usize = 255;

/// Longest route name: the consumer tag `dedupd-{route}-{instance}-{epoch}` is a short string,
/// and `dedupd-` (7), the 16 hex digits of the instance, an epoch of up to 20 digits and two
/// dashes take 45 of its 255 bytes.
pub const MAX_ROUTE_NAME: usize = MAX_SHORTSTR - 45;

/// Longest `store.key_prefix`: it is repeated in every remembered key, so it is Redis memory
/// per key; 64 bytes is room for any naming scheme.
const MAX_KEY_PREFIX: usize = 64;

/// Refuses a name the broker would refuse at run time.
fn check_shortstr(key: &str, value: &str, what: &str) -> Result<(), ConfigError> {
    if value.len() > MAX_SHORTSTR {
        return Err(invalid(
            key,
            format!(
                "is {} bytes long: AMQP limits {what} to {MAX_SHORTSTR} bytes, and the broker \
                 would refuse it at run time; use a shorter name",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Refuses a duration outside `min..=max`, saying `why` the bounds are there.
fn check_duration(
    key: &str,
    value: Duration,
    (min, max): (Duration, Duration),
    why: &str,
    default: &str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!(
                "is {}: use \"{}\" to \"{}\" ({why}); the default is \"{default}\"",
                fmt_duration(value),
                fmt_bound(min),
                fmt_bound(max)
            ),
        ));
    }
    Ok(())
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// `store.lease` bounds. Below 1s a claim can expire while its publish is still in flight on a
/// merely slow broker or store, and another instance forwards a duplicate; above 1h the
/// messages of a crashed instance wait that long before they are forwarded again.
pub const LEASE_BOUNDS: (Duration, Duration) = (SECOND, HOUR);
/// `store.timeout` bounds: under 10ms a healthy store on another host counts as down; over 60s
/// a store that stopped answering stalls every route that long before it counts as down.
pub const STORE_TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_millis(10), MINUTE);
/// `routes.*.window` bounds: under 1s nothing is deduplicated; over 365 days is past any
/// retry horizon, costs Redis memory for every key that long, and nears the expiry times
/// Redis accepts.
pub const WINDOW_BOUNDS: (Duration, Duration) = (SECOND, Duration::from_secs(365 * 86_400));
/// `tuning.confirm_timeout` bounds: confirms of persistent messages wait for the broker's disk,
/// so under 1s a loaded but healthy broker has its publishes counted as failed and sent again
/// (duplicates); over 10 minutes a stuck broker holds the route's messages that long.
pub const CONFIRM_TIMEOUT_BOUNDS: (Duration, Duration) = (SECOND, Duration::from_secs(600));
/// `tuning.shutdown_grace` and `tuning.backoff_max` bounds: longer than an hour reads like a
/// unit mistake, and service managers kill a process that takes that long to stop anyway.
pub const MAX_WAIT: Duration = HOUR;

/// Every rule, in the order the file reads: brokers, store, metrics and tuning, routes.
pub(super) fn config(c: &Config) -> Result<(), ConfigError> {
    brokers(c)?;
    store(&c.store)?;
    metrics_listen(&c.metrics.listen)?;
    tuning(&c.tuning)?;
    routes(c)
}

fn brokers(c: &Config) -> Result<(), ConfigError> {
    check_amqp_url("upstream.url", c.upstream.url.expose())?;
    if c.upstream.prefetch == 0 {
        // basic.qos 0 means "unlimited": a stalled store would buffer the whole queue here.
        return Err(invalid(
            "upstream.prefetch",
            "must be at least 1 (0 means unlimited in AMQP); the default is 2000",
        ));
    }
    let up = [c.upstream.url.expose()];
    check_tls(
        "upstream.tls",
        c.upstream.tls.as_ref(),
        &up,
        "upstream.url",
        "amqps://",
    )?;
    if let Some(down) = &c.downstream {
        let url_key = match &down.url {
            Some(url) => {
                check_amqp_url("downstream.url", url.expose())?;
                "downstream.url"
            }
            None => "upstream.url (which downstream.url defaults to)",
        };
        let urls = [c.downstream_url().expose()];
        check_tls(
            "downstream.tls",
            down.tls.as_ref(),
            &urls,
            url_key,
            "amqps://",
        )?;
    }
    Ok(())
}

fn metrics_listen(listen: &str) -> Result<(), ConfigError> {
    if listen.parse::<SocketAddr>().is_err() {
        return Err(invalid(
            "metrics.listen",
            format!(
                "{listen:?} is not IP:PORT: write e.g. \"127.0.0.1:9187\" or \"0.0.0.0:9187\" \
                 (host names are not accepted)"
            ),
        ));
    }
    Ok(())
}

fn tuning(t: &Tuning) -> Result<(), ConfigError> {
    if !(1..=10_000).contains(&t.batch_size) {
        return Err(invalid(
            "tuning.batch_size",
            format!("is {}: use 1 to 10000; the default is 500", t.batch_size),
        ));
    }
    if t.publish_window == 0 {
        return Err(invalid(
            "tuning.publish_window",
            "must be at least 1, or nothing is ever published; the default is 1000",
        ));
    }
    check_duration(
        "tuning.confirm_timeout",
        t.confirm_timeout,
        CONFIRM_TIMEOUT_BOUNDS,
        "a confirm of a persistent message waits for the broker's disk: a shorter timeout \
         republishes what a busy broker was about to confirm, a longer one holds messages \
         behind a stuck broker",
        "15s",
    )?;
    check_duration(
        "tuning.shutdown_grace",
        t.shutdown_grace,
        (Duration::ZERO, MAX_WAIT),
        "how long SIGTERM waits for in-flight messages; longer reads like a unit mistake",
        "10s",
    )?;
    backoff(t)
}

fn backoff(t: &Tuning) -> Result<(), ConfigError> {
    check_duration(
        "tuning.backoff_max",
        t.backoff_max,
        (Duration::ZERO, MAX_WAIT),
        "the longest wait before reconnecting; longer reads like a unit mistake",
        "5s",
    )?;
    if t.backoff_min.is_zero() {
        // The backoff doubles from backoff_min: from zero it would retry in a hot loop.
        return Err(invalid(
            "tuning.backoff_min",
            "must be longer than 0 (it doubles up to backoff_max); the default is \"100ms\"",
        ));
    }
    if t.backoff_min > t.backoff_max {
        return Err(invalid(
            "tuning.backoff_min",
            format!(
                "{} is longer than tuning.backoff_max ({}): lower backoff_min or raise backoff_max",
                fmt_duration(t.backoff_min),
                fmt_duration(t.backoff_max)
            ),
        ));
    }
    Ok(())
}

/// Each route on its own, then what routes must not share (a queue).
fn routes(c: &Config) -> Result<(), ConfigError> {
    if c.routes.is_empty() {
        return Err(invalid(
            "routes",
            "no route is configured: add a [routes.NAME] table with at least `queue`",
        ));
    }
    // A default-exchange publish only loops back when it lands on the broker it came from.
    // Asked lazily: it may resolve host names, which only such routes need.
    let same_broker_cell = std::cell::OnceCell::new();
    let same_broker = || {
        *same_broker_cell
            .get_or_init(|| same_broker(c.upstream.url.expose(), c.downstream_url().expose()))
    };
    let mut consumers: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, route) in &c.routes {
        let key = |field: &str| format!("routes.{name}.{field}");
        route_name(name)?;
        route_names_fit(route, &key)?;
        if let Some(other) = consumers.insert(&route.queue, name) {
            return Err(invalid(
                key("queue"),
                format!(
                    "route {other:?} already consumes {:?}: two routes would split one stream \
                     between two dedup namespaces; keep one route per queue",
                    route.queue
                ),
            ));
        }
        if route.exchange.is_empty() {
            default_exchange_route(route, &key, same_broker)?;
        }
        audit_and_stamp(route, &key)?;
        check_duration(
            &key("window"),
            route.window,
            WINDOW_BOUNDS,
            "how long a forwarded key is remembered: every key costs Redis memory for that \
             long, and Redis limits expiry times",
            "24h",
        )?;
    }
    Ok(())
}

/// A route name goes into store keys, metric labels and the AMQP consumer tag.
fn route_name(name: &str) -> Result<(), ConfigError> {
    let name_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.is_empty() || !name_ok {
        return Err(invalid(
            format!("routes.{name}"),
            "route names may only use A-Z a-z 0-9 _ . - (they go into store keys and \
             metric labels): rename the table",
        ));
    }
    if name.len() > MAX_ROUTE_NAME {
        return Err(invalid(
            format!("routes.{name}"),
            format!(
                "the route name is {} bytes long: use at most {MAX_ROUTE_NAME} (it goes \
                 into the AMQP consumer tag, which is limited to {MAX_SHORTSTR}); rename \
                 the table",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// The route's queue, exchange, routing key and header name, as the broker would take them.
fn route_names_fit(route: &Route, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    if route.queue.is_empty() {
        return Err(invalid(
            key("queue"),
            "is empty: name the upstream queue to consume",
        ));
    }
    check_shortstr(&key("queue"), &route.queue, "queue names")?;
    check_shortstr(&key("exchange"), &route.exchange, "exchange names")?;
    if let Some(rk) = &route.routing_key {
        check_shortstr(&key("routing_key"), rk, "routing keys")?;
    }
    if let KeySpec::Header(header) = &route.key {
        // A longer header name cannot occur in a message: every message would miss it.
        check_shortstr(&key("key"), header, "header names")?;
    }
    Ok(())
}

/// `duplicates_exchange` must not be where the route forwards to (duplicates would reach the
/// consumers after all), and `stamp_header` must not overwrite the header the key is read from.
fn audit_and_stamp(route: &Route, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let audit = route.duplicates_exchange.as_str();
    check_shortstr(&key("duplicates_exchange"), audit, "exchange names")?;
    if !audit.is_empty() && audit == route.exchange {
        return Err(invalid(
            key("duplicates_exchange"),
            format!(
                "{audit:?} is also the route's exchange: duplicates would be delivered to the \
                 consumers they are kept from; name a separate exchange for them (or \"\" to \
                 only drop them)"
            ),
        ));
    }
    let stamp = route.stamp_header.as_str();
    check_shortstr(&key("stamp_header"), stamp, "header names")?;
    if !stamp.is_empty() && stamp.trim() != stamp {
        return Err(invalid(
            key("stamp_header"),
            format!("{stamp:?} has leading or trailing spaces: name the header without them"),
        ));
    }
    if matches!(&route.key, KeySpec::Header(h) if h == stamp) {
        return Err(invalid(
            key("stamp_header"),
            format!(
                "{stamp:?} is the header the key is read from (key = \"header:{stamp}\"): \
                 stamping would overwrite the producer's value; pick another header name"
            ),
        ));
    }
    Ok(())
}

/// With `exchange = ""` the routing key names the destination queue: it must name one, and
/// not the route's own queue on the same broker (a forwarding loop).
fn default_exchange_route(
    route: &Route,
    key: &dyn Fn(&str) -> String,
    same_broker: impl Fn() -> bool,
) -> Result<(), ConfigError> {
    let queue = route.queue.as_str();
    match route.routing_key.as_deref() {
        Some("") => Err(invalid(
            key("routing_key"),
            "is empty, and the default exchange (exchange = \"\") routes an \
             empty key nowhere: name the downstream queue",
        )),
        None if same_broker() => Err(invalid(
            key("routing_key"),
            format!(
                "is required with exchange = \"\": the default exchange delivers \
                 to the queue named by the message's own routing key, which for \
                 messages published straight to {queue:?} is {queue:?} itself (a \
                 forwarding loop); set routing_key to the downstream queue, or \
                 set exchange"
            ),
        )),
        Some(rk) if rk == queue && same_broker() => Err(invalid(
            key("routing_key"),
            format!(
                "{rk:?} with exchange = \"\" publishes back into the route's own \
                 queue (a forwarding loop): name a different downstream queue"
            ),
        )),
        _ => Ok(()),
    }
}

/// `[store]`. `kind = "memory"` and `"embedded"` never connect, so their url and tls are
/// ignored rather than checked; `path` belongs to `embedded` alone.
fn store(s: &StoreConfig) -> Result<(), ConfigError> {
    match s.kind {
        StoreKind::Redis => redis_urls(s)?,
        StoreKind::Postgres => postgres_url(s)?,
        StoreKind::Embedded => embedded_path(s)?,
        StoreKind::Memory => {}
    }
    if s.path.is_some() && s.kind != StoreKind::Embedded {
        return Err(invalid(
            "store.path",
            format!(
                "is only read by kind = \"embedded\" (this store is kind = \"{}\"): \
                 remove it, or set kind = \"embedded\"",
                s.kind
            ),
        ));
    }
    if s.key_prefix.len() > MAX_KEY_PREFIX {
        return Err(invalid(
            "store.key_prefix",
            format!(
                "is {} bytes long: use at most {MAX_KEY_PREFIX} (it is repeated in every \
                 remembered key); the default is \"dedupd\"",
                s.key_prefix.len()
            ),
        ));
    }
    if s.key_prefix.is_empty() || s.key_prefix.chars().any(char::is_whitespace) {
        return Err(invalid(
            "store.key_prefix",
            format!(
                "{:?} must be non-empty and without whitespace; the default is \"dedupd\"",
                s.key_prefix
            ),
        ));
    }
    if s.key_prefix.contains(['{', '}']) {
        return Err(invalid(
            "store.key_prefix",
            format!(
                "{:?} contains a brace: dedupd places its own {{hash tags}} after the prefix so \
                 a route's keys spread over a cluster's masters, and a tag in the prefix would \
                 pin them all to one; remove the braces",
                s.key_prefix
            ),
        ));
    }
    check_duration(
        "store.lease",
        s.lease,
        LEASE_BOUNDS,
        "a claim must outlive its publish and confirm, or a slow broker lets another \
         instance forward a duplicate; a crashed instance's messages wait out the lease, \
         so a few seconds take over fast",
        "30s",
    )?;
    check_duration(
        "store.timeout",
        s.timeout,
        STORE_TIMEOUT_BOUNDS,
        "the deadline of one store round trip: shorter fails a healthy remote store, \
         longer stalls every route behind a dead one",
        "2s",
    )
}

/// `store.url` of a PostgreSQL store: one `postgres://` URL that the client can parse.
fn postgres_url(s: &StoreConfig) -> Result<(), ConfigError> {
    let StoreUrl::One(url) = &s.url else {
        return Err(invalid(
            "store.url",
            "kind = \"postgres\" takes one URL, not a list: \
             write url = \"postgres://user:password@host:5432/database\"",
        ));
    };
    let shown = redact_url(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            "store.url",
            format!(
                "{shown:?} is not a PostgreSQL URL (kind = \"postgres\"): write \
                 postgres://user:password@host:5432/database"
            ),
        ));
    }
    match url.parse::<tokio_postgres::Config>() {
        Err(e) => Err(invalid(
            "store.url",
            format!(
                "{shown:?} does not parse ({}): write postgres://user:password@host:5432/database",
                redact_in_text(&e.to_string().replace(url.as_str(), &shown))
            ),
        )),
        // PostgreSQL asks for TLS in a parameter, not in the scheme (which every such URL
        // passes below); the rest of the TLS table is checked as for any store.
        Ok(pg)
            if s.tls.is_some()
                && !matches!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require) =>
        {
            Err(invalid(
                "store.tls",
                format!(
                    "TLS settings need TLS in the URL, but store.url {shown:?} does not ask for \
                     it: add ?sslmode=require"
                ),
            ))
        }
        Ok(_) => check_tls("store.tls", s.tls.as_ref(), &[url], "store.url", "postgres"),
    }
}

/// `store.path` of an embedded store: required, a directory name.
fn embedded_path(s: &StoreConfig) -> Result<(), ConfigError> {
    match &s.path {
        None => Err(invalid(
            "store.path",
            "is required with kind = \"embedded\": name a directory on local disk for the \
             store's files, e.g. path = \"/var/lib/dedupd\"",
        )),
        Some(p) if p.as_os_str().is_empty() => Err(invalid(
            "store.path",
            "is empty: name a directory on local disk, e.g. path = \"/var/lib/dedupd\"",
        )),
        Some(_) => Ok(()),
    }
}

/// `store.url` and `store.tls` of a Redis store: one URL, or a cluster list of one scheme.
fn redis_urls(s: &StoreConfig) -> Result<(), ConfigError> {
    let urls = s.url.expose();
    if urls.is_empty() {
        return Err(invalid(
            "store.url",
            "the cluster list is empty: give at least one seed node, \
             e.g. [\"redis://10.0.0.1:6379\"]",
        ));
    }
    let cluster = matches!(s.url, StoreUrl::Cluster(_));
    for url in &urls {
        check_redis_url(url, cluster)?;
    }
    if cluster
        && urls
            .iter()
            .any(|u| u.starts_with("rediss://") != urls[0].starts_with("rediss://"))
    {
        return Err(invalid(
            "store.url",
            "mixes redis:// and rediss://: use one scheme for every cluster node",
        ));
    }
    check_tls("store.tls", s.tls.as_ref(), &urls, "store.url", "rediss://")
}

fn check_amqp_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let shown = redact_url(url);
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(invalid(
            key,
            format!(
                "{shown:?} is not an AMQP URL: write amqp://user:password@host:5672/vhost \
                 (amqps:// for TLS)"
            ),
        ));
    }
    match url.parse::<AMQPUri>() {
        Err(e) => Err(invalid(
            key,
            format!(
                "{shown:?} does not parse ({}): write amqp://user:password@host:5672/vhost, \
                 percent-encoding special characters in the password",
                redact_in_text(&e.replace(url, &shown))
            ),
        )),
        // lapin reads "amqp://host/" as the vhost "", which RabbitMQ does not have.
        Ok(uri) if uri.vhost.is_empty() => Err(invalid(
            key,
            format!(
                "{shown:?} names the empty virtual host: end it with /%2f for the default \
                 vhost \"/\", or drop the trailing slash"
            ),
        )),
        Ok(_) => Ok(()),
    }
}

fn check_redis_url(url: &str, cluster: bool) -> Result<(), ConfigError> {
    let shown = redact_url(url);
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(invalid(
            "store.url",
            format!(
                "{shown:?} is not a Redis URL: write redis://[:password@]host:6379/db \
                 (rediss:// for TLS)"
            ),
        ));
    }
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Err(e) => Err(invalid(
            "store.url",
            format!(
                "{shown:?} does not parse ({}): write redis://[:password@]host:6379/db",
                redact_in_text(&e.to_string().replace(url, &shown))
            ),
        )),
        Ok(info) if cluster && info.redis_settings().db() != 0 => Err(invalid(
            "store.url",
            format!(
                "{shown:?} selects a database, but Redis Cluster only has database 0: drop the /db"
            ),
        )),
        Ok(_) => Ok(()),
    }
}

/// Checks a `tls` table against the URLs it applies to (`url_key` names them in messages).
fn check_tls(
    key: &str,
    tls: Option<&Tls>,
    urls: &[&str],
    url_key: &str,
    scheme: &str,
) -> Result<(), ConfigError> {
    let Some(tls) = tls else { return Ok(()) };
    if let Some(plain) = urls.iter().find(|u| !u.starts_with(scheme)) {
        return Err(invalid(
            key,
            format!(
                "TLS settings need a {scheme} URL, but {url_key} is {:?}: change it to {scheme}",
                redact_url(plain)
            ),
        ));
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => {
            return Err(invalid(
                format!("{key}.key_file"),
                "is missing: cert_file and key_file go together (the client certificate and its \
                 private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{key}.cert_file"),
                "is missing: cert_file and key_file go together (the client certificate and its \
                 private key)",
            ));
        }
        _ => {}
    }
    let files = [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ];
    for (field, file) in files {
        if let Some(file) = file.as_deref().filter(|f| !f.is_file()) {
            return Err(invalid(
                format!("{key}.{field}"),
                format!(
                    "{} is not a file: give the path of a PEM file (relative paths start at the \
                     working directory)",
                    file.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether two AMQP URLs reach the same broker and vhost (credentials may differ), however the
/// host is spelled: `localhost` and `127.0.0.1` are one broker. Same port and vhost, and either
/// the same host name or any address in common once both names are resolved.
///
/// Unparsable URLs count as the same: the checks that depend on it then err on the safe side.
/// A name that does not resolve (yet: `check` may run where production DNS is not) counts as
/// another broker, so a config is never refused for DNS being away.
fn same_broker(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (a.parse::<AMQPUri>(), b.parse::<AMQPUri>()) else {
        return true;
    };
    if a.authority.port != b.authority.port || a.vhost != b.vhost {
        return false;
    }
    if a.authority.host.eq_ignore_ascii_case(&b.authority.host) {
        return true;
    }
    let resolve = |host: &str| -> Vec<std::net::IpAddr> {
        // `ToSocketAddrs` takes IPv6 literals without the brackets URLs put around them.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        std::net::ToSocketAddrs::to_socket_addrs(&(host, a.authority.port))
            .map(|addrs| addrs.map(|addr| addr.ip()).collect())
            .unwrap_or_default()
    };
    let theirs = resolve(&b.authority.host);
    resolve(&a.authority.host)
        .iter()
        .any(|ip| theirs.contains(ip))
}

/// A bound in a message: whole days as days (`365d`, which humantime reads), else as
/// [`fmt_duration`].
fn fmt_bound(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs >= 2 * 86_400 && secs.is_multiple_of(86_400) {
        format!("{}d", secs / 86_400)
    } else {
        fmt_duration(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn broker_urls() {
        refused("amqp://guest", "http://guest", "upstream.url", "amqp://");
        refused(
            "127.0.0.1:5672",
            "127.0.0.1:notaport",
            "upstream.url",
            "does not parse",
        );
        refused("5672/%2f", "5672/", "upstream.url", "/%2f");
        refused(
            "[store]",
            "[downstream]\nurl = \"redis://x\"\n[store]",
            "downstream.url",
            "amqp://",
        );
        refused(
            "%2f\"",
            "%2f\"\nprefetch = 0",
            "upstream.prefetch",
            "at least 1",
        );
        // Passwords stay out of messages.
        let (_, message) = invalid_of(&BASE.replace("amqp://", "ftp://"));
        assert!(!message.contains("guest:guest"), "{message}");
    }

    #[test]
    fn postgres_and_embedded_store_rules() {
        let kind = "kind = \"memory\"";
        let pg = |rest: &str| format!("kind = \"postgres\"\n{rest}");
        refused(kind, &pg(""), "store.url", "not a PostgreSQL URL");
        refused(kind, &pg("url = \"redis://x\""), "store.url", "postgres://");
        refused(
            kind,
            &pg("url = [\"postgres://a/db\"]"),
            "store.url",
            "one URL",
        );
        refused(
            kind,
            &pg("url = \"postgres://a/db?sslmode=bogus\""),
            "store.url",
            "does not parse",
        );
        refused(
            kind,
            &pg("url = \"postgres://a/db\"\n[store.tls]\nca_file = \"/nonexistent.pem\""),
            "store.tls",
            "sslmode=require",
        );
        refused(
            kind,
            &pg("url = \"postgres://a/db?sslmode=require\"\n[store.tls]\nca_file = \"/nonexistent.pem\""),
            "store.tls.ca_file",
            "",
        );
        refused(kind, "kind = \"embedded\"", "store.path", "required");
        refused(
            kind,
            "kind = \"embedded\"\npath = \"\"",
            "store.path",
            "empty",
        );
        refused(
            kind,
            "path = \"/var/lib/dedupd\"",
            "store.path",
            "only read by kind",
        );
        // Accepted: valid(...) would panic on an error.
        let ok = BASE.replace(kind, "kind = \"embedded\"\npath = \"/var/lib/dedupd\"");
        assert!(Config::from_toml(&ok, std::path::Path::new("t.toml")).is_ok());
        let ok = BASE.replace(
            kind,
            &pg("url = \"postgresql://u:p@a:5432/db?sslmode=require\""),
        );
        assert!(Config::from_toml(&ok, std::path::Path::new("t.toml")).is_ok());
    }

    #[test]
    fn store_rules() {
        let redis = |rest: &str| format!("kind = \"redis\"\n{rest}");
        let kind = "kind = \"memory\"";
        refused(kind, &redis("url = \"http://x\""), "store.url", "redis://");
        refused(kind, &redis("url = []"), "store.url", "at least one");
        refused(
            kind,
            &redis("url = [\"redis://a\", \"rediss://b\"]"),
            "store.url",
            "one scheme",
        );
        refused(
            kind,
            &redis("url = [\"redis://a/3\"]"),
            "store.url",
            "database 0",
        );
        refused(
            kind,
            &redis("url = \"redis://a/x\""),
            "store.url",
            "does not parse",
        );
        refused(kind, "key_prefix = \"\"", "store.key_prefix", "non-empty");
        refused(
            kind,
            "key_prefix = \"a b\"",
            "store.key_prefix",
            "whitespace",
        );
        refused(
            kind,
            "key_prefix = \"{dedupd}\"",
            "store.key_prefix",
            "brace",
        );
        refused(
            kind,
            "timeout = \"0s\"",
            "store.timeout",
            "\"10ms\" to \"1m\"",
        );
        // kind = "memory" ignores the url.
        parse(&BASE.replace(kind, "kind = \"memory\"\nurl = \"nonsense\"")).unwrap();
        parse(&BASE.replace(
            kind,
            &redis("url = [\"rediss://:pw@a:7000\", \"rediss://b\"]"),
        ))
        .unwrap();
    }

    #[test]
    fn tls_rules() {
        let tls = |table: &str, body: &str| format!("[{table}.tls]\n{body}\n[store]");
        let existing = file!(); // a file that exists while tests run from the crate root
        refused(
            "[store]",
            &tls("upstream", "ca_file = \"/x\""),
            "upstream.tls",
            "amqps://",
        );
        let amqps = BASE.replace("amqp://", "amqps://");
        let cases = [
            (
                "ca_file = \"/nonexistent/ca.pem\"",
                "upstream.tls.ca_file",
                "not a file",
            ),
            (
                "cert_file = \"/nonexistent\"",
                "upstream.tls.key_file",
                "go together",
            ),
            (
                "key_file = \"/nonexistent\"",
                "upstream.tls.cert_file",
                "go together",
            ),
        ];
        for (body, key, hint) in cases {
            let (k, m) = invalid_of(&amqps.replace("[store]", &tls("upstream", body)));
            assert_eq!((k.as_str(), m.contains(hint)), (key, true), "{m}");
        }
        parse(&amqps.replace(
            "[store]",
            &tls("upstream", &format!("ca_file = {existing:?}")),
        ))
        .unwrap();
        // A downstream that defaults to a plain upstream URL cannot take TLS settings.
        refused(
            "[store]",
            &tls("downstream", "ca_file = \"/x\""),
            "downstream.tls",
            "amqps://",
        );
        refused(
            "kind = \"memory\"",
            "kind = \"redis\"\n[store.tls]",
            "store.tls",
            "rediss://",
        );
    }

    #[test]
    fn metrics_and_tuning_rules() {
        let at = "[store]";
        let with = |s: &str| format!("{s}\n[store]");
        refused(
            at,
            &with("[metrics]\nlisten = \"localhost:9187\""),
            "metrics.listen",
            "IP:PORT",
        );
        let cases = [
            ("batch_size = 0", "tuning.batch_size", "1 to 10000"),
            ("batch_size = 10001", "tuning.batch_size", "1 to 10000"),
            ("publish_window = 0", "tuning.publish_window", "at least 1"),
            (
                "backoff_min = \"0s\"",
                "tuning.backoff_min",
                "longer than 0",
            ),
            ("backoff_min = \"10s\"", "tuning.backoff_min", "backoff_max"),
        ];
        for (line, key, hint) in cases {
            refused(at, &with(&format!("[tuning]\n{line}")), key, hint);
        }
    }

    #[test]
    fn route_rules() {
        let (key, _) = invalid_of(BASE.split("[routes.orders]").next().unwrap());
        assert_eq!(key, "routes");
        refused(
            "[routes.orders]",
            "[routes.\"or ders\"]",
            "routes.or ders",
            "A-Z",
        );
        refused("[routes.orders]", "[routes.\"\"]", "routes.", "A-Z");
        refused(
            "queue = \"orders.in\"",
            "queue = \"\"",
            "routes.orders.queue",
            "empty",
        );
        refused(
            "routing_key = \"orders.out\"",
            "window = \"500ms\"",
            "routes.orders.routing_key",
            "loop",
        );
        refused(
            "\"orders.out\"",
            "\"orders.in\"",
            "routes.orders.routing_key",
            "loop",
        );
        refused(
            "\"orders.out\"",
            "\"\"",
            "routes.orders.routing_key",
            "nowhere",
        );
        refused(
            "\"orders.out\"",
            "\"x\"\nwindow = \"500ms\"",
            "routes.orders.window",
            "1s",
        );
        let twin = "[routes.orders]\nqueue = \"orders.in\"\nexchange = \"x\"\n[routes.twin]";
        refused("[routes.orders]", twin, "routes.twin.queue", "\"orders\"");
        // With a non-default exchange, or on another broker, the message's own key is fine.
        parse(
            &BASE
                .replace("exchange = \"\"", "exchange = \"out\"")
                .replace("routing_key = \"orders.out\"", ""),
        )
        .unwrap();
        let other = "[downstream]\nurl = \"amqp://10.255.255.1:5672/%2f\"\n[store]";
        parse(
            &BASE
                .replace("[store]", other)
                .replace("routing_key = \"orders.out\"", ""),
        )
        .unwrap();
    }

    #[test]
    fn audit_exchange_and_stamp_header_rules() {
        let rk = "routing_key = \"orders.out\"";
        let with = |extra: &str| format!("{rk}\n{extra}");
        refused(
            "exchange = \"\"",
            "exchange = \"out\"\nduplicates_exchange = \"out\"",
            "routes.orders.duplicates_exchange",
            "separate exchange",
        );
        refused(
            rk,
            &with(&format!("duplicates_exchange = {:?}", "d".repeat(256))),
            "routes.orders.duplicates_exchange",
            "255",
        );
        refused(
            rk,
            &with("key = \"header:x-id\"\nstamp_header = \"x-id\""),
            "routes.orders.stamp_header",
            "overwrite",
        );
        refused(
            rk,
            &with("stamp_header = \" x-key\""),
            "routes.orders.stamp_header",
            "spaces",
        );
        let ok = parse(&BASE.replace(
            rk,
            &with(
                "duplicates_exchange = \"dups\"\nstamp_header = \"x-dedup-key\"\n\
                 window_mode = \"sliding\"\non_conflict = \"reject\"",
            ),
        ))
        .unwrap();
        let route = &ok.routes["orders"];
        assert_eq!(route.duplicates_exchange, "dups");
        assert_eq!(route.stamp_header, "x-dedup-key");
        assert_eq!(route.window_mode, crate::config::WindowMode::Sliding);
        assert_eq!(route.on_conflict, crate::config::OnConflict::Reject);
        let defaults = parse(BASE).unwrap();
        let route = &defaults.routes["orders"];
        assert_eq!(route.window_mode, crate::config::WindowMode::Fixed);
        assert_eq!(route.on_conflict, crate::config::OnConflict::Drop);
        assert!(route.duplicates_exchange.is_empty() && route.stamp_header.is_empty());
        let unknown = parse(&BASE.replace(rk, &with("on_conflict = \"keep\"")))
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("forward"), "{unknown}");
    }

    /// Values no operator means, each refused with its bounds and the reason for them; short
    /// leases of a few seconds stay valid with every other setting at its default.
    #[test]
    fn durations_are_bounded() {
        let kind = "kind = \"memory\"";
        let store = |line: &str| format!("{kind}\n{line}");
        let tuning = |line: &str| format!("[tuning]\n{line}\n[store]");
        let cases = [
            (
                kind,
                store("lease = \"500ms\""),
                "store.lease",
                "\"1s\" to \"1h\"",
            ),
            (
                kind,
                store("lease = \"300000000years\""),
                "store.lease",
                "crashed",
            ),
            (
                kind,
                store("timeout = \"5ms\""),
                "store.timeout",
                "\"10ms\"",
            ),
            (kind, store("timeout = \"2m\""), "store.timeout", "\"1m\""),
            (
                "[store]",
                tuning("confirm_timeout = \"1ns\""),
                "tuning.confirm_timeout",
                "\"1s\" to \"10m\"",
            ),
            (
                "[store]",
                tuning("confirm_timeout = \"1h\""),
                "tuning.confirm_timeout",
                "stuck broker",
            ),
            (
                "[store]",
                tuning("shutdown_grace = \"2h\""),
                "tuning.shutdown_grace",
                "\"1h\"",
            ),
            (
                "[store]",
                tuning("backoff_max = \"1day\""),
                "tuning.backoff_max",
                "\"1h\"",
            ),
            (
                "routing_key = \"orders.out\"",
                "routing_key = \"orders.out\"\nwindow = \"300000000years\"".to_owned(),
                "routes.orders.window",
                "\"1s\" to \"365d\"",
            ),
            (
                "routing_key = \"orders.out\"",
                "routing_key = \"orders.out\"\nwindow = \"366days\"".to_owned(),
                "routes.orders.window",
                "Redis",
            ),
        ];
        for (from, to, key, hint) in cases {
            refused(from, &to, key, hint);
        }
        for ok in [
            store("lease = \"1s\""),
            store("lease = \"3s\""),
            store("lease = \"1h\"\ntimeout = \"10ms\""),
            store("timeout = \"1m\""),
        ] {
            parse(&BASE.replace(kind, &ok)).unwrap();
        }
        parse(&BASE.replace(
            "[store]",
            &tuning("confirm_timeout = \"1s\"\nshutdown_grace = \"0s\"\nbackoff_max = \"1h\""),
        ))
        .unwrap();
        parse(&BASE.replace(
            "routing_key = \"orders.out\"",
            "routing_key = \"orders.out\"\nwindow = \"365d\"",
        ))
        .unwrap();
    }

    /// Names the broker would refuse at run time are refused by `check`.
    #[test]
    fn names_fit_amqp_limits() {
        let long = "q".repeat(256);
        let max = "q".repeat(255);
        for (from, field) in [
            ("queue = \"orders.in\"", "queue"),
            ("exchange = \"\"", "exchange"),
            ("routing_key = \"orders.out\"", "routing_key"),
        ] {
            let (k, m) = invalid_of(&BASE.replace(from, &format!("{field} = \"{long}\"")));
            assert_eq!(k, format!("routes.orders.{field}"), "{m}");
            assert!(m.contains("255 bytes"), "{m}");
            parse(&BASE.replace(from, &format!("{field} = \"{max}\""))).unwrap();
        }
        refused(
            "exchange = \"\"",
            &format!("exchange = \"\"\nkey = \"header:{long}\""),
            "routes.orders.key",
            "255 bytes",
        );
        // The consumer tag `dedupd-{route}-{16 hex}-{epoch}` must fit in 255 bytes.
        let name = "r".repeat(MAX_ROUTE_NAME);
        let tag = format!("dedupd-{name}-{:016x}-{}", u64::MAX, u64::MAX);
        assert_eq!(tag.len(), 255);
        parse(&BASE.replace("[routes.orders]", &format!("[routes.{name}]"))).unwrap();
        let name = "r".repeat(MAX_ROUTE_NAME + 1);
        let (k, m) = invalid_of(&BASE.replace("[routes.orders]", &format!("[routes.{name}]")));
        assert_eq!(k, format!("routes.{name}"));
        assert!(m.contains("at most 210"), "{m}");
        refused(
            "kind = \"memory\"",
            &format!("kind = \"memory\"\nkey_prefix = \"{}\"", "p".repeat(65)),
            "store.key_prefix",
            "at most 64",
        );
        parse(&BASE.replace(
            "kind = \"memory\"",
            &format!("kind = \"memory\"\nkey_prefix = \"{}\"", "p".repeat(64)),
        ))
        .unwrap();
    }

    /// The loop guard knows one broker by any of its names, and tells ports and vhosts apart.
    #[test]
    fn same_broker_however_spelled() {
        let url = |host: &str| format!("amqp://guest:guest@{host}/%2f");
        assert!(same_broker(&url("127.0.0.1:5672"), &url("localhost:5672")));
        assert!(same_broker(&url("LOCALHOST:5672"), &url("localhost")));
        assert!(same_broker(&url("127.0.0.1"), &url("localhost:5672")));
        assert!(!same_broker(&url("127.0.0.1:5672"), &url("localhost:5673")));
        assert!(!same_broker(&url("127.0.0.1:5672"), &url("127.0.0.1:5673")));
        assert!(!same_broker(&url("127.0.0.1:5672"), &url("127.0.0.2:5672")));
        assert!(!same_broker(
            "amqp://127.0.0.1:5672/%2f",
            "amqp://localhost:5672/other"
        ));
        // Unparsable counts as the same (refuse rather than risk a loop).
        assert!(same_broker(&url("127.0.0.1:5672"), "amqp://h:notaport/%2f"));

        // The route's own queue as routing_key, downstream spelled differently: a loop.
        let text = BASE.replace(
            "[store]",
            "[downstream]\nurl = \"amqp://guest:guest@localhost:5672/%2f\"\n[store]",
        );
        let (key, message) = invalid_of(&text.replace("\"orders.out\"", "\"orders.in\""));
        assert_eq!(key, "routes.orders.routing_key");
        assert!(message.contains("loop"), "{message}");
        parse(&text).unwrap();
        // Same host, another port: another broker, so the queue's own name is fine.
        let other_port = BASE.replace(
            "[store]",
            "[downstream]\nurl = \"amqp://guest:guest@localhost:5673/%2f\"\n[store]",
        );
        parse(&other_port.replace("\"orders.out\"", "\"orders.in\"")).unwrap();
    }
}
