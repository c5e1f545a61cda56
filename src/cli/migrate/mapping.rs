//! The mapping cut-over (`--cutover mapping`, nats-server ≥ 2.10): subjects never leave the
//! legacy stream while a group moves, so no publish ever finds no stream.
//!
//! The new stream listens on a private namespace (`mig.vendor.>`; `mig.athlete-ally.>` and
//! `mig.sleep.*`) that overlaps nothing, with the stream subject transform `mig.>` → `>`, so its
//! messages are stored under their original subjects and the durables' filters do not change.
//! An **account subject mapping** (`"vendor.>": "mig.vendor.>"`) decides where each publish goes;
//! the server applies a changed mapping atomically per publish at a config reload (or an account
//! JWT update in operator mode). A weighted mapping splits a group between the two streams (the
//! gradual shift); the identity mapping (`"vendor.>": "vendor.>"`) sends it back. On the default
//! account a *deleted* mapping is not applied by a reload, an identity one or an empty
//! `mappings = { }` block is; so the tool always writes every group's entry and ends with an
//! empty block.
//!
//! This module is the pure part (the entries, the managed config block, its state line, the
//! `nsc` equivalent) and the two effects that touch the world: [`write_block`] (edit the file,
//! SIGHUP the server) and [`observe`] (probe publishes: where each one went and which stream
//! stored it).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::Serialize;

use crate::config::StreamRole;

/// The first server version with stream subject transforms (2.9 silently drops them).
pub const MIN_SERVER: (u64, u64, u64) = (2, 10, 0);

/// The private namespace's first token.
pub const NAMESPACE: &str = "mig";

/// The last token of the probe subjects, one per mapped pattern (no durable's filter matches).
pub const PROBE_TOKEN: &str = "normalize-migration-probe";

/// The header that marks a probe publish (for any other consumer of a whole group).
pub const PROBE_HEADER: &str = "Normalize-Migration-Probe";

/// Lines that delimit the block the tool manages in a server config file.
pub const BEGIN: &str = "# BEGIN normalize-service migrate: managed, do not edit between these lines";
pub const END: &str = "# END normalize-service migrate";
const STATE_PREFIX: &str = "# state:";

/// One mapped pattern of a group: the subject publishers use and its private-namespace form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub source: &'static str,
    /// The mapping destination (wildcards by position).
    pub private: &'static str,
    /// The subject the new stream listens on for it.
    pub listen: &'static str,
}

const VENDOR: &[Entry] = &[Entry {
    source: "vendor.>",
    private: "mig.vendor.>",
    listen: "mig.vendor.>",
}];

const CORE: &[Entry] = &[
    Entry {
        source: "athlete-ally.>",
        private: "mig.athlete-ally.>",
        listen: "mig.athlete-ally.>",
    },
    Entry {
        source: "sleep.*",
        // "mig.sleep.*" is refused by the server (invalid subject); wildcards are referenced.
        private: "mig.sleep.{{wildcard(1)}}",
        listen: "mig.sleep.*",
    },
];

pub fn entries(role: StreamRole) -> &'static [Entry] {
    match role {
        StreamRole::Vendor => VENDOR,
        StreamRole::Core => CORE,
    }
}

/// The subjects the new stream of `role` listens on for the mapped publishes.
pub fn private_subjects(role: StreamRole) -> Vec<String> {
    entries(role).iter().map(|e| e.listen.to_string()).collect()
}

/// The stream transform that stores a private-namespace publish under its original subject.
pub fn transform() -> jetstream::stream::SubjectTransform {
    jetstream::stream::SubjectTransform {
        source: format!("{NAMESPACE}.>"),
        destination: ">".into(),
    }
}

/// Whether a stream listens on the private namespace of `role` (the mapping cut-over prepared).
pub fn listens_privately(subjects: &[String], role: StreamRole) -> bool {
    private_subjects(role).iter().all(|p| subjects.contains(p))
}

/// One probe subject per mapped pattern of the group (`vendor.normalize-migration-probe`, …).
pub fn probe_subjects(role: StreamRole) -> Vec<String> {
    entries(role)
        .iter()
        .map(|e| {
            let base = e.source.trim_end_matches(['>', '*']).trim_end_matches('.');
            format!("{base}.{PROBE_TOKEN}")
        })
        .collect()
}

/// Percent of each group's publishes mapped to the private namespace (the new stream): 0 is
/// the identity mapping, 100 the full move, anything between a weighted split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Routes {
    pub vendor: u8,
    pub core: u8,
}

impl Routes {
    pub fn get(self, role: StreamRole) -> u8 {
        match role {
            StreamRole::Vendor => self.vendor,
            StreamRole::Core => self.core,
        }
    }

