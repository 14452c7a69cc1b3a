//! `${VAR}` in string values: replaced by the environment variable, escaped for the kind of
//! string it sits in so that a value can never end its string or add keys; `$${` is a literal
//! `${`. What toml then says about the text is mapped back to the original file, so errors point
//! at the line the operator wrote and never quote a substituted value.

use std::path::Path;

use super::secret::{redact_in_text, Interpolations};
use super::ConfigError;

/// The kind of TOML string a `${VAR}` sits in: it decides how the value is escaped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Basic,
    MultiBasic,
    Literal,
    MultiLiteral,
}

impl Quote {
    fn delimiter(self) -> &'static str {
        match self {
            Quote::Basic => "\"",
            Quote::MultiBasic => "\"\"\"",
            Quote::Literal => "'",
            Quote::MultiLiteral => "'''",
        }
    }
}

/// One replaced span: `len` bytes at `at` in the interpolated text were `orig_len` at `orig_at`.
struct Substitution {
    at: usize,
    len: usize,
    orig_at: usize,
    orig_len: usize,
}

/// The TOML text after `${VAR}` interpolation, with what is needed to point parse errors back
/// at the original text and keep the substituted values out of them.
pub(super) struct Interpolated {
    pub(super) text: String,
    subs: Vec<Substitution>,
    /// `(name, value)` of every substituted variable.
    pub(super) values: Interpolations,
}

/// Replaces `${VAR}` inside quoted strings (comments and bare words are left alone) with the
/// variable's value, escaped for the kind of string it is in, so a value can never end the
/// string or add keys. `$${` stands for a literal `${`. Line numbers are preserved.
pub(super) fn interpolate(text: &str, path: &Path) -> Result<Interpolated, ConfigError> {
    let mut scan = Scanner {
        text,
        path,
        at: 0,
        line: 1,
        in_comment: false,
        quote: None,
        out: Interpolated {
            text: String::with_capacity(text.len()),
            subs: Vec::new(),
            values: Interpolations::default(),
        },
    };
    while let Some(c) = text[scan.at..].chars().next() {
        let take = match scan.quote {
            None => scan.outside_string(c),
            Some(q) => match scan.inside_string(q, c)? {
                Some(take) => take,
                // A reference was substituted and consumed.
                None => continue,
            },
        };
        let copied = &text[scan.at..scan.at + take];
        scan.line += copied.matches('\n').count();
        scan.out.text.push_str(copied);
        scan.at += take;
    }
    Ok(scan.out)
}

/// Where [`interpolate`] is in the text: a small TOML lexer that only knows strings and
/// comments, which is all it takes to tell a reference from the rest.
struct Scanner<'a> {
    text: &'a str,
    path: &'a Path,
    /// Byte offset of the next character.
    at: usize,
    /// 1-based line of `at`, for messages.
    line: usize,
    in_comment: bool,
    quote: Option<Quote>,
    out: Interpolated,
}

