//! What keeps passwords out of everything dedupd prints.
//!
//! - [`SecretUrl`]: a URL that may carry a password. Its `Debug` and `Display` show it with the
//!   password masked ([`redact_url`]); [`SecretUrl::expose`] is the one way to the real text,
//!   for the few places that connect. `upstream.url`, `downstream.url` and `amqp::Endpoint`
//!   hold one, so a `{:?}` of any of them (or of the whole `Config`) in a log line shows no
//!   password. `store.url` is a [`StoreUrl`](super::StoreUrl), whose `Debug` masks the same way.
//! - [`Interpolations`]: every value `${VAR}` filled in, kept in the `Config` (never
//!   serialized) so that `Debug for Config` shows `${NAME}` in its place, whatever key it went
//!   to: a value from the environment may be a secret the schema does not know as one.
//! - [`redact_url`] for a URL dedupd shows, and `redact_in_text` for messages that may quote a
//!   config line whatever its syntax (TOML and URL parse errors).
//! - [`scrub_logs`]: the last line of defence, for what dedupd does not format itself. lapin
//!   logs every frame it writes at TRACE, the `connection.start-ok` that carries the SASL
//!   response (`\0user\0password`) included, as the response's bytes in decimal
//!   (`LongString([0, 103, 117, ...])`). [`Config::load`](super::Config::load) registers every
//!   URL password it loads (literal or from `${VAR}`, as written and percent-decoded), and the
//!   binary's log writer passes each line through [`scrub_logs`], which replaces any of them,
//!   in any form a log line can hold (plain, `{:?}`- or JSON-escaped, decimal bytes), with
//!   `***`. Chosen over silencing lapin's frame logs: those are what one turns TRACE on for.
//!   Passwords stay registered for the life of the process: on a reload, the routes of the
//!   previous configuration still log while they drain, and a rotated-out password is still
//!   one.

use std::borrow::Cow;
use std::fmt;
use std::sync::RwLock;

use serde::Deserialize;

use super::Config;

/// A URL that may carry a password: shown masked by `Debug` and `Display`, exposed only on
/// request ([`SecretUrl::expose`]). Deserializes from a plain string.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting. Never format this into output.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// The password as written in the URL (still percent-encoded), if there is one: the part
    /// of the userinfo [`redact_url`] hides.
    pub fn password(&self) -> Option<&str> {
        let rest = &self.0[self.0.find("://")? + 3..];
        let userinfo = &rest[..rest.rfind('@')?];
        userinfo
            .split_once(':')
            .map(|(_, pw)| pw)
            .filter(|pw| !pw.is_empty())
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl fmt::Debug for SecretUrl {
    /// The redacted URL, quoted like a string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for SecretUrl {
    /// The redacted URL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The `(NAME, value)` of every `${NAME}` interpolation filled in, in file order. `Debug`
/// shows the names only.
#[derive(Clone, Default)]
pub struct Interpolations(Vec<(String, String)>);

impl fmt::Debug for Interpolations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("${{{name}}}")))
            .finish()
    }
}

impl Interpolations {
    pub(super) fn push(&mut self, name: &str, value: String) {
        self.0.push((name.to_owned(), value));
    }

    /// `message` (an error that may quote values) with every value of four characters or
    /// more replaced by its `${NAME}`, as written and as `{:?}` quotes it. Shorter values would
    /// garble the message and hide little; four characters is a compromise.
    pub(super) fn hide_in_message(&self, mut message: String) -> String {
        for (name, value) in self.0.iter().filter(|(_, v)| v.chars().count() >= 4) {
            // serde quotes strings with `{:?}`: scrub that form too.
            let debug = format!("{value:?}");
            for form in [value.as_str(), &debug[1..debug.len() - 1]] {
                message = message.replace(form, &format!("${{{name}}}"));
            }
        }
        message
    }