    pub fn with(mut self, role: StreamRole, percent: u8) -> Routes {
        match role {
            StreamRole::Vendor => self.vendor = percent.min(100),
            StreamRole::Core => self.core = percent.min(100),
        }
        self
    }
}

/// What the managed block says: every group's route, or nothing mapped at all (the end state:
/// an empty `mappings = { }`, which a reload applies where a deleted block would not be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Routes(Routes),
    Cleared,
}

/// The mapping lines of one group at `percent` (server config syntax).
fn entry_lines(role: StreamRole, percent: u8) -> Vec<String> {
    entries(role)
        .iter()
        .map(|e| match percent {
            0 => format!("\"{}\": \"{}\"", e.source, identity_destination(e)),
            100 => format!("\"{}\": \"{}\"", e.source, e.private),
            p => format!(
                "\"{}\": [{{destination: \"{}\", weight: {p}%}}, {{destination: \"{}\", weight: {}%}}]",
                e.source,
                e.private,
                identity_destination(e),
                100 - p
            ),
        })
        .collect()
}

/// The identity destination of an entry: a `*` must be referenced (`sleep.{{wildcard(1)}}`);
/// the server refuses `sleep.*` as a destination.
fn identity_destination(e: &Entry) -> String {
    if e.source.ends_with(".*") {
        format!("{}{{{{wildcard(1)}}}}", e.source.trim_end_matches('*'))
    } else {
        e.source.to_string()
    }
}

/// The `mappings = { … }` statement of a block (valid at the top level, for the default
/// account, and inside an account's block).
pub fn mappings_statement(block: Block) -> String {
    match block {
        Block::Cleared => "mappings = { }".to_string(),
        Block::Routes(r) => {
            let mut lines = vec!["mappings = {".to_string()];
            for role in [StreamRole::Vendor, StreamRole::Core] {
                for l in entry_lines(role, r.get(role)) {
                    lines.push(format!("  {l}"));
                }
            }
            lines.push("}".into());
            lines.join("\n")
        }
    }
}

/// The whole managed block, markers and state line included.
pub fn render_block(block: Block) -> String {
    let state = match block {
        Block::Cleared => "cleared".to_string(),
        Block::Routes(r) => format!("vendor={} core={}", r.vendor, r.core),
    };
    format!(
        "{BEGIN}\n{STATE_PREFIX} {state}\n{}\n{END}\n",
        mappings_statement(block)
    )
}

/// The operator-mode (JWT) equivalent: `nsc` commands for the account, then a push.
pub fn nsc_commands(block: Block, account: &str) -> Vec<String> {
    let mut out = Vec::new();
    let sources = [StreamRole::Vendor, StreamRole::Core]
        .into_iter()
        .flat_map(|role| entries(role).iter().map(move |e| (role, e)));
    for (role, e) in sources {
        out.push(format!(
            "nsc delete mapping --account {account} --from '{}'",
            e.source
        ));
        let percent = match block {
            Block::Cleared => continue,
            Block::Routes(r) => r.get(role),
        };
        if percent > 0 {
            out.push(format!(
                "nsc add mapping --account {account} --from '{}' --to '{}' --weight {percent}",
                e.source, e.private
            ));
        }
        if percent < 100 {
            out.push(format!(
                "nsc add mapping --account {account} --from '{}' --to '{}' --weight {}",
                e.source,
                identity_destination(e),
                100 - percent
            ));
        }
    }
    out.push(format!("nsc push --account {account}"));
    out
}

/// The block's state, from its state line, when `text` holds a managed block.
pub fn parse_state(text: &str) -> Option<Block> {
    let (start, end) = block_span(text)?;
    let line = text[start..end]
        .lines()
        .find_map(|l| l.trim().strip_prefix(STATE_PREFIX))?
        .trim();
    if line == "cleared" {
        return Some(Block::Cleared);
    }
    let mut vendor = None;
    let mut core = None;
    for part in line.split_whitespace() {
        match part.split_once('=') {
            Some(("vendor", v)) => vendor = v.parse::<u8>().ok().filter(|p| *p <= 100),
            Some(("core", v)) => core = v.parse::<u8>().ok().filter(|p| *p <= 100),
            _ => return None,
        }
    }
    Some(Block::Routes(Routes {
        vendor: vendor?,
        core: core?,
    }))
}

/// Byte range of the managed block (BEGIN line start .. END line end).
fn block_span(text: &str) -> Option<(usize, usize)> {
    let start = text.find(BEGIN)?;
    let end_marker = start + text[start..].find(END)?;
    let end = text[end_marker..]
        .find('\n')
        .map_or(text.len(), |i| end_marker + i + 1);
    Some((start, end))
}

