//! Property test of the run state machine: any interleaving, duplication and
//! reordering of a run's signals yields the same final run, both when folded
//! one by one (de-duplicated by signal id, as the tracker does) and when part
//! of them is first folded into a separate run that is merged in later (a
//! trace-keyed run turning out to carry a `business.run.id`).

use bizsignal::runs::run::ProcessRun;
use bizsignal::signal::{Fact, LifecycleStatus, RunKey, Signal, SignalKind};
use proptest::prelude::*;
use std::collections::HashSet;

const T0: i64 = 1_795_000_000_000_000_000;

fn fact() -> impl Strategy<Value = Fact> {
    let names = prop::sample::select(vec!["a", "b", "c"]);
    prop_oneof![
        (names.clone(), 0u32..1000).prop_map(|(o, c)| Fact::Records { outcome: o.to_string(), count: c as f64 }),
        (0u32..1000).prop_map(|v| Fact::ProgressDone(v as f64)),
        (0u32..1000).prop_map(|v| Fact::ProgressTotal(v as f64)),
        names.clone().prop_map(|m| Fact::Milestone(format!("m-{m}"))),
        (0u32..5).prop_map(|n| Fact::Note(format!("note {n}"))),
        (0u32..5).prop_map(|n| Fact::Payload(format!("{{\"n\":{n}}}"))),
        (names, 0u32..100).prop_map(|(n, v)| Fact::Value { name: n.to_string(), value: v as f64 }),
        (prop::bool::ANY, prop::option::of(prop::sample::select(vec!["disk full", "timeout"]))).prop_map(|(ok, e)| {
            Fact::Status {
                status: if ok { LifecycleStatus::Succeeded } else { LifecycleStatus::Failed },
                error: if ok { None } else { e.map(str::to_string) },
            }
        }),
        Just(Fact::Status { status: LifecycleStatus::Started, error: None }),
    ]
}

fn signal() -> impl Strategy<Value = (i64, i64, Vec<Fact>, u8)> {
    // Few distinct times, so equal-time ties are exercised.
    (0i64..6, 0i64..3, prop::collection::vec(fact(), 0..4), 0u8..3)
}

fn build(specs: Vec<(i64, i64, Vec<Fact>, u8)>) -> Vec<Signal> {
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (t, dur, facts, svc))| Signal {
            id: 0x1000 + i as u128,
            kind: SignalKind::Log,
            process: "p".into(),
            run_id: Some("r".into()),
            trace_id: format!("{:032x}", svc),
            span_id: String::new(),
            name: "log".into(),
            start_ns: T0 + t,
            time_ns: T0 + t + dur,
            text: String::new(),
            service: format!("svc-{svc}"),
            attributes: Default::default(),
            resource: vec![].into(),
            facts,
        })
        .collect()
}

fn key() -> RunKey {
    RunKey { process: "p".into(), run_id: "r".into() }
}

/// Folds deliveries the way the tracker does: a signal id is applied once.
fn fold(deliveries: &[&Signal]) -> ProcessRun {
    let mut run = ProcessRun::new(&key(), T0);
    let mut seen = HashSet::new();
    for s in deliveries {
        if seen.insert(s.id) {
            run.apply(s, T0);
        }
    }
    run
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_order_and_duplication_gives_the_same_run(
        specs in prop::collection::vec(signal(), 1..12),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        seed in any::<u64>(),
        split in any::<prop::sample::Index>(),
    ) {
        let signals = build(specs);
        let reference = fold(&signals.iter().collect::<Vec<_>>());

        // A delivery order: every signal at least once, shuffled, plus duplicates.
        let mut deliveries: Vec<&Signal> = signals.iter().collect();
        deliveries.extend(order.iter().map(|i| &signals[i.index(signals.len())]));
        let mut rng = seed;
        for i in (1..deliveries.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            deliveries.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let shuffled = fold(&deliveries);
        prop_assert_eq!(&shuffled, &reference);

        // Part of the signals first lands in another run that is merged in later.
        let cut = split.index(deliveries.len() + 1);
        let first = fold(&deliveries[..cut]);
        let first_ids: HashSet<u128> = deliveries[..cut].iter().map(|s| s.id).collect();
        let rest: Vec<&Signal> = deliveries[cut..].iter().copied().filter(|s| !first_ids.contains(&s.id)).collect();
        let mut merged = fold(&rest);
        merged.merge(&first);
        prop_assert_eq!(&merged, &reference);
    }
}
