//! The nats-server version the daemon is connected to, and the known server bugs that version
//! implies for this daemon (pure, so the comparison is unit-tested).

/// First releases without the NAK-requeue bug (docs/RELIABILITY.md, "nats-server before 2.10.16:
/// a NAKed message waits for ack_wait"): 2.10.16 on the 2.10 line, and every 2.11.0 and later.
pub const NAK_REQUEUE_FIXED_IN: (u64, u64, u64) = (2, 10, 16);

/// `(major, minor, patch)` of a server version string as `INFO` reports it (`2.9.10`,
/// `v2.10.16`, `2.11.0-RC.1`, `2.12.1+build`); `None` when it is not of that form. A
/// pre-release counts as its release.
pub fn parse(version: &str) -> Option<(u64, u64, u64)> {
    let v = version.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let triple = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    Some(triple)
}

/// Whether a server of this version has the NAK-requeue bug: `Some(true)` before 2.10.16,
/// `Some(false)` from it on, `None` when the version cannot be read.
pub fn has_nak_requeue_bug(version: &str) -> Option<bool> {
    parse(version).map(|v| v < NAK_REQUEUE_FIXED_IN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_servers_report() {
        for (text, want) in [
            ("2.9.10", Some((2, 9, 10))),
            ("v2.10.16", Some((2, 10, 16))),
            (" 2.14.0 ", Some((2, 14, 0))),
            ("2.11.0-RC.1", Some((2, 11, 0))),
            ("2.12.1+abc", Some((2, 12, 1))),
            ("", None),
            ("2.10", None),
            ("2.10.x", None),
            ("2.10.16.1", None),
            ("latest", None),
        ] {
            assert_eq!(parse(text), want, "{text:?}");
        }
    }

    #[test]
    fn the_bug_is_present_before_2_10_16_only() {
        for (text, want) in [
            ("2.9.10", Some(true)),
            ("2.9.25", Some(true)),
            ("2.10.0", Some(true)),
            ("2.10.15", Some(true)),
            ("2.10.16", Some(false)),
            ("2.10.29", Some(false)),
            ("2.11.0", Some(false)),
            ("2.14.0", Some(false)),
            ("3.0.0", Some(false)),
            ("1.4.1", Some(true)),
            ("garbage", None),
        ] {
            assert_eq!(has_nak_requeue_bug(text), want, "{text:?}");
        }
    }
}
