//! Clients that register, heartbeat, deregister and look up instances
//! against random nodes, recording every operation: when it was called,
//! when it returned, on which node, and what came back. A timeout or a
//! `503` is an unknown outcome; a refused connection certainly did nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cluster::Targets;

/// Services whose instances live long (TTL one day): register, heartbeat,
/// deregister and reads, checked for linearizability.
pub const SERVICES: usize = 4;
pub const INSTANCES: usize = 5;
/// Services whose instances have a short TTL and are kept alive by
/// heartbeats only: checked for early expiry.
pub const HB_SERVICES: usize = 2;
pub const HB_INSTANCES: usize = 2;
pub const HB_TTL_SECS: u64 = 5;
const LONG_TTL_SECS: u64 = 86_400;

pub fn service(s: usize) -> String {
    format!("jk{s}")
}
pub fn instance(i: usize) -> String {
    format!("i{i}")
}
pub fn hb_service(s: usize) -> String {
    format!("jh{s}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub enum Kind {
    Register,
    Deregister,
    Heartbeat,
    Read,
    ConsistentRead,
    /// After the run, healed and converged: a default read on every member.
    FinalRead,
    /// A blocking query (`?index=N&wait=..`), N from the previous answer.
    Watch,
}

#[derive(Clone, Debug, Serialize)]
pub enum Res {
    /// 200 to a write.
    Ok,
    /// 404 to a deregister or heartbeat.
    NotFound,
    /// 200 (or 404: no instance) to a read: instance id -> value.
    Saw(BTreeMap<String, u64>),
    /// May or may not have taken effect (timeout, 503, connection lost).
    Unknown(String),
    /// Certainly had no effect (refused connection, 4xx), or a read that
    /// gave no answer.
    Fail(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub id: usize,
    pub client: usize,
    pub kind: Kind,
    pub service: String,
    pub instance: Option<String>,
    /// The value a register writes (metadata `v`), unique in the run.
    pub value: Option<u64>,
    pub node: u64,
    /// The node's incarnation, if it was the same at call and return.
    pub incarnation: Option<u64>,
    pub call: u64,
    pub ret: u64,
    pub result: Res,
    /// `X-Registry-Index` of a read answer.
    pub index: Option<u64>,
    /// HTTP status, if one came back.
    pub status: Option<u16>,
    /// The `index` a blocking query was given.
    pub after: Option<u64>,
}

pub struct Shared {
    pub start: Instant,
    pub targets: Arc<Targets>,
    pub stop: AtomicBool,
    pub next_value: AtomicU64,
    pub timeout: Duration,
    pub http: reqwest::Client,
}

impl Shared {
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

struct Call {
    status: Option<u16>,
    body: Value,
    index: Option<u64>,
    error: Option<(bool, String)>, // (certainly no effect, why)
}

async fn send(shared: &Shared, req: reqwest::RequestBuilder) -> Call {
    match req.timeout(shared.timeout).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let index = r
                .headers()
                .get("x-registry-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            match r.bytes().await {
                Ok(b) => Call {
                    status: Some(status),
                    body: serde_json::from_slice(&b).unwrap_or(Value::Null),
                    index,
                    error: None,
                },
                Err(e) => Call {
                    status: Some(status),
                    body: Value::Null,
                    index,
                    error: Some((false, format!("body lost: {e}"))),
                },
            }
        }
        Err(e) => {
            // A refused connection never reached a node.
            let refused = e.is_connect() && !e.is_timeout();
            Call {
                status: None,
                body: Value::Null,
                index: None,
                error: Some((refused, e.to_string())),
            }
        }
    }
}

fn write_result(c: &Call) -> Res {
    match (&c.error, c.status) {
        (Some((true, why)), _) => Res::Fail(why.clone()),
        (Some((false, why)), _) => Res::Unknown(why.clone()),
        (None, Some(200)) => Res::Ok,
        (None, Some(404)) => Res::NotFound,
        (None, Some(s)) if (400..500).contains(&s) && s != 408 && s != 429 => {
            Res::Fail(format!("{s}: {}", c.body))
        }
        (None, Some(s)) => Res::Unknown(format!("{s}: {}", c.body["message"])),
        (None, None) => Res::Unknown("no answer".into()),
    }
}

/// Instance id -> value from a `GET /services/{name}` answer.
pub fn parse_instances(body: &Value) -> Option<BTreeMap<String, u64>> {
    let mut seen = BTreeMap::new();
    for i in body["instances"].as_array()? {
        let id = i["instance_id"].as_str()?.to_string();
        let v = i["metadata"]["v"].as_str()?.parse().ok()?;
        seen.insert(id, v);
    }
    Some(seen)
}

fn read_result(c: &Call) -> Res {
    match (&c.error, c.status) {
        (Some((_, why)), _) => Res::Fail(why.clone()),
        (None, Some(200)) => match parse_instances(&c.body) {
            Some(seen) => Res::Saw(seen),
            None => Res::Fail(format!("unreadable answer: {}", c.body)),
        },
        (None, Some(404)) => Res::Saw(BTreeMap::new()),
        (None, Some(s)) => Res::Fail(format!("{s}: {}", c.body["message"])),
        (None, None) => Res::Fail("no answer".into()),
    }
}

pub struct Op {
    pub kind: Kind,
    /// For a watch: the index to wait past.
    pub after: Option<u64>,
    pub service: String,
    pub instance: Option<String>,
    pub value: Option<u64>,
    pub ttl: u64,
}

/// Runs one operation against node `(id, url)` and records it.
pub async fn run_op(shared: &Shared, client: usize, node: (u64, &str), op: Op) -> Record {
    let (id, url) = node;
    let inc = shared.targets.incarnation(id);
    let call = shared.now();
    let c = match op.kind {
        Kind::Register => {
            let inst = op.instance.clone().unwrap_or_default();
            let body = json!({
                "service_name": op.service,
                "instance_id": inst,
                "host": "10.9.9.9",
                "port": 1000 + inst.trim_start_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().unwrap_or(0),
                "ttl_seconds": op.ttl,
                "metadata": {"v": op.value.unwrap_or(0).to_string()},
            });
            send(
                shared,
                shared.http.post(format!("{url}/register")).json(&body),
            )
            .await
        }
        Kind::Heartbeat => {
            let body = json!({"service_name": op.service, "instance_id": op.instance});
            send(
                shared,
                shared.http.post(format!("{url}/heartbeat")).json(&body),
            )
            .await
        }
        Kind::Deregister => {
            let u = format!(
                "{url}/deregister/{}?instance_id={}",
                op.service,
                op.instance.clone().unwrap_or_default()
            );
            send(shared, shared.http.delete(u)).await
        }
        Kind::Read | Kind::FinalRead => {
            send(
                shared,
                shared.http.get(format!("{url}/services/{}", op.service)),
            )
            .await
        }
        Kind::Watch => {
            send(
                shared,
                shared.http.get(format!(
                    "{url}/services/{}?index={}&wait=1s",
                    op.service,
                    op.after.unwrap_or(0)
                )),
            )
            .await
        }
        Kind::ConsistentRead => {
            send(
                shared,
                shared
                    .http
                    .get(format!("{url}/services/{}?consistent=true", op.service)),
            )
            .await
        }
    };
    let ret = shared.now();
    let result = match op.kind {
        Kind::Register | Kind::Heartbeat | Kind::Deregister => write_result(&c),
        _ => read_result(&c),
    };
    let same = shared.targets.incarnation(id) == inc;
    Record {
        id: 0,
        client,
        kind: op.kind,
        service: op.service,
        instance: op.instance,
        value: op.value,
        node: id,
        incarnation: same.then_some(inc),
        call,
        ret,
        result,
        index: c.index,
        status: c.status,
        after: op.after,
    }
}

fn pick_node(shared: &Shared, rng: &mut StdRng) -> Option<(u64, String)> {
    let nodes = shared.targets.nodes.read().unwrap();
    if nodes.is_empty() {
        return None;
    }
    Some(nodes[rng.gen_range(0..nodes.len())].clone())
}

/// A client of the long-lived services: random operations on random keys.
pub async fn worker(shared: Arc<Shared>, client: usize, seed: u64) -> Vec<Record> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((id, url)) = pick_node(&shared, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let s = service(rng.gen_range(0..SERVICES));
        let i = instance(rng.gen_range(0..INSTANCES));
        let roll = rng.gen_range(0..100);
        let kind = match roll {
            0..=24 => Kind::Register,
            25..=34 => Kind::Deregister,
            35..=49 => Kind::Heartbeat,
            50..=74 => Kind::ConsistentRead,
            _ => Kind::Read,
        };
        let value =
            (kind == Kind::Register).then(|| shared.next_value.fetch_add(1, Ordering::SeqCst));
        let instance =
            matches!(kind, Kind::Register | Kind::Deregister | Kind::Heartbeat).then_some(i);
        let op = Op {
            kind,
            after: None,
            service: s,
            instance,
            value,
            ttl: LONG_TTL_SECS,
        };
        out.push(run_op(&shared, client, (id, &url), op).await);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..10))).await;
    }
    out
}