    /// `debug` (a `{:?}` or `{:#?}` rendering) with every value, however short, replaced by its
    /// `${NAME}` inside quoted strings, where `Debug` puts every string; numbers, durations
    /// and names of variants outside them stay as they are. At each position the longest value
    /// wins, and what was put in is not searched again.
    pub(super) fn hide_in_debug(&self, debug: &str) -> String {
        let mut forms: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.0 {
            let quoted = format!("{value:?}");
            let inner = quoted[1..quoted.len() - 1].to_owned();
            for form in [inner, value.escape_debug().to_string()] {
                if !form.is_empty() {
                    forms.push((form, format!("${{{name}}}")));
                }
            }
        }
        forms.sort_by_key(|(form, _)| std::cmp::Reverse(form.len()));
        let mut out = String::with_capacity(debug.len());
        let (mut rest, mut quoted) = (debug, false);
        while let Some(c) = rest.chars().next() {
            if quoted {
                if let Some((form, name)) = forms.iter().find(|(f, _)| rest.starts_with(f)) {
                    out.push_str(name);
                    rest = &rest[form.len()..];
                    continue;
                }
            }
            let mut take = c.len_utf8();
            if quoted && c == '\\' {
                // An escape, copied whole so that `\"` does not end the string.
                take += rest[1..].chars().next().map_or(0, char::len_utf8);
            } else if c == '"' {
                quoted = !quoted;
            }
            out.push_str(&rest[..take]);
            rest = &rest[take..];
        }
        out
    }
}

/// Every form of every password registered by [`remember_for_logs`], longest first.
static LOG_SECRETS: RwLock<Vec<LogForm>> = RwLock::new(Vec::new());

/// One way a password may appear in a log line.
#[derive(PartialEq, Eq)]
struct LogForm {
    text: String,
    /// A list of decimal bytes: matches whole numbers only, so `1, 2` is not found in `31, 2`.
    numbers: bool,
}

/// Registers every URL password of `config` for [`scrub_logs`] (in addition to those already
/// registered: see the module docs).
pub fn remember_for_logs(config: &Config) {
    let mut urls: Vec<&str> = vec![
        config.upstream.url.expose(),
        config.downstream_url().expose(),
    ];
    urls.extend(config.store.url.expose());
    let forms = urls
        .into_iter()
        .filter_map(|url| SecretUrl::from(url).password().map(log_forms))
        .flatten();
    // A poisoned lock only means a writer panicked mid-update: the list is still usable.
    let mut secrets = LOG_SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for form in forms {
        if !secrets.contains(&form) {
            secrets.push(form);
        }
    }
    // Longest first, so a password that contains another is hidden whole.
    secrets.sort_by_key(|form| std::cmp::Reverse(form.text.len()));
}

/// The forms `password` (as written in a URL) may take in a log line: as written and
/// percent-decoded; each plain, `{:?}`-escaped, JSON-escaped (`--log-format json`) and both;
/// and the decoded bytes in decimal, as `Debug` of a byte string prints them (lapin's SASL
/// response).
fn log_forms(password: &str) -> Vec<LogForm> {
    let raw = percent_decode(password);
    let decoded = String::from_utf8_lossy(&raw);
    let mut texts: Vec<String> = Vec::new();
    for pw in [password, &decoded] {
        let debug = format!("{pw:?}");
        let debug = &debug[1..debug.len() - 1];
        texts.extend([pw, debug].map(str::to_owned));
        texts.extend([pw, debug].map(json_escape));
    }
    let mut forms: Vec<LogForm> = texts
        .into_iter()
        .map(|text| LogForm {
            text,
            numbers: false,
        })
        .collect();
    let bytes: Vec<String> = raw.iter().map(|b| b.to_string()).collect();
    forms.push(LogForm {
        text: bytes.join(", "),
        numbers: true,
    });
    forms.retain(|f| !f.text.is_empty());
    forms
}

