use chrono::{DateTime, Utc};

use super::phase::*;
use crate::config::{ConsumerKind, StreamNames, StreamRole};

fn st(entries: &[(&str, &[&str])]) -> Subjects {
    entries
        .iter()
        .map(|(n, s)| (n.to_string(), s.iter().map(|x| x.to_string()).collect()))
        .collect()
}

const LEGACY: &[&str] = &["athlete-ally.>", "vendor.>", "sleep.*"];

fn prepared() -> Subjects {
    st(&[
        ("ATHLETE_ALLY_EVENTS", LEGACY),
        ("AA_CORE_HOT", &["AA_CORE_HOT"]),
        ("AA_VENDOR_HOT", &["AA_VENDOR_HOT"]),
        ("AA_DLQ", &["dlq.>"]),
    ])
}

fn vendor_moved() -> Subjects {
    st(&[
        ("ATHLETE_ALLY_EVENTS", &["athlete-ally.>", "sleep.*"]),
        ("AA_CORE_HOT", &["AA_CORE_HOT"]),
        ("AA_VENDOR_HOT", &["vendor.>"]),
        ("AA_DLQ", &["dlq.>"]),
    ])
}

#[test]
fn phases_are_recognised() {
    let n = StreamNames::default();
    assert_eq!(classify(&st(&[]), &n), Phase::Empty);
    assert_eq!(
        classify(&st(&[("ATHLETE_ALLY_EVENTS", LEGACY)]), &n),
        Phase::Legacy
    );
    assert_eq!(classify(&prepared(), &n), Phase::Prepared);
    assert_eq!(classify(&vendor_moved(), &n), Phase::VendorMoved);
    let p2 = st(&[
        ("ATHLETE_ALLY_EVENTS", &["ATHLETE_ALLY_EVENTS"]),
        ("AA_CORE_HOT", &["athlete-ally.>", "sleep.*"]),
        ("AA_VENDOR_HOT", &["vendor.>"]),
        ("AA_DLQ", &["dlq.>"]),
    ]);
    assert_eq!(classify(&p2, &n), Phase::CoreMoved);
    let done = st(&[
        ("AA_CORE_HOT", &["athlete-ally.>", "sleep.*"]),
        ("AA_VENDOR_HOT", &["vendor.>"]),
        ("AA_DLQ", &["dlq.>"]),
    ]);
    assert_eq!(classify(&done, &n), Phase::Migrated);
    assert!(matches!(
        classify(&st(&[("AA_CORE_HOT", &["athlete-ally.>"])]), &n),
        Phase::Mixed(_)
    ));
}

#[test]
fn steps_named_for_subjects() {
    assert_eq!(step_for_subject("vendor.>"), "normalize-service migrate phase1");
    assert_eq!(
        step_for_subject("athlete-ally.>"),
        "normalize-service migrate phase2"
    );
}

#[test]
fn a_move_parks_the_emptied_stream_and_unparks_the_target() {
    let n = StreamNames::default();
    let m = Move::new(StreamRole::Vendor, true);
    let (from, to) = move_ends(&m, &n);
    assert_eq!(
        (from.as_str(), to.as_str()),
        ("ATHLETE_ALLY_EVENTS", "AA_VENDOR_HOT")
    );
    let (f, t) = moved_subjects(&m, &prepared(), &from, &to);
    assert_eq!(f, ["athlete-ally.>", "sleep.*"]);
    assert_eq!(t, ["vendor.>"]);
    assert!(!already_moved(&m, &prepared(), &from, &to));
    assert!(already_moved(&m, &vendor_moved(), &from, &to));

    let core = Move::new(StreamRole::Core, true);
    let (from, to) = move_ends(&core, &n);
    let (f, t) = moved_subjects(&core, &vendor_moved(), &from, &to);
    assert_eq!(
        f,
        ["ATHLETE_ALLY_EVENTS"],
        "the legacy stream is parked on its own name"
    );
    assert_eq!(t, ["athlete-ally.>", "sleep.*"]);

    let back = Move::new(StreamRole::Vendor, false);
    assert_eq!(
        move_ends(&back, &n),
        ("AA_VENDOR_HOT".to_string(), "ATHLETE_ALLY_EVENTS".to_string())
    );
}

#[test]
fn moves_are_refused_out_of_order() {
    let n = StreamNames::default();
    let phase2 = Step::Forward(PhaseStep::Phase2);
    let core = Move::new(StreamRole::Core, true);
    let legacy_only = st(&[("ATHLETE_ALLY_EVENTS", LEGACY)]);
    let why = move_refusal(phase2, &core, &legacy_only, &n).unwrap();
    assert!(why.contains("AA_DLQ missing"), "{why}");
    let why = move_refusal(phase2, &core, &prepared(), &n).unwrap();
    assert!(why.contains("migrate phase1"), "{why}");
    assert_eq!(move_refusal(phase2, &core, &vendor_moved(), &n), None);

    let rollback1 = Step::Rollback(RollbackStep::Phase1);
    let back = Move::new(StreamRole::Vendor, false);
    assert_eq!(move_refusal(rollback1, &back, &vendor_moved(), &n), None);
    let migrated = st(&[
        ("AA_CORE_HOT", &["athlete-ally.>", "sleep.*"]),
        ("AA_VENDOR_HOT", &["vendor.>"]),
        ("AA_DLQ", &["dlq.>"]),
    ]);
    let why = move_refusal(rollback1, &back, &migrated, &n).unwrap();
    assert!(
        why.contains("cannot roll back to a deleted legacy stream"),
        "{why}"
    );

    let mut foreign = prepared();
    foreign.insert("OTHER".into(), vec!["vendor.oura.>".into()]);
    let m = Move::new(StreamRole::Vendor, true);
    let (from, to) = move_ends(&m, &n);
    assert_eq!(unmanaged_overlap(&m, &foreign, &from, &to), Some("OTHER"));
    assert_eq!(unmanaged_overlap(&m, &prepared(), &from, &to), None);
}

