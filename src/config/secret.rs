//! What keeps passwords out of everything dedupd prints: [`redact_url`] for a URL it shows,
//! and `redact_in_text` for messages that may quote a config line whatever its syntax.

/// `url` with any password replaced by `***`, for logs and `check` output.
pub fn redact_url(url: &str) -> String {
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
}