/// `line` with every registered password form replaced by `***` (see the module docs).
/// Borrowed, without copying, when there is nothing to hide.
pub fn scrub_logs(line: &str) -> Cow<'_, str> {
    let secrets = LOG_SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut line = Cow::Borrowed(line);
    for form in secrets.iter() {
        if line.contains(form.text.as_str()) {
            line = Cow::Owned(replace_form(&line, form));
        }
    }
    line
}

fn replace_form(line: &str, form: &LogForm) -> String {
    if form.text.is_empty() {
        return line.to_owned();
    }
    let digit_at = |s: &str, i: usize| s.as_bytes().get(i).is_some_and(u8::is_ascii_digit);
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(form.text.as_str()) {
        let end = at + form.text.len();
        let inside_number =
            form.numbers && (digit_at(rest, end) || (at > 0 && digit_at(rest, at - 1)));
        out.push_str(&rest[..at]);
        if !inside_number {
            out.push_str("***");
            rest = &rest[end..];
        } else {
            // Part of a longer number: keep one character and search on after it.
            let next = rest[at..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[at..at + next]);
            rest = &rest[at + next..];
        }
    }
    out.push_str(rest);
    out
}

/// The bytes of `text` with `%XX` sequences decoded, as URL parsers do with userinfo.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// `text` escaped as inside a JSON string.
fn json_escape(text: &str) -> String {
    serde_json::to_string(text)
        .map(|quoted| quoted[1..quoted.len() - 1].to_owned())
        .unwrap_or_else(|_| text.to_owned())
}