#[test]
fn what_each_step_leaves_behind() {
    let n = StreamNames::default();
    let e = expect_for(Step::Forward(PhaseStep::Phase3), &n);
    assert_eq!(e.vendor_home.as_deref(), Some("AA_VENDOR_HOT"));
    assert_eq!(e.core_home.as_deref(), Some("AA_CORE_HOT"));
    assert!(e.new_streams && e.exactly_three);
    let e = expect_for(Step::Rollback(RollbackStep::Phase2), &n);
    assert_eq!(e.core_home.as_deref(), Some("ATHLETE_ALLY_EVENTS"));
    assert_eq!(e.vendor_home, None);
    assert!(!e.new_streams);
    let e = expect_for(Step::Forward(PhaseStep::Phase0), &n);
    assert_eq!((e.vendor_home, e.core_home), (None, None));
}

#[test]
fn every_sample_event_decodes() {
    let now: DateTime<Utc> = Utc::now();
    let env = crate::pipeline::Envelope {
        msg_id: None,
        stable_time: now,
        now,
        max_future_skew: chrono::Duration::hours(1),
        max_payload_bytes: 1024 * 1024,
    };
    for kind in ConsumerKind::ALL {
        let id = crate::pipeline::probe_msg_id(kind, super::PROBE_USER, now);
        let body = crate::pipeline::probe_event(kind, super::PROBE_USER, now).to_string();
        let env = crate::pipeline::Envelope {
            msg_id: Some(&id),
            ..env
        };
        let decoded = crate::pipeline::decode(kind, body.as_bytes(), env);
        assert!(decoded.is_ok(), "{kind}: {decoded:?}");
    }
}

#[test]
fn shifting_vendor_back_keeps_the_plans_order() {
    let n = StreamNames::default();
    let core_moved = st(&[
        ("ATHLETE_ALLY_EVENTS", &["vendor.>"]),
        ("AA_CORE_HOT", &["athlete-ally.>", "sleep.*"]),
        ("AA_VENDOR_HOT", &["mig.vendor.>"]),
        ("AA_DLQ", &["dlq.>"]),
    ]);
    for percent in [0, 50, 99] {
        let back = Move::new(StreamRole::Vendor, percent > 0);
        let why = move_refusal(Step::Shift(Group::Vendor, percent), &back, &core_moved, &n).unwrap();
        assert!(why.contains("rollback phase2"), "{percent}: {why}");
    }
    let forward = Move::new(StreamRole::Vendor, true);
    assert_eq!(
        move_refusal(Step::Shift(Group::Vendor, 100), &forward, &core_moved, &n),
        None
    );
    // The core group waits for vendor.> on its stream, as phase2 does.
    let core = Move::new(StreamRole::Core, true);
    let why = move_refusal(Step::Shift(Group::Core, 10), &core, &prepared(), &n).unwrap();
    assert!(why.contains("migrate phase1"), "{why}");
}

#[test]
fn a_group_mapped_entirely_counts_as_moved_and_a_split_as_shifting() {
    use super::mapping::Routes;
    let n = StreamNames::default();
    let listening = st(&[
        ("ATHLETE_ALLY_EVENTS", LEGACY),
        ("AA_CORE_HOT", &["mig.athlete-ally.>", "mig.sleep.*"]),
        ("AA_VENDOR_HOT", &["mig.vendor.>"]),
        ("AA_DLQ", &["dlq.>"]),
    ]);
    let r = |vendor, core| Routes { vendor, core };
    assert_eq!(classify_routed(&listening, &n, r(0, 0)), Phase::Prepared);
    assert_eq!(
        classify_routed(&listening, &n, r(30, 0)),
        Phase::VendorShifting(30)
    );
    assert_eq!(classify_routed(&listening, &n, r(100, 0)), Phase::VendorMoved);
    assert_eq!(
        classify_routed(&listening, &n, r(100, 60)),
        Phase::CoreShifting(60)
    );
    assert_eq!(classify_routed(&listening, &n, r(100, 100)), Phase::CoreMoved);
    assert!(matches!(
        classify_routed(&listening, &n, r(0, 100)),
        Phase::Mixed(_)
    ));
    // Without the private namespace the mapping routes nothing, whatever was measured.
    assert_eq!(classify_routed(&prepared(), &n, r(100, 100)), Phase::Prepared);
}