impl Scanner<'_> {
    /// Outside a string: notes a comment or the start of a string; returns the bytes to copy.
    fn outside_string(&mut self, c: char) -> usize {
        if self.in_comment {
            self.in_comment = c != '\n';
            return c.len_utf8();
        }
        let rest = &self.text[self.at..];
        let opened = [
            Quote::MultiBasic,
            Quote::MultiLiteral,
            Quote::Basic,
            Quote::Literal,
        ]
        .into_iter()
        .find(|q| rest.starts_with(q.delimiter()));
        self.in_comment = c == '#';
        match opened {
            Some(q) => {
                self.quote = Some(q);
                q.delimiter().len()
            }
            None => c.len_utf8(),
        }
    }

    /// Inside a string of kind `q`: the bytes to copy, or `None` once a reference (or `$${`)
    /// has been substituted.
    fn inside_string(&mut self, q: Quote, c: char) -> Result<Option<usize>, ConfigError> {
        let rest = &self.text[self.at..];
        let basic = matches!(q, Quote::Basic | Quote::MultiBasic);
        if basic && c == '\\' {
            // Copy an escape whole, so `\"` does not end the string.
            return Ok(Some(1 + rest[1..].chars().next().map_or(0, char::len_utf8)));
        }
        if rest.starts_with(q.delimiter()) {
            // A multi-line string may end with up to two extra quotes of content.
            let d = q.delimiter();
            let quotes = rest.len() - rest.trim_start_matches(&d[..1]).len();
            self.quote = None;
            return Ok(Some(quotes.min(d.len() + 2 * usize::from(d.len() == 3))));
        }
        if c == '\n' && matches!(q, Quote::Basic | Quote::Literal) {
            // Unterminated: leave the error to the TOML parser.
            self.quote = None;
            return Ok(Some(1));
        }
        if rest.starts_with("$${") {
            self.out.substitute(self.at, 3, "${");
            self.at += 3;
            return Ok(None);
        }
        let Some(after) = rest.strip_prefix("${") else {
            return Ok(Some(c.len_utf8()));
        };
        let name = reference_name(after).ok_or_else(|| {
            self.parse_err(
                "`${` must start a reference like ${NAME} (letters, digits, _); write $${ for a \
                 literal ${"
                    .into(),
            )
        })?;
        let value = self.env_value(name)?;
        let escaped = self.escaped(q, name, &value)?;
        let ref_len = name.len() + 3;
        self.out.substitute(self.at, ref_len, &escaped);
        self.out.values.push(name, value);
        self.at += ref_len;
        Ok(None)
    }

    /// The variable's value, or why there is none.
    fn env_value(&self, name: &str) -> Result<String, ConfigError> {
        match std::env::var(name) {
            Ok(value) => Ok(value),
            Err(std::env::VarError::NotPresent) => Err(ConfigError::MissingEnv {
                path: self.path.to_owned(),
                var: name.to_owned(),
                line: self.line,
            }),
            Err(std::env::VarError::NotUnicode(_)) => Err(self.parse_err(format!(
                "environment variable ${{{name}}} is not valid UTF-8"
            ))),
        }
    }

    /// `value` as it may stand in a string of kind `q`.
    fn escaped(&self, q: Quote, name: &str, value: &str) -> Result<String, ConfigError> {
        match q {
            Quote::Basic | Quote::MultiBasic => Ok(escape_basic(value)),
            // Literal strings have no escapes: refuse what they cannot hold.
            _ if value.contains(|c: char| c == '\'' || (c.is_control() && c != '\t')) => Err(self
                .parse_err(format!(
                    "${{{name}}} holds a quote or control character, which a '...' string \
                     cannot contain: use a \"...\" string"
                ))),
            _ => Ok(value.to_owned()),
        }
    }

    fn parse_err(&self, message: String) -> ConfigError {
        ConfigError::Parse {
            path: self.path.to_owned(),
            message: format!("line {}: {message}", self.line),
        }
    }
}

