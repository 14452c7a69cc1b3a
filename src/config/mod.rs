//! The configuration file (`proxy.toml`): loading, and the one `validate()` that tells an
//! operator which key is wrong and how to fix it. Every other module takes its settings from
//! the types here; nothing else reads the file.
//!
//! - [`schema`]: the types, their defaults, and how each setting is spelled in the file.
//! - `interpolate`: `${VAR}` in string values, and parse errors that never show their values.
//! - `validate`: the rules serde cannot express, each message naming the key and the fix.
//! - [`secret`]: what keeps passwords out of output: [`SecretUrl`], `${VAR}` values hidden from
//!   `Debug for Config`, redaction of URLs and messages, and the log scrubber the binary uses.
//!
//! This root loads ([`Config::load`], [`Config::from_toml`]), validates ([`Config::validate`]),
//! summarises ([`Config::describe`]) and re-exports the schema, so `crate::config::Route` and
//! the like are the paths the rest of the crate uses.

mod interpolate;
pub mod schema;
pub mod secret;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use schema::*;
pub use secret::{redact_url, scrub_logs, SecretUrl};
pub use validate::{
    CONFIRM_TIMEOUT_BOUNDS, LEASE_BOUNDS, MAX_ROUTE_NAME, MAX_WAIT, STORE_TIMEOUT_BOUNDS,
    WINDOW_BOUNDS,
};

/// Why a config could not be loaded. Messages name the key and say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not fit the schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// `${VAR}` named a variable that is not set.
    #[error("{path}: environment variable ${{{var}}} is not set (used at line {line})")]
    MissingEnv {
        /// The file.
        path: PathBuf,
        /// The variable.
        var: String,
        /// 1-based line of the reference.
        line: usize,
    },
    /// A value parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key path, e.g. `routes.orders.routing_key`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl Config {
    /// Reads, interpolates `${VAR}`, parses and validates `path`, and registers its passwords
    /// for [`scrub_logs`] (every file the process runs with comes through here: the first
    /// one, and each reload).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::from_toml(&text, path)?;
        secret::remember_for_logs(&config);
        Ok(config)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let src = interpolate::interpolate(text, path)?;
        let mut config: Config =
            toml::from_str(&src.text).map_err(|e| src.parse_error(e, text, path))?;
        config.interpolated = src.values;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: returns the first problem, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::config(self)
    }

    /// The downstream URL, defaulting to the upstream one.
    pub fn downstream_url(&self) -> &SecretUrl {
        self.downstream
            .as_ref()
            .and_then(|d| d.url.as_ref())
            .unwrap_or(&self.upstream.url)
    }

    /// The downstream TLS settings (the upstream ones when the downstream URL is defaulted).
    pub fn downstream_tls(&self) -> Option<&Tls> {
        match &self.downstream {
            Some(Downstream { url: Some(_), tls }) => tls.as_ref(),
            Some(Downstream {
                url: None,
                tls: Some(tls),
            }) => Some(tls),
            _ => self.upstream.tls.as_ref(),
        }
    }

    /// The human summary `dedupd check` prints: endpoints (passwords redacted), store settings
    /// and one line per route.
    pub fn describe(&self) -> String {
        let s = &self.store;
        let tls = |t: Option<&Tls>| if t.is_some() { " (tls settings)" } else { "" };
        let store_url = match (&s.kind, &s.url) {
            (StoreKind::Memory, _) => "in-process, not shared".to_owned(),
            (StoreKind::Embedded, _) => match &s.path {
                Some(path) => format!("{}, not shared", path.display()),
                None => "(no path)".to_owned(),
            },
            (StoreKind::Postgres, StoreUrl::One(url)) => redact_url(url),
            (StoreKind::Postgres, StoreUrl::Cluster(urls)) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("[{}]", urls.join(", "))
            }
            (StoreKind::Redis, StoreUrl::One(url)) => redact_url(url),
            (StoreKind::Redis, StoreUrl::Cluster(urls)) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("cluster [{}]", urls.join(", "))
            }
        };
        let mut out = format!(
            "upstream:   {}{}, prefetch {}\n\
             downstream: {}{}\n\
             store:      {} {}{}, key_prefix {}, lease {}, timeout {}, on_error {}\n\
             metrics:    {}\n\
             routes:\n",
            self.upstream.url,
            tls(self.upstream.tls.as_ref()),
            self.upstream.prefetch,
            self.downstream_url(),
            tls(self.downstream_tls()),
            s.kind,
            store_url,
            tls(s
                .tls
                .as_ref()
                .filter(|_| matches!(s.kind, StoreKind::Redis | StoreKind::Postgres))),
            s.key_prefix,
            fmt_duration(s.lease),
            fmt_duration(s.timeout),
            s.on_error,
            self.metrics.listen,
        );
        for (name, r) in &self.routes {
            let routing_key = r.routing_key.as_deref().unwrap_or("(the message's own)");
            out.push_str(&format!(
                "  {name}: {} -> exchange {:?} routing_key {routing_key}, key {}, window {}, \
                 on_missing_key {}, mode {}\n",
                r.queue,
                r.exchange,
                r.key,
                fmt_duration(r.window),
                r.on_missing_key,
                r.mode,
            ));
        }
        out
    }
}

