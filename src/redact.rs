//! Redaction of secrets in URLs before they reach logs, errors or `/health`.

/// Replaces the password of a URL's user-info with `***`. Works on anything that looks like
/// `scheme://user:pass@host`, parseable or not, so a malformed URL cannot leak either.
pub fn redact_url(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_string();
    };
    let rest = &raw[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return raw.to_string();
    };
    let userinfo = &authority[..at];
    let scheme = &raw[..scheme_end];
    let redacted_userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        // A PostgreSQL URL's lone user-info is a user name (the password, if any, comes from
        // elsewhere): shown, as operators need it.
        None if scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql") => {
            userinfo.to_string()
        }
        // Elsewhere it may itself be a token (nats://TOKEN@host).
        None => "***".to_string(),
    };
    format!(
        "{}{}@{}",
        &raw[..scheme_end + 3],
        redacted_userinfo,
        &rest[at + 1..]
    )
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
}
