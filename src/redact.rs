//! Redaction of secrets in URLs before they reach logs, errors or `/health`.

/// Replaces the secret of a URL's user-info with `***`, for any input, parseable or not, with
/// or without a scheme: everything after the scheme (if any) up to the *last* `@` is user-info.
/// A password may hold `/`, `?`, `#` or `@` (`nats://svc:Ab/9xQ==@nats:4222` does not parse),
/// so no earlier delimiter ends it; when the last `@` is really in a path or query, more than
/// the secret is hidden, never less. Of the user-info only a plain user name before the first
/// `:` stays visible. The value of a `password=` query parameter (PostgreSQL) is hidden too.
pub fn redact_url(raw: &str) -> String {
    let (prefix, rest) = match raw.find("://") {
        Some(i) if is_scheme(&raw[..i]) => raw.split_at(i + 3),
        _ => ("", raw),
    };
    let scheme = prefix.trim_end_matches("://");
    let redacted = match rest.rfind('@') {
        None => rest.to_string(),
        Some(at) => {
            let userinfo = &rest[..at];
            let shown = match userinfo.split_once(':') {
                // `TOKEN:` (an empty password) is a token to the client: hidden whole.
                Some((user, password)) if plain(user) && !password.is_empty() => format!("{user}:***"),
                // A PostgreSQL URL's lone user-info is a user name (the password, if any, comes
                // from elsewhere): shown, as operators need it.
                None if plain(userinfo)
                    && (scheme.eq_ignore_ascii_case("postgres")
                        || scheme.eq_ignore_ascii_case("postgresql")) =>
                {
                    userinfo.to_string()
                }
                // Elsewhere it may itself be a token (nats://TOKEN@host), or not a user name.
                _ => "***".to_string(),
            };
            format!("{shown}@{}", &rest[at + 1..])
        }
    };
    format!("{prefix}{}", hide_password_parameters(&redacted))
}

/// RFC 3986: a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A user name that can be shown: non-empty, and nothing that suggests it is more than one.
fn plain(user: &str) -> bool {
    !user.is_empty()
        && !user
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@' | ':'))
}

/// `…password=SECRET&…` (any key ending in `password`, any case) → `…password=***&…`.
fn hide_password_parameters(s: &str) -> String {
    const KEY: &str = "password=";
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut from = 0;
    while let Some(i) = lower[from..].find(KEY) {
        let value_start = from + i + KEY.len();
        let value_end = s[value_start..]
            .find(['&', '#'])
            .map_or(s.len(), |n| value_start + n);
        out.push_str(&s[from..value_start]);
        out.push_str("***");
        from = value_end;
    }
    out.push_str(&s[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x?sslmode=disable"),
            "postgres://app:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(redact_url("nats://tok3n@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("postgres://app@db:5432/x"), "postgres://app@db:5432/x");
        assert_eq!(redact_url("postgresql://app@db/x"), "postgresql://app@db/x");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn passwords_of_urls_that_do_not_parse_are_hidden() {
        let cases = [
            // A password with '/', '?' or '#' (base64, generated secrets).
            ("nats://svc:Ab/9xQ==@nats:4222", "nats://svc:***@nats:4222"),
            ("nats://svc:a?b@nats:4222", "nats://svc:***@nats:4222"),
            ("nats://svc:a#b@nats:4222", "nats://svc:***@nats:4222"),
            ("tls://svc:x/y@h:4222/", "tls://svc:***@h:4222/"),
            // No scheme (NATS_URL accepts host:port).
            ("svc:s3cret@nats:42x2", "svc:***@nats:42x2"),
            ("s3cret@nats:4222", "***@nats:4222"),
            ("svc:Ab/9x@nats", "svc:***@nats"),
            // A token with a '/'.
            ("nats://to/ken@h:4222", "nats://***@h:4222"),
            // PostgreSQL: a lone user name is shown, a password parameter is not.
            (
                "postgres://app@db/x?password=s3cret",
                "postgres://app@db/x?password=***",
            ),
            (
                "postgres://db/x?sslmode=require&PassWord=s3cret&a=b",
                "postgres://db/x?sslmode=require&PassWord=***&a=b",
            ),
            ("postgres://a/b:s3cret@db/x", "postgres://***@db/x"),
            // Not a scheme: all of it before the last '@' is hidden.
            ("1nats://svc:s3cret@h", "1nats:***@h"),
            ("", ""),
            ("@", "***@"),
            ("nats://@h", "nats://***@h"),
            // `TOKEN:` with an empty password is a token to the client.
            ("nats://t0ken:@h:4222", "nats://***@h:4222"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact_url(raw), want, "{raw:?}");
        }
    }

    /// Seeded random secrets in every shape the configuration may see: none is ever shown, in
    /// whole or in part (a secret starts with a marker that appears nowhere else).
    #[test]
    fn no_secret_survives_random_shapes() {
        // xorshift64*: reproducible without a dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        const CHARS: &[u8] = b"abcXYZ019:/?#@%&=+-._~!$'()*,; [];";
        let schemes = [
            "",
            "nats://",
            "tls://",
            "ws://",
            "postgres://",
            "postgresql://",
            "x+y://",
        ];
        let tails = [
            "",
            ":4222",
            ":42x2",
            "/",
            "/db?sslmode=disable",
            "?x=1",
            "#f",
            ":4222/a?b=c#d",
        ];
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let mut secret = String::from("Q7SECRET");
            for _ in 0..len {
                secret.push(CHARS[(next() % CHARS.len() as u64) as usize] as char);
            }
            let scheme = schemes[(next() % schemes.len() as u64) as usize];
            let tail = tails[(next() % tails.len() as u64) as usize];
            let host = ["nats", "127.0.0.1", "[::1]", "db.example"][(next() % 4) as usize];
            let user = ["svc", "app", "a b", "u/x", ""][(next() % 5) as usize];
            secret.push_str("Z9END");
            let raw = match next() % 4 {
                0 => format!("{scheme}{user}:{secret}@{host}{tail}"),
                // A token with a ':' is a user:password pair; one with "://" after no scheme has a scheme.
                // PostgreSQL's lone user-info is a user name, shown by design.
                1 if secret.contains(':') || scheme.starts_with("postgres") => continue,
                1 => format!("{scheme}{secret}@{host}{tail}"),
                2 => format!("{scheme}{user}:{secret}@{host}{tail},{scheme}{host}{tail}"),
                // A query parameter's value ends at a literal '&' or '#' (a secret holding one
                // must be percent-encoded), so only its start is certainly secret.
                _ => {
                    let shown = redact_url(&format!("{scheme}{host}{tail}?password={secret}"));
                    assert!(!shown.contains("Q7SECRET"), "{secret:?} → {shown:?}");
                    continue;
                }
            };
            let shown = redact_url(&raw);
            assert!(
                !shown.contains("Q7SECRET") && !shown.contains("Z9END"),
                "{raw:?} → {shown:?}"
            );
        }
    }
}