/// Keeps one short-TTL instance alive: registers it, then heartbeats every
/// 0.7-4 s through random nodes (registering again after a `404`, as the
/// client library does), and reads its service with `?consistent=true`.
pub async fn heartbeater(
    shared: Arc<Shared>,
    client: usize,
    s: usize,
    i: usize,
    seed: u64,
) -> Vec<Record> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut registered = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((id, url)) = pick_node(&shared, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (kind, value) = if registered {
            (Kind::Heartbeat, None)
        } else {
            (
                Kind::Register,
                Some(shared.next_value.fetch_add(1, Ordering::SeqCst)),
            )
        };
        let op = Op {
            kind,
            after: None,
            service: hb_service(s),
            instance: Some(instance(i)),
            value,
            ttl: HB_TTL_SECS,
        };
        let r = run_op(&shared, client, (id, &url), op).await;
        match (&r.kind, &r.result) {
            (Kind::Register, Res::Ok) => registered = true,
            (Kind::Heartbeat, Res::NotFound) => registered = false,
            _ => {}
        }
        out.push(r);
        let Some((id, url)) = pick_node(&shared, &mut rng) else {
            continue;
        };
        let op = Op {
            kind: Kind::ConsistentRead,
            after: None,
            service: hb_service(s),
            instance: None,
            value: None,
            ttl: 0,
        };
        out.push(run_op(&shared, client, (id, &url), op).await);
        // Between renewals, up to 4 s: most come within the ack window (TTL/2
        // + 2 s = 4.5 s) of the committed heartbeat, acknowledged without a
        // write, some after it. Now and then the instance falls silent,
        // sometimes for less than its TTL (it must survive) and sometimes for
        // more (it must expire, and is registered again after the 404).
        let pause = if rng.gen_range(0..15) == 0 {
            rng.gen_range(3_000..10_000)
        } else {
            rng.gen_range(700..4_000)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    out
}

/// Watches one service the way the gateway and the client library do:
/// a blocking query at a random node with the index of the last answer.
pub async fn watcher(shared: Arc<Shared>, client: usize, s: usize, seed: u64) -> Vec<Record> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut last = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((id, url)) = pick_node(&shared, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let op = Op {
            kind: Kind::Watch,
            after: Some(last),
            service: service(s),
            instance: None,
            value: None,
            ttl: 0,
        };
        let r = run_op(&shared, client, (id, &url), op).await;
        if let (Res::Saw(_), Some(i)) = (&r.result, r.index) {
            last = last.max(i);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        out.push(r);
    }
    out
}