/// `url` with any password replaced by `***`, for logs and `check` output: the userinfo's,
/// and a `password=` query parameter (PostgreSQL URLs accept one).
pub fn redact_url(url: &str) -> String {
    let redacted = redact_userinfo(url);
    let Some((base, query)) = redacted.split_once('?') else {
        return redacted;
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The last '@' ends the userinfo; an unencoded '/' or '@' in a password then errs towards
    // hiding too much rather than too little.
    match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `text` with anything that may be a password hidden, for messages that may quote a config
/// line or value, whatever its syntax.
///
/// A broken line cannot be trusted to delimit a URL: `"`, `'`, `,`, `]`, `#`, `@`, `:` and
/// spaces are all legal in a password, and a TOML syntax error is exactly when a quote in one
/// ends the string early. So each line is treated on its own: on a line with an `@`, everything
/// from its first `:` to its *last* `@` may be userinfo. If that `:` starts `://`, a plain user
/// name right after it is kept (`amqp://user:***@host`); otherwise (a URL fragment quoted
/// without its scheme) all of it goes (`...:***@host`). This hides too much rather than too
/// little, and only ever runs on error messages.
pub(super) fn redact_in_text(text: &str) -> String {
    text.split_inclusive('\n').map(redact_line).collect()
}

fn redact_line(line: &str) -> String {
    let Some(at) = line.rfind('@') else {
        return line.to_owned();
    };
    let Some(colon) = line[..at].find(':') else {
        return line.to_owned();
    };
    if !line[colon..].starts_with("://") {
        // `user:password@host` without a scheme, or a scheme after the first `:` (inside a
        // password, for all we know).
        return format!("{}:***{}", &line[..colon], &line[at..]);
    }
    let scheme_end = colon + 3;
    let userinfo = &line[scheme_end..at];
    // A user name as URLs spell it; anything else may be the tail of a broken password.
    let plain = |user: &str| {
        user.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '%'))
    };
    let shown = match userinfo.split_once(':') {
        Some((user, _)) if plain(user) => format!("{user}:***"),
        None if plain(userinfo) => userinfo.to_owned(),
        _ => "***".to_owned(),
    };
    format!("{}{shown}{}", &line[..scheme_end], &line[at..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::interpolate::escape_basic;
    use crate::config::test_support::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p%40ss@h/v"), "amqps://u:***@h/v");
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://user:p@ss/x@h"), "rediss://user:***@h");
        assert_eq!(redact_url("redis://user@h"), "redis://user@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=pw&application_name=x"),
            "postgres://u@h/db?sslmode=require&password=***&application_name=x"
        );
        assert_eq!(
            redact_url("postgres://u:pw@h/db?PASSWORD=pw"),
            "postgres://u:***@h/db?PASSWORD=***"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require"
        );
        assert_eq!(
            redact_in_text("url = \"amqp://a:b@h\", [\"redis://:c@d\"]"),
            "url = \"amqp://a:***@d\"]"
        );
    }

    /// Passwords made of `Zq` pieces joined by every character a URL delimiter search could
    /// stop at: no output may contain `Zq`.
    const NASTY_PASSWORDS: &[&str] = &[
        "Zq1\"Zq2",
        "Zq1'Zq2",
        "Zq1,Zq2",
        "Zq1]Zq2",
        "Zq1@Zq2",
        "Zq1#Zq2",
        "Zq1 Zq2",
        "Zq1\"], Zq2@Zq3#Zq4'Zq5",
        "Zq1://Zq2",
    ];

    #[test]
    fn redaction_survives_any_password_syntax() {
        for pw in NASTY_PASSWORDS {
            let lines = [
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\""),
                format!("url = 'amqp://guest:{pw}@h/%2f' # note"),
                format!("url = [\"redis://:{pw}@a:7000\", \"redis://b:7001\"]"),
                format!("11 | url = amqp://u:{pw}@h\n   |       ^^^^\nexpected a value"),
                format!("invalid type: string \"u:{pw}@h\", expected a URL"),
                format!("a = \"http://x\", url = \"amqp://u:{pw}@h\""),
            ];
            for line in lines {
                let out = redact_in_text(&line);
                assert!(!out.contains("Zq"), "{line:?} -> {out:?}");
            }
        }
        // What is not a password stays readable.
        assert_eq!(
            redact_in_text("line 3, column 7\nexpected `=`"),
            "line 3, column 7\nexpected `=`"
        );
        assert_eq!(
            redact_in_text("url = \"amqp://guest:pw@h:5672/%2f\""),
            "url = \"amqp://guest:***@h:5672/%2f\""
        );
    }

    /// Whatever the file's syntax, `check` shows no password: neither in a TOML error quoting
    /// the line, nor in a URL parser's complaint, nor in the summary of a valid file.
    #[test]
    fn no_password_shown_whatever_the_syntax() {
        for pw in NASTY_PASSWORDS {
            // Valid TOML: the URL parsers' messages, or `describe`.
            let escaped = escape_basic(pw);
            for (from, to) in [
                ("guest:guest", format!("guest:{escaped}")),
                ("guest:guest", format!(":{escaped}")),
                (
                    "kind = \"memory\"",
                    format!("kind = \"redis\"\nurl = \"redis://:{escaped}@h:6379/0\""),
                ),
                (
                    "kind = \"memory\"",
                    format!("kind = \"redis\"\nurl = [\"redis://:{escaped}@h:6379/1\"]"),
                ),
                (
                    "kind = \"memory\"",
                    format!("kind = \"redis\"\nurl = \"redis://u:{escaped}@h:x/0\""),
                ),
            ] {
                let shown = match parse(&BASE.replace(from, &to)) {
                    Ok(c) => c.describe(),
                    Err(e) => e.to_string(),
                };
                assert!(!shown.contains("Zq"), "{pw:?} in {to:?}:\n{shown}");
            }
            // Syntax errors on the URL line.
            for line in [
                // Unescaped, so the quote ends the string early.
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\""),
                format!("url = 'amqp://guest:{pw}@127.0.0.1:5672/%2f'"),
                // Unterminated.
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f"),
                // Unquoted.
                format!("url = amqp://guest:{pw}@127.0.0.1:5672/%2f"),
                // A list where a string was expected, or a bracket in the wrong place.
                format!("url = [\"amqp://guest:{pw}@127.0.0.1:5672/%2f\"]"),
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\"]"),
            ] {
                let text = BASE.replace("url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"", &line);
                let shown = match parse(&text) {
                    Ok(c) => c.describe(),
                    Err(e) => e.to_string(),
                };
                assert!(!shown.contains("Zq"), "{line}\n->\n{shown}");
            }
        }
    }

    #[test]
    fn secret_url_shows_no_password() {
        let url = SecretUrl::from("amqps://user:p%40ss@h:5671/%2f");
        assert_eq!(format!("{url}"), "amqps://user:***@h:5671/%2f");
        assert_eq!(format!("{url:?}"), "\"amqps://user:***@h:5671/%2f\"");
        assert_eq!(url.expose(), "amqps://user:p%40ss@h:5671/%2f");
        assert_eq!(url.password(), Some("p%40ss"));
        assert_eq!(SecretUrl::from("redis://:pw@h").password(), Some("pw"));
        assert_eq!(SecretUrl::from("redis://user@h").password(), None);
        assert_eq!(SecretUrl::from("amqp://h/%2f").password(), None);
        let cluster = crate::config::StoreUrl::Cluster(vec!["redis://:a1b2c3@x".into()]);
        assert_eq!(format!("{cluster:?}"), "Cluster([\"redis://:***@x\"])");
    }

    /// Every table and key a deployment may set, TLS files and a cluster list included, with a
    /// password in every URL (literal or from `${VAR}`) and values from `${VAR}` in other keys:
    /// `{:?}` and `{:#?}` of the whole config show none of them.
    #[test]
    fn config_debug_shows_no_password_and_no_env_value() {
        let tls_file = file!(); // exists while tests run from the crate root
        let env = [
            ("DEDUPD_T_DBG_UP_PW", "Env-Up-Pw-9c2e"),
            ("DEDUPD_T_DBG_STORE_PW", "Env-Store-Pw-41d7"),
            // Quotes and backslashes, which `{:?}` escapes.
            ("DEDUPD_T_DBG_RK", "rk\"quoted\\Env-Rk-55ab"),
            // Short, and in a key that is no URL.
            ("DEDUPD_T_DBG_QUEUE", "q7"),
            ("DEDUPD_T_DBG_PREFIX", "Env-Prefix-0f3c"),
            ("DEDUPD_T_DBG_CA", tls_file),
        ];
        for (name, value) in env {
            std::env::set_var(name, value);
        }
        let text = format!(
            r#"
[upstream]
url = "amqps://dedupd:${{DEDUPD_T_DBG_UP_PW}}@127.0.0.1:5671/%2f"
prefetch = 100
[upstream.tls]
ca_file = "${{DEDUPD_T_DBG_CA}}"
cert_file = "{tls_file}"
key_file = "{tls_file}"
[downstream]
url = "amqps://pub:Lit-Down-Pw-7e1a@127.0.0.2:5671/other"
[downstream.tls]
ca_file = "{tls_file}"
[store]
kind = "redis"
url = ["rediss://:${{DEDUPD_T_DBG_STORE_PW}}@10.0.0.1:7000", "rediss://u:Lit-Store-Pw-3b8d@10.0.0.2:7001"]
key_prefix = "${{DEDUPD_T_DBG_PREFIX}}"
lease = "10s"
on_error = "forward"
timeout = "1s"
allow_eviction = true
[store.tls]
ca_file = "{tls_file}"
[metrics]
listen = "127.0.0.1:9999"
[tuning]
batch_size = 10
publish_window = 20
confirm_timeout = "5s"
shutdown_grace = "1s"
backoff_min = "10ms"
backoff_max = "1s"
[routes.orders]
queue = "${{DEDUPD_T_DBG_QUEUE}}"
exchange = ""
routing_key = "${{DEDUPD_T_DBG_RK}}"
key = "header:x-id"
window = "1h"
on_missing_key = "hash_body"
mode = "observe"
"#
        );
        let config = parse(&text).unwrap();
        let hidden = [
            "Env-Up-Pw-9c2e",
            "Env-Store-Pw-41d7",
            "Env-Rk-55ab",
            "\"q7\"",
            "Env-Prefix-0f3c",
            tls_file,
            "Lit-Down-Pw-7e1a",
            "Lit-Store-Pw-3b8d",
        ];
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            for secret in hidden {
                assert!(!shown.contains(secret), "{secret:?} in\n{shown}");
            }
            for expected in [
                "amqps://dedupd:***@127.0.0.1:5671/%2f",
                "amqps://pub:***@127.0.0.2:5671/other",
                "rediss://:***@10.0.0.1:7000",
                "rediss://u:***@10.0.0.2:7001",
                "${DEDUPD_T_DBG_QUEUE}",
                "${DEDUPD_T_DBG_RK}",
                "${DEDUPD_T_DBG_PREFIX}",
                // The same path given literally is hidden too: a value is hidden wherever
                // it appears, not only where it was interpolated.
                "${DEDUPD_T_DBG_CA}",
                "Observe",
            ] {
                assert!(shown.contains(expected), "{expected:?} not in\n{shown}");
            }
        }
        // The endpoints built from it show no password either.
        let endpoint = crate::amqp::Endpoint {
            url: config.downstream_url().clone(),
            tls: config.downstream_tls().cloned(),
            name: "dedupd test".into(),
        };
        assert!(!format!("{endpoint:?}").contains("Lit-Down-Pw-7e1a"));
    }

    #[test]
    fn hide_in_debug_replaces_only_inside_strings() {
        let mut values = Interpolations::default();
        values.push("N", "1".into());
        values.push("LONG", "a1b".into());
        values.push("Q", "x\"y".into());
        let debug = r#"Route { window: 1s, queue: "a1b", key: "1", rk: "x\"y", n: 10 }"#;
        assert_eq!(
            values.hide_in_debug(debug),
            r#"Route { window: 1s, queue: "${LONG}", key: "${N}", rk: "${Q}", n: 10 }"#
        );
        assert_eq!(format!("{values:?}"), r#"["${N}", "${LONG}", "${Q}"]"#);
    }

    /// Every form a password may take in a log line is hidden, wherever it comes from.
    #[test]
    fn scrub_logs_hides_every_form_of_a_loaded_password() {
        std::env::set_var("DEDUPD_T_SCRUB_PW", "Sc\"rub%40Env");
        let text = BASE
            .replace("guest:guest@", "u:${DEDUPD_T_SCRUB_PW}@")
            .replace(
                "kind = \"memory\"",
                "kind = \"redis\"\nurl = \"redis://:LitScrub7@h:6379/0\"",
            );
        remember_for_logs(&parse(&text).unwrap());
        let bytes = |pw: &str| {
            let b: Vec<String> = pw.bytes().map(|b| b.to_string()).collect();
            b.join(", ")
        };
        for (line, secret) in [
            ("url=redis://:LitScrub7@h", "LitScrub7"),
            ("written Sc\"rub%40Env", "rub%40Env"),
            ("decoded Sc\"rub@Env", "rub@Env"),
            (r#"debug "Sc\"rub@Env""#, "rub@Env"),
            (r#"{"json":"Sc\\\"rub@Env"}"#, "rub@Env"),
            (
                &format!(
                    "response: LongString([0, 117, 0, {}])",
                    bytes("Sc\"rub@Env")
                ),
                &bytes("Sc\"rub@Env"),
            ),
            (
                &format!("LongString([0, 117, 0, {}])", bytes("LitScrub7")),
                &bytes("LitScrub7"),
            ),
        ] {
            let scrubbed = scrub_logs(line);
            assert!(!scrubbed.contains(secret), "{line} -> {scrubbed}");
            assert!(scrubbed.contains("***"), "{line} -> {scrubbed}");
        }
        // Numbers that merely contain the bytes stay, and so does a line without a password.
        let longer = format!("[1{}]", bytes("LitScrub7"));
        assert_eq!(scrub_logs(&longer), longer);
        assert!(matches!(scrub_logs("nothing here"), Cow::Borrowed(_)));
    }
}