/// `text` with its managed block replaced by `block`, or the block appended (which, at the top
/// level of a server config, is the default account). Indentation of an existing block is kept.
pub fn with_block(text: &str, block: Block) -> String {
    let rendered = render_block(block);
    match block_span(text) {
        Some((start, end)) => {
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let indent = &text[line_start..start];
            let indented: String = rendered
                .lines()
                .enumerate()
                .map(|(i, l)| {
                    if i == 0 {
                        format!("{l}\n")
                    } else {
                        format!("{indent}{l}\n")
                    }
                })
                .collect();
            format!("{}{indented}{}", &text[..start], &text[end..])
        }
        None => {
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            format!("{text}{sep}{rendered}")
        }
    }
}

/// Why a mapping could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has its own `mappings` (or `maps`) outside the managed block, or an `include`: nats-server keeps only one mappings key per account, so the block could silently replace them; apply the printed mapping by hand, merged with yours"
    )]
    OwnMappings { path: String },
    #[error("sending SIGHUP to nats-server pid {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// The block currently written in the config file, if it has one.
pub fn read_state(path: &Path) -> Result<Option<Block>, ApplyError> {
    let text = std::fs::read_to_string(path).map_err(|source| ApplyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_state(&text))
}

/// Whether `text` has a `mappings` (or `maps`, the server's other name for it) key outside the
/// managed block, in any case and anywhere on a line, or an `include` (whose file could hold
/// one): the server keeps one mappings key per account, so the block would silently replace
/// them. Refusing is safer than guessing the scope. Comments are ignored.
pub fn has_own_mappings(text: &str) -> bool {
    let outside = match block_span(text) {
        Some((start, end)) => format!("{}{}", &text[..start], &text[end..]),
        None => text.to_string(),
    };
    outside.lines().any(|line| {
        let code = line.split('#').next().unwrap_or("");
        let code = code.split("//").next().unwrap_or("").to_ascii_lowercase();
        let bytes = code.as_bytes();
        let key_at = |i: usize, key: &str| {
            let before_ok = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            let rest = code[i + key.len()..].trim_start();
            before_ok && rest.starts_with(['=', ':', '{'])
        };
        ["mappings", "maps"]
            .iter()
            .any(|key| code.match_indices(key).any(|(i, _)| key_at(i, key)))
            || code.split_whitespace().any(|w| w == "include")
    })
}