/// The NAME of `NAME}...` (what follows a `${`), if it is one: a letter or `_`, then letters,
/// digits and `_`.
fn reference_name(after: &str) -> Option<&str> {
    after.split_once('}').map(|(n, _)| n).filter(|n| {
        n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// `value` escaped for a TOML basic string: quotes, backslashes and control characters.
pub(super) fn escape_basic(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

impl Interpolated {
    /// Appends `replacement` for the `orig_len` bytes at `orig_at` of the original text.
    fn substitute(&mut self, orig_at: usize, orig_len: usize, replacement: &str) {
        self.subs.push(Substitution {
            at: self.text.len(),
            len: replacement.len(),
            orig_at,
            orig_len,
        });
        self.text.push_str(replacement);
    }

    /// The original-text offset of `pos` in the interpolated text (a position inside a
    /// substituted value maps to the start of its `${VAR}`).
    fn to_original(&self, pos: usize) -> usize {
        let (mut from, mut to) = (0, 0);
        for s in &self.subs {
            if pos < s.at {
                break;
            }
            if pos < s.at + s.len {
                return s.orig_at;
            }
            (from, to) = (s.at + s.len, s.orig_at + s.orig_len);
        }
        to + (pos - from)
    }

    /// Renders toml's error like toml does (line, column, the line, carets, message), but
    /// quoting the original line, so an interpolated secret never shows; values quoted by the
    /// message itself are replaced by their `${VAR}`, and URL passwords are redacted.
    pub(super) fn parse_error(
        &self,
        err: toml::de::Error,
        original: &str,
        path: &Path,
    ) -> ConfigError {
        let message = match err.span() {
            Some(span) => {
                let start = self.to_original(span.start).min(original.len());
                let line_start = original[..start].rfind('\n').map_or(0, |p| p + 1);
                let line_end = original[start..]
                    .find('\n')
                    .map_or(original.len(), |p| start + p);
                let end = self.to_original(span.end).clamp(start, line_end);
                let line_no = original[..line_start].matches('\n').count() + 1;
                let column = original[line_start..start].chars().count();
                let width = original
                    .get(start..end)
                    .map_or(1, |s| s.chars().count().max(1));
                let gutter = " ".repeat(line_no.to_string().len());
                format!(
                    "TOML parse error at line {line_no}, column {}\n{gutter} |\n{line_no} | {}\n\
                     {gutter} | {}{}\n{}",
                    column + 1,
                    original[line_start..line_end].trim_end_matches('\r'),
                    " ".repeat(column),
                    "^".repeat(width),
                    err.message().trim_end(),
                )
            }
            None => {
                let mut err = err;
                err.set_input(None);
                err.to_string().trim_end().to_owned()
            }
        };
        // serde's message for an untagged enum names the Rust type, not what to write.
        let message = message.replace(
            "data did not match any variant of untagged enum StoreUrl",
            "expected a URL string, or a list of URL strings for Redis Cluster",
        );
        let message = self.values.hide_in_message(redact_in_text(&message));
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::*;
    use crate::config::ConfigError;

    #[test]
    fn interpolates_env_in_strings_only() {
        std::env::set_var("DEDUPD_T_INTERP_PW", "s3cret");
        let text = BASE.replace("guest:guest@", "guest:${DEDUPD_T_INTERP_PW}@")
            + "# ${DEDUPD_T_UNSET_IN_COMMENT} is ignored in comments\n";
        let c = parse(&text).unwrap();
        assert_eq!(
            c.upstream.url.expose(),
            "amqp://guest:s3cret@127.0.0.1:5672/%2f"
        );
    }

    #[test]
    fn dollar_dollar_is_a_literal() {
        let c = parse(&BASE.replace("orders.out", "out$${NOT_A_VAR}")).unwrap();
        assert_eq!(
            c.routes["orders"].routing_key.as_deref(),
            Some("out${NOT_A_VAR}")
        );
    }

    #[test]
    fn missing_env_names_var_and_line() {
        let text = BASE.replace("orders.out", "${DEDUPD_T_SURELY_UNSET}");
        match parse(&text) {
            Err(ConfigError::MissingEnv { var, line, .. }) => {
                assert_eq!(var, "DEDUPD_T_SURELY_UNSET");
                assert_eq!(line, 11);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_reference_is_refused() {
        let err = parse(&BASE.replace("orders.out", "a${oops")).unwrap_err();
        assert!(err.to_string().contains("line 11"), "{err}");
    }

    #[test]
    fn quotes_in_values_cannot_break_out() {
        let evil = "x\"\nprefetch = 1\nq = \"\\";
        std::env::set_var("DEDUPD_T_EVIL", evil);
        let c = parse(&BASE.replace("orders.out", "${DEDUPD_T_EVIL}")).unwrap();
        assert_eq!(c.routes["orders"].routing_key.as_deref(), Some(evil));
        assert_eq!(c.upstream.prefetch, 2000);
        // Multi-line basic strings take the same escaping.
        let c = parse(&BASE.replace("\"orders.out\"", "\"\"\"${DEDUPD_T_EVIL}\"\"\"")).unwrap();
        assert_eq!(c.routes["orders"].routing_key.as_deref(), Some(evil));
        // Literal strings cannot escape, so such a value is refused instead.
        let err = parse(&BASE.replace("\"orders.out\"", "'${DEDUPD_T_EVIL}'")).unwrap_err();
        assert!(err.to_string().contains("\"...\" string"), "{err}");
        std::env::set_var("DEDUPD_T_PLAIN", "plain.out");
        let c = parse(&BASE.replace("\"orders.out\"", "'${DEDUPD_T_PLAIN}'")).unwrap();
        assert_eq!(c.routes["orders"].routing_key.as_deref(), Some("plain.out"));
    }

    #[test]
    fn parse_errors_do_not_show_interpolated_secrets() {
        std::env::set_var("DEDUPD_T_PARSE_PW", "hunter2\"hunter2");
        let text = BASE.replace(
            "[store]",
            "[store]\nlease = \"${DEDUPD_T_PARSE_PW}\"\nkey_prefix = 7",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("line"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let text = BASE.replace("url = \"amqp", "url = 5\nurll = \"amqp");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(!msg.contains("guest:guest"), "{msg}");
    }

    #[test]
    fn column_points_at_the_original_text() {
        // The value is longer than `${DEDUPD_T_COL}`: the column must not count it.
        std::env::set_var("DEDUPD_T_COL", "a-much-longer-value-than-its-reference");
        let text = BASE.replace(
            "exchange = \"\"",
            "exchange = \"\"\nwhat = \"${DEDUPD_T_COL}\"; x = 1",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("line 11, column 25"), "{msg}");
        assert!(
            msg.contains("11 | what = \"${DEDUPD_T_COL}\"; x = 1"),
            "{msg}"
        );
    }
}
