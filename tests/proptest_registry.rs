//! Property tests: request parsing never panics and accepts only what the
//! documented field rules allow; the state machine is deterministic, never
//! expires an instance before its deadline, reports every change it makes,
//! and survives a snapshot round trip.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Map, Value};
use vertice_register::registry::lease::{EXPIRY_MARGIN_MS, LEGACY_EXPIRY_SLACK_MS};
use vertice_register::registry::validate::{self, is_hidden_char};
use vertice_register::registry::{
    parse_heartbeat, parse_register, Change, Command, CommandResult, Instance, InstanceExt,
    Registry, Renewal, Tombstone, TombstonePolicy,
};

const CASES: u32 = 256;

/// Strings mixing ASCII, separators, control, bidi, zero-width and
/// look-alike characters.
fn text() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => proptest::char::range(' ', '~'),
        1 => Just('\0'),
        1 => Just('\n'),
        1 => Just('\u{7f}'),
        1 => Just('\u{85}'),
        1 => Just('\u{200b}'),
        1 => Just('\u{200d}'),
        1 => Just('\u{202e}'),
        1 => Just('\u{2066}'),
        1 => Just('\u{feff}'),
        1 => Just('\u{0430}'),
        1 => Just('\u{ff50}'),
        1 => Just('é'),
        1 => any::<char>(),
    ];
    prop_oneof![
        8 => proptest::collection::vec(chars, 0..24).prop_map(|v| v.into_iter().collect()),
        1 => Just(".".to_string()),
        1 => Just("..".to_string()),
        1 => (0usize..1200).prop_map(|n| "x".repeat(n)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(text(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects with the register fields, each absent or any value (often a
/// plausible one), so the validators see deep into the body.
fn register_body() -> impl Strategy<Value = Value> {
    let field = |good: BoxedStrategy<Value>| {
        prop_oneof![
            3 => Just(None),
            8 => good.prop_map(Some),
            1 => json_value().prop_map(Some),
        ]
    };
    let name = prop_oneof![
        2 => Just(Value::from("svc")),
        4 => "[A-Za-z0-9_.-]{1,10}".prop_map(Value::from),
        1 => text().prop_map(Value::from),
    ]
    .boxed();
    let port = (0u64..70_000).prop_map(Value::from).boxed();
    let host = prop_oneof![
        4 => "[a-z0-9.:-]{1,20}".prop_map(Value::from),
        1 => text().prop_map(Value::from),
    ]
    .boxed();
    let health = prop_oneof![
        4 => "/[!-~]{0,20}".prop_map(Value::from),
        1 => text().prop_map(Value::from),
    ]
    .boxed();
    let id = prop_oneof![
        4 => "[!-.0-~]{1,20}".prop_map(Value::from),
        1 => text().prop_map(Value::from),
    ]
    .boxed();
    let ttl = (0u64..100_000).prop_map(Value::from).boxed();
    let value = prop_oneof![
        6 => "[ -~\u{e9}\u{430}\u{4e00}]{0,30}".prop_map(Value::from),
        2 => text().prop_map(Value::from),
        1 => json_value(),
    ];
    let meta = prop_oneof![
        6 => proptest::collection::btree_map("[!-~]{1,10}", value.clone(), 0..8),
        1 => proptest::collection::btree_map(prop_oneof!["[!-~]{1,130}", text()], value, 0..70),
    ]
    .prop_map(|m| Value::Object(m.into_iter().collect()))
    .boxed();
    (
        field(name),
        field(port),
        field(host),
        field(health),
        field(meta),
        field(id),
        field(ttl),
    )
        .prop_map(|(n, p, h, he, m, i, t)| {
            let mut obj = Map::new();
            for (k, v) in [
                ("service_name", n),
                ("port", p),
                ("host", h),
                ("health_endpoint", he),
                ("metadata", m),
                ("instance_id", i),
                ("ttl_seconds", t),
            ] {
                if let Some(v) = v {
                    obj.insert(k.into(), v);
                }
            }
            Value::Object(obj)
        })
}

fn valid_service_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && s != "."
        && s != ".."
}

fn valid_instance_id(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// The generator reaches accepted bodies often enough for the property
/// below to mean something.
#[test]
fn the_generator_reaches_accepted_bodies() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let s = register_body();
    let accepted = (0..CASES)
        .filter(|_| parse_register(&s.new_tree(&mut runner).unwrap().current()).is_ok())
        .count();
    assert!(
        accepted >= CASES as usize / 10,
        "{accepted} of {CASES} accepted"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn anything_accepted_follows_the_field_rules(body in prop_oneof![json_value(), register_body()]) {
        if let Ok(r) = parse_register(&body) {
            prop_assert!(valid_service_name(&r.service_name));
            prop_assert!(r.port >= 1);
            if let Some(h) = &r.host {
                prop_assert!((1..=253).contains(&h.len()));
                prop_assert!(h.bytes().all(|b| b.is_ascii_alphanumeric()
                    || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']' | b'%')));
            }
            prop_assert!(r.health_endpoint.starts_with('/'));
            prop_assert!(r.health_endpoint.len() <= 512);
            prop_assert!(r.health_endpoint.bytes().all(|b| b.is_ascii_graphic()));
            if let Some(id) = &r.instance_id {
                prop_assert!(valid_instance_id(id));
            }
            prop_assert!((5..=86_400).contains(&r.ttl_seconds));
            prop_assert!(r.metadata.len() <= 64);
            let mut total = 0;
            for (k, v) in &r.metadata {
                prop_assert!((1..=128).contains(&k.len()));
                prop_assert!(k.bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(v.len() <= 1024);
                prop_assert!(!v.chars().any(is_hidden_char));
                total += k.len() + v.len();
            }
            prop_assert!(total <= validate::MAX_METADATA_TOTAL);
        }
        if let Ok(h) = parse_heartbeat(&body) {
            prop_assert!(valid_service_name(&h.service_name));
            if let Some(id) = &h.instance_id {
                prop_assert!(valid_instance_id(id));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = validate::no_duplicate_keys(&bytes);
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = parse_register(&v);
            let _ = parse_heartbeat(&v);
        }
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = validate::service_name(s, "service_name");
            let _ = validate::instance_id(s);
        }
    }

    #[test]
    fn json_texts_with_a_repeated_key_are_refused(v in json_value(), key in text()) {
        let text = serde_json::to_string(&v).unwrap();
        // Serialized maps never repeat a key.
        prop_assert!(validate::no_duplicate_keys(text.as_bytes()).is_ok());
        let k = serde_json::to_string(&key).unwrap();
        let dup = format!("{{{k}:1,\"x\":{text},{k}:2}}");
        prop_assert!(validate::no_duplicate_keys(dup.as_bytes()).is_err());
    }
}

const SERVICES: [&str; 3] = ["a", "b", "c"];
const IDS: [&str; 3] = ["1", "2", "3"];
const ORIGINS: [&str; 2] = ["10.0.0.1", "10.0.0.2"];

fn key() -> impl Strategy<Value = (String, String)> {
    (0..SERVICES.len(), 0..IDS.len()).prop_map(|(s, i)| (SERVICES[s].into(), IDS[i].into()))
}

fn command() -> impl Strategy<Value = Command> {
    let stamp = 0i64..120_000;
    prop_oneof![
        3 => (key(), stamp.clone(), 5u32..30, any::<u16>()).prop_map(|((s, i), t, ttl, port)| {
            Command::Register {
                instance: Instance {
                    service_name: s,
                    instance_id: i,
                    host: "10.0.0.1".into(),
                    port,
                    health_endpoint: "/health".into(),
                    metadata: Default::default(),
                    ttl_seconds: ttl,
                    registered_at: t,
                    last_heartbeat: t,
                },
            }
        }),
        2 => proptest::collection::vec((key(), stamp.clone()), 0..4).prop_map(|v| Command::Renew {
            renewals: v
                .into_iter()
                .map(|((s, i), at)| Renewal { service_name: s, instance_id: i, at })
                .collect(),
        }),
        1 => (0..SERVICES.len(), proptest::option::of(0..IDS.len())).prop_map(|(s, i)| {
            Command::Deregister {
                service_name: SERVICES[s].into(),
                instance_id: i.map(|i| IDS[i].to_string()),
            }
        }),
        2 => (stamp.clone(), 1u64..4, proptest::collection::vec(key(), 0..6)).prop_map(
            |(now_ms, term, instances)| Command::Expire { now_ms, term, instances }
        ),
        3 => (key(), stamp.clone(), 5u32..30, proptest::option::of(0..ORIGINS.len()), any::<bool>())
            .prop_map(|((s, i), t, ttl, o, https)| Command::RegisterFrom {
                instance: Instance {
                    service_name: s,
                    instance_id: i,
                    host: "10.0.0.1".into(),
                    port: 80,
                    health_endpoint: "/health".into(),
                    metadata: Default::default(),
                    ttl_seconds: ttl,
                    registered_at: t,
                    last_heartbeat: t,
                },
                ext: InstanceExt { origin: o.map(|o| ORIGINS[o].to_string()), https },
            }),
        1 => (0..SERVICES.len(), proptest::option::of(0..IDS.len()), proptest::option::of(0..ORIGINS.len()))
            .prop_map(|(s, i, o)| Command::DeregisterFrom {
                service_name: SERVICES[s].into(),
                instance_id: i.map(|i| IDS[i].to_string()),
                origin: o.map(|o| ORIGINS[o].to_string()),
            }),
        2 => (stamp.clone(), 1u64..4, proptest::collection::vec(key(), 0..6), 0i64..60_000, 0u32..4)
            .prop_map(|(now_ms, term, instances, retention_ms, max)| Command::ExpireKeep {
                now_ms, term, instances, keep: TombstonePolicy { retention_ms, max },
            }),
        2 => (stamp.clone(), 1u64..4, proptest::collection::vec(key(), 0..6), 0i64..60_000, 0u32..4, 0i64..3_000)
            .prop_map(|(now_ms, term, instances, retention_ms, max, margin_ms)| Command::ExpireAfter {
                now_ms, term, instances, keep: TombstonePolicy { retention_ms, max }, margin_ms,
            }),
        2 => (0..SERVICES.len(), proptest::collection::vec(0..IDS.len(), 0..3), stamp.clone(), 0i64..60_000)
            .prop_map(|(s, ids, at, retention_ms)| Command::Revive {
                service_name: SERVICES[s].into(),
                instance_ids: ids.into_iter().map(|i| IDS[i].to_string()).collect(),
                at,
                retention_ms,
            }),
        1 => any::<bool>().prop_map(|paused| Command::SetExpiryPaused { paused }),
        1 => stamp.clone().prop_map(|at| Command::RestartClocks { at }),
    ]
}

/// What the persistent copy holds, followed from the reported changes.
#[derive(Default)]
struct Shadow {
    live: BTreeMap<(String, String), (Instance, InstanceExt)>,
    tombstones: BTreeMap<(String, String), Tombstone>,
    paused: bool,
    clocks_pending: bool,
}

/// Follows `changes` the way the persistent copy does.
fn follow(shadow: &mut Shadow, changes: &[Change]) {
    for c in changes {
        match c {
            Change::Put(i) => {
                // A renewal keeps what was kept beside the instance.
                shadow
                    .live
                    .entry((i.service_name.clone(), i.instance_id.clone()))
                    .and_modify(|(old, _)| *old = i.clone())
                    .or_insert_with(|| (i.clone(), InstanceExt::default()));
            }
            Change::Ext {
                service_name,
                instance_id,
                ext,
            } => {
                let live = shadow
                    .live
                    .get_mut(&(service_name.clone(), instance_id.clone()))
                    .expect("an ext change follows its instance's put");
                live.1 = ext.clone();
            }
            Change::Delete {
                service_name,
                instance_id,
            } => {
                shadow
                    .live
                    .remove(&(service_name.clone(), instance_id.clone()));
            }
            Change::ExpiryPaused(p) => shadow.paused = *p,
            Change::ClocksPending(p) => shadow.clocks_pending = *p,
            Change::Bury(t) => {
                let i = &t.instance;
                shadow
                    .tombstones
                    .insert((i.service_name.clone(), i.instance_id.clone()), t.clone());
            }
            Change::Unbury {
                service_name,
                instance_id,
            } => {
                shadow
                    .tombstones
                    .remove(&(service_name.clone(), instance_id.clone()));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn the_state_machine_is_deterministic_and_never_expires_early(
        log in proptest::collection::vec((command(), 1u64..4), 0..40)
    ) {
        let (mut one, mut two) = (Registry::new(), Registry::new());
        let mut shadow = Shadow::default();
        for (cmd, entry_term) in &log {
            let before = one.clone();
            let mut changes = Vec::new();
            let r1 = one.apply(cmd, *entry_term, &mut changes);
            let r2 = two.apply(cmd, *entry_term, &mut Vec::new());
            prop_assert_eq!(&r1, &r2);
            prop_assert_eq!(&one, &two);
            follow(&mut shadow, &changes);
            let now: BTreeMap<_, _> = one
                .instances_ext()
                .map(|(i, e)| ((i.service_name.clone(), i.instance_id.clone()), (i.clone(), e.clone())))
                .collect();
            prop_assert_eq!(&shadow.live, &now, "the changes reported do not match the state");
            let graves: BTreeMap<_, _> = one
                .tombstones()
                .map(|t| ((t.instance.service_name.clone(), t.instance.instance_id.clone()), t.clone()))
                .collect();
            prop_assert_eq!(&shadow.tombstones, &graves, "the tombstone changes do not match");
            prop_assert_eq!(one.tombstone_count(), graves.len());
            prop_assert_eq!(shadow.paused, one.expiry_paused());
            prop_assert_eq!(shadow.clocks_pending, one.clocks_pending());
            // The deadline index agrees with a scan of every instance, at
            // every moment around every deadline.
            for i in one.instances() {
                for now in [i.deadline() + EXPIRY_MARGIN_MS - 1, i.deadline() + EXPIRY_MARGIN_MS] {
                    let mut scan: Vec<(String, String)> = one
                        .instances()
                        .filter(|x| vertice_register::registry::lease::is_due(x, EXPIRY_MARGIN_MS, now))
                        .map(|x| (x.service_name.clone(), x.instance_id.clone()))
                        .collect();
                    let mut due = one.due(now, EXPIRY_MARGIN_MS);
                    scan.sort();
                    due.sort();
                    prop_assert_eq!(due, scan, "the deadline index disagrees with a scan at {}", now);
                }
            }
            // An instance is never both live and a tombstone.
            for k in graves.keys() {
                prop_assert!(!now.contains_key(k), "{:?} is live and buried", k);
            }
            // (A deposed leader's expiry changes nothing, pruning included.)
            if let Command::ExpireKeep { keep, term, .. } | Command::ExpireAfter { keep, term, .. } = cmd {
                prop_assert!(*term != *entry_term ||graves.len() <= keep.max as usize, "more tombstones than allowed");
            }
            let judged = match cmd {
                Command::Expire { now_ms, .. } | Command::ExpireKeep { now_ms, .. } => {
                    Some((*now_ms, LEGACY_EXPIRY_SLACK_MS))
                }
                Command::ExpireAfter { now_ms, margin_ms, .. } => Some((*now_ms, *margin_ms)),
                _ => None,
            };
            if let Some((now_ms, margin)) = judged {
                let now_ms = &now_ms;
                for i in before.instances() {
                    let deadline = i.last_heartbeat + i64::from(i.ttl_seconds) * 1000 + margin;
                    if deadline > *now_ms {
                        prop_assert_eq!(
                            one.get_instance(&i.service_name, &i.instance_id),
                            Some(i),
                            "expired before its deadline"
                        );
                    }
                }
            }
        }
        // A restore from what a snapshot holds gives the same registry.
        let mut restored = Registry::new();
        restored.restore_expiry_paused(one.expiry_paused());
        for (i, e) in one.instances_ext() {
            restored.restore(i.clone(), InstanceExt::default());
            restored.restore_ext(&i.service_name, &i.instance_id, e.clone());
        }
        for t in one.tombstones() {
            restored.restore_tombstone(t.clone());
        }
        prop_assert_eq!(&restored, &one);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Group commit puts client writes that arrive together into one
    /// `Batch` entry: it must change the registry, and answer each write,
    /// exactly as one entry per write would.
    #[test]
    fn a_batch_applies_like_its_commands_one_by_one(
        prefix in proptest::collection::vec(command(), 0..10),
        batch in proptest::collection::vec(command(), 0..12),
        entry_term in 1u64..4,
    ) {
        let mut one = Registry::new();
        for cmd in &prefix {
            one.apply(cmd, entry_term, &mut Vec::new());
        }
        let mut two = one.clone();
        let (mut changes_one, mut changes_two) = (Vec::new(), Vec::new());
        let results: Vec<_> = batch
            .iter()
            .map(|c| one.apply(c, entry_term, &mut changes_one))
            .collect();
        let batched = two.apply(
            &Command::Batch { commands: batch.clone() },
            entry_term,
            &mut changes_two,
        );
        prop_assert_eq!(batched, CommandResult::Batch(results));
        prop_assert_eq!(&one, &two);
        prop_assert_eq!(changes_one, changes_two);
        // The entry survives the log's encoding.
        let cmd = Command::Batch { commands: batch };
        let back: Command = bincode::deserialize(&bincode::serialize(&cmd).unwrap()).unwrap();
        prop_assert_eq!(back, cmd);
    }
}