impl fmt::Debug for Config {
    /// The derived form (`{:?}` or `{:#?}`), which already masks URL passwords, with every
    /// value `${VAR}` filled in shown as `${VAR}`: such a value may be a secret in any key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Named `Config` so the output reads as the derived one would. Destructured so that a
        // new field is a compile error here rather than missing from `Debug`.
        #[derive(Debug)]
        #[allow(dead_code)] // read only by `Debug`
        struct Config<'a> {
            upstream: &'a Upstream,
            downstream: &'a Option<Downstream>,
            store: &'a StoreConfig,
            metrics: &'a MetricsConfig,
            tuning: &'a Tuning,
            routes: &'a std::collections::BTreeMap<String, Route>,
        }
        // `self::Config` is the module's, not the one just above.
        let self::Config {
            upstream,
            downstream,
            store,
            metrics,
            tuning,
            routes,
            interpolated,
        } = self;
        let fields = Config {
            upstream,
            downstream,
            store,
            metrics,
            tuning,
            routes,
        };
        let derived = if f.alternate() {
            format!("{fields:#?}")
        } else {
            format!("{fields:?}")
        };
        f.write_str(&interpolated.hide_in_debug(&derived))
    }
}

/// A duration in the largest whole unit, so it reads like the config (`24h`, not `1day`).
fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        humantime::format_duration(d).to_string()
    } else if ms == 0 || !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! The base config and the helpers every test module of `config` uses.

    use std::path::Path;

    use super::{Config, ConfigError};

    pub(crate) const BASE: &str = r#"
[upstream]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[store]
kind = "memory"

[routes.orders]
queue = "orders.in"
exchange = ""
routing_key = "orders.out"
"#;

    pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    /// Parses `text`, expecting a validation error, and returns `(key, message)`.
    pub(crate) fn invalid_of(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// Asserts that `BASE` with `from` replaced by `to` is refused for `key`, message containing `hint`.
    pub(crate) fn refused(from: &str, to: &str, key: &str, hint: &str) {
        assert!(BASE.contains(from), "{from:?} not in BASE");
        let (k, message) = invalid_of(&BASE.replacen(from, to, 1));
        assert_eq!(k, key, "{message}");
        assert!(message.contains(hint), "{key}: {message:?} lacks {hint:?}");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::test_support::*;
    use super::*;

    #[test]
    fn base_is_valid_with_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.upstream.prefetch, 2000);
        assert_eq!(c.routes["orders"].window, Duration::from_secs(86400));
        assert_eq!(c.downstream_url(), &c.upstream.url);
        assert_eq!(c.tuning.batch_size, 500);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = BASE.replace("url = ", "prefecth = 10\nurl = ");
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains("prefecth"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn bad_key_source_is_a_parse_error() {
        let err = parse(&BASE.replace("exchange = \"\"", "exchange = \"\"\nkey = \"header:\""))
            .unwrap_err();
        assert!(err.to_string().contains("header:NAME"), "{err}");
    }

    #[test]
    fn describe_shows_routes_but_no_password() {
        std::env::set_var("DEDUPD_T_DESCRIBE_PW", "topsecretpw");
        let text = BASE
            .replace("guest:guest@", "guest:${DEDUPD_T_DESCRIBE_PW}@")
            .replace(
                "kind = \"memory\"",
                "kind = \"redis\"\nurl = [\"redis://:${DEDUPD_T_DESCRIBE_PW}@a:7000\"]",
            );
        let out = parse(&text).unwrap().describe();
        assert!(!out.contains("topsecretpw"), "{out}");
        assert!(out.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "{out}");
        assert!(out.contains("redis://:***@a:7000"), "{out}");
        assert!(
            out.contains(
                "orders: orders.in -> exchange \"\" routing_key orders.out, key message_id, \
             window 24h, on_missing_key reject, mode enforce"
            ),
            "{out}"
        );
        assert!(out.contains("lease 30s"), "{out}");
    }

    #[test]
    fn durations_read_like_the_config() {
        let f = |ms| fmt_duration(Duration::from_millis(ms));
        assert_eq!(
            [
                f(86_400_000),
                f(30_000),
                f(90_000),
                f(120_000),
                f(100),
                f(1_500)
            ],
            ["24h", "30s", "90s", "2m", "100ms", "1500ms"]
        );
    }
}