/// Writes `block` into the config file (atomically: a sibling file renamed over it, the file's
/// permissions kept; a symbolic link is followed) and, with `pid`, asks that nats-server to
/// reload its configuration (SIGHUP).
pub fn write_block(path: &Path, block: Block, pid: Option<i32>) -> Result<(), ApplyError> {
    let shown = path.display().to_string();
    let read = |source| ApplyError::Read {
        path: shown.clone(),
        source,
    };
    let path = &std::fs::canonicalize(path).map_err(read)?;
    let text = std::fs::read_to_string(path).map_err(read)?;
    if has_own_mappings(&text) {
        return Err(ApplyError::OwnMappings { path: shown });
    }
    let permissions = std::fs::metadata(path).map_err(read)?.permissions();
    let new_text = with_block(&text, block);
    let tmp = path.with_extension("normalize-migrate.tmp");
    let write = |source| ApplyError::Write {
        path: shown.clone(),
        source,
    };
    std::fs::write(&tmp, new_text).map_err(write)?;
    std::fs::set_permissions(&tmp, permissions).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)?;
    if let Some(pid) = pid {
        let target = rustix::process::Pid::from_raw(pid).ok_or(ApplyError::Signal {
            pid,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        rustix::process::kill_process(target, rustix::process::Signal::HUP).map_err(|e| {
            ApplyError::Signal {
                pid,
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

/// Where probe publishes of one group went: per probe, whether the mapping sent it to the
/// private namespace, and the stream its PubAck names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub probes: usize,
    /// Probes delivered on the private-namespace subject (mapped).
    pub mapped: usize,
    /// Probes per stream that stored them (from the PubAck).
    pub stored: BTreeMap<String, usize>,
    /// Probes that got no PubAck (no stream, or a timeout).
    pub failed: usize,
}

impl Observation {
    /// Percent of the probes the mapping sent to the private namespace.
    pub fn mapped_percent(&self) -> f64 {
        if self.probes == 0 {
            0.0
        } else {
            self.mapped as f64 * 100.0 / self.probes as f64
        }
    }

    pub fn stored_in(&self, stream: &str) -> usize {
        self.stored.get(stream).copied().unwrap_or(0)
    }

    pub fn describe(&self) -> String {
        let stored: Vec<String> = self.stored.iter().map(|(s, n)| format!("{s}={n}")).collect();
        format!(
            "{} probes: {:.0} % mapped to {NAMESPACE}.*, stored {}{}",
            self.probes,
            self.mapped_percent(),
            if stored.is_empty() {
                "nowhere".to_string()
            } else {
                stored.join(" ")
            },
            if self.failed > 0 {
                format!(", {} without PubAck", self.failed)
            } else {
                String::new()
            }
        )
    }
}

/// The NATS connection went away during a round of probes.
#[derive(Debug, thiserror::Error)]
#[error("the NATS connection was lost after {sent} of {count} probes")]
pub struct ConnectionLost {
    sent: usize,
    count: usize,
}

/// Publishes `count` probes spread over the group's probe subjects, each awaiting its PubAck,
/// while subscribed to their private-namespace forms; then purges the probes from every stream
/// that stored one. A probe is a JetStream publish with a unique `Nats-Msg-Id` and the
/// [`PROBE_HEADER`] header; no durable's filter matches its subject.
pub async fn observe(
    client: &async_nats::Client,
    js: &jetstream::Context,
    role: StreamRole,
    count: usize,
) -> Result<Observation, async_nats::Error> {
    let subjects = probe_subjects(role);
    let mut private = client.subscribe(format!("{NAMESPACE}.*.{PROBE_TOKEN}")).await?;
    // The subscription is registered before the first probe.
    client.flush().await?;
    let mut obs = Observation::default();
    let run = format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    for i in 0..count {
        // Without a connection each probe would wait out its 5 s PubAck timeout: stop at once.
        if client.connection_state() != async_nats::connection::State::Connected {
            return Err(Box::new(ConnectionLost { sent: i, count }));
        }
        let subject = subjects[i % subjects.len()].clone();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(PROBE_HEADER, "1");
        headers.insert("Nats-Msg-Id", format!("{PROBE_TOKEN}-{run}-{i}").as_str());
        obs.probes += 1;
        let ack = match js
            .publish_with_headers(subject, headers, bytes::Bytes::from_static(b"{}"))
            .await
        {
            Ok(future) => tokio::time::timeout(Duration::from_secs(5), future).await,
            Err(_) => {
                obs.failed += 1;
                continue;
            }
        };
        match ack {
            Ok(Ok(ack)) => *obs.stored.entry(ack.stream).or_default() += 1,
            Ok(Err(_)) | Err(_) => obs.failed += 1,
        }
    }
    client.flush().await?;
    // Core delivery to the subscription precedes the PubAck of the same publish; what has
    // arrived by now is complete, the short wait only covers scheduling.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    while obs.mapped < obs.probes {
        match tokio::time::timeout_at(deadline, private.next()).await {
            Ok(Some(_)) => obs.mapped += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if let Err(e) = private.unsubscribe().await {
        tracing::debug!(error = %e, "unsubscribing the probe subscription");
    }
    for stream in obs.stored.keys() {
        purge_probes(js, stream, &subjects).await;
    }
    Ok(obs)
}

/// Removes the probes from a stream (best effort: a probe left behind is a small message no
/// durable reads).
async fn purge_probes(js: &jetstream::Context, stream: &str, subjects: &[String]) {
    let Ok(s) = js.get_stream_no_info(stream).await else {
        return;
    };
    for subject in subjects {
        if let Err(e) = s.purge().filter(subject.as_str()).await {
            tracing::debug!(stream, subject = %subject, error = %e, "purging the migration probes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_render_every_group_and_round_trip_their_state() {
        let full = Block::Routes(Routes { vendor: 100, core: 0 });
        let text = render_block(full);
        assert!(text.contains("  \"vendor.>\": \"mig.vendor.>\"\n"), "{text}");
        assert!(
            text.contains("  \"athlete-ally.>\": \"athlete-ally.>\"\n"),
            "{text}"
        );
        assert!(
            text.contains("  \"sleep.*\": \"sleep.{{wildcard(1)}}\"\n"),
            "{text}"
        );
        assert_eq!(parse_state(&text), Some(full));

        let split = Block::Routes(Routes {
            vendor: 100,
            core: 10,
        });
        let text = render_block(split);
        assert!(
            text.contains("\"sleep.*\": [{destination: \"mig.sleep.{{wildcard(1)}}\", weight: 10%}, {destination: \"sleep.{{wildcard(1)}}\", weight: 90%}]"),
            "{text}"
        );
        assert!(
            text.contains("\"athlete-ally.>\": [{destination: \"mig.athlete-ally.>\", weight: 10%}, {destination: \"athlete-ally.>\", weight: 90%}]"),
            "{text}"
        );
        assert_eq!(parse_state(&text), Some(split));

        let cleared = render_block(Block::Cleared);
        assert!(cleared.contains("\nmappings = { }\n"), "{cleared}");
        assert_eq!(parse_state(&cleared), Some(Block::Cleared));
    }

    #[test]
    fn the_block_is_appended_once_then_replaced_in_place_with_its_indentation() {
        let base = "listen: 127.0.0.1:4222\njetstream { store_dir: \"/x\" }";
        let once = with_block(base, Block::Routes(Routes { vendor: 100, core: 0 }));
        assert!(once.starts_with(base));
        let twice = with_block(&once, Block::Cleared);
        assert_eq!(twice.matches(BEGIN).count(), 1, "{twice}");
        assert_eq!(parse_state(&twice), Some(Block::Cleared));
        assert!(twice.starts_with(base));

        // Inside a named account: the markers placed by the operator, indented.
        let account =
            format!("accounts {{\n  APP {{\n    jetstream: enabled\n    {BEGIN}\n    {END}\n  }}\n}}\n");
        let written = with_block(&account, Block::Routes(Routes { vendor: 10, core: 0 }));
        assert!(written.contains("\n    mappings = {\n"), "{written}");
        assert!(
            written.ends_with("    # END normalize-service migrate\n  }\n}\n"),
            "{written}"
        );
        assert_eq!(
            parse_state(&written),
            Some(Block::Routes(Routes { vendor: 10, core: 0 }))
        );
    }

    #[test]
    fn the_operators_own_mappings_are_found_outside_the_block_only() {
        let ours = with_block("listen: 1\n", Block::Routes(Routes { vendor: 100, core: 0 }));
        assert!(!has_own_mappings(&ours), "{ours}");
        assert!(has_own_mappings(&format!(
            "mappings = {{ \"a\": \"b\" }}\n{ours}"
        )));
        assert!(has_own_mappings(
            "accounts { A { mappings: { \"a\": \"b\" } } }\n  mappings {\n}"
        ));
        assert!(has_own_mappings("  mappings: {\n  \"a\": \"b\"\n}"));
        assert!(!has_own_mappings(
            "# mappings = { }\nmappings_file_not_a_key = 1\n"
        ));
    }

    #[test]
    fn a_state_line_that_is_not_ours_is_no_state() {
        for line in ["vendor=101 core=0", "vendor=1", "core=0 x=1", "vendor=a core=0"] {
            let text = format!("{BEGIN}\n{STATE_PREFIX} {line}\n{END}\n");
            assert_eq!(parse_state(&text), None, "{line}");
        }
        assert_eq!(parse_state("no block here"), None);
    }

    #[test]
    fn probe_subjects_fall_under_the_mapped_patterns_and_no_filter() {
        assert_eq!(
            probe_subjects(StreamRole::Core),
            [
                "athlete-ally.normalize-migration-probe",
                "sleep.normalize-migration-probe"
            ]
        );
        assert_eq!(
            probe_subjects(StreamRole::Vendor),
            ["vendor.normalize-migration-probe"]
        );
        for role in [StreamRole::Core, StreamRole::Vendor] {
            for (s, e) in probe_subjects(role).iter().zip(entries(role)) {
                assert!(crate::topology::pattern_matches(e.source, s), "{s}");
                let private = format!("{NAMESPACE}.{s}");
                assert!(crate::topology::pattern_matches(e.listen, &private), "{private}");
            }
        }
    }

    #[test]
    fn nsc_commands_keep_weights_summing_to_100() {
        let cmds = nsc_commands(
            Block::Routes(Routes {
                vendor: 30,
                core: 100,
            }),
            "APP",
        );
        assert!(cmds.contains(
            &"nsc add mapping --account APP --from 'vendor.>' --to 'mig.vendor.>' --weight 30".to_string()
        ));
        assert!(cmds.contains(
            &"nsc add mapping --account APP --from 'vendor.>' --to 'vendor.>' --weight 70".to_string()
        ));
        assert!(cmds.contains(
            &"nsc add mapping --account APP --from 'sleep.*' --to 'mig.sleep.{{wildcard(1)}}' --weight 100"
                .to_string()
        ));
        assert_eq!(cmds.last().map(String::as_str), Some("nsc push --account APP"));
        let cleared = nsc_commands(Block::Cleared, "APP");
        assert!(cleared.iter().all(|c| !c.contains("add mapping")), "{cleared:?}");
    }
}
