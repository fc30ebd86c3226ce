//! The `fleet` workload, open loop: N instances over M services, each
//! renewed once per period, every heartbeat sent at its scheduled time
//! whatever the earlier ones' answers (at most `--max-in-flight`
//! outstanding), its latency counted from that scheduled time. A closed loop
//! (each client waiting for its answer before the next request) slows down
//! with the system under test and so hides the queueing a real fleet, which
//! keeps its own clock, would see.
//!
//! Instance `k` (`fl-k` of `bench-fleet-{k mod M}`) has its heartbeats at
//! `start + k·period/N + j·period`: the offsets spread evenly over the
//! period, so the whole schedule is the sequence of events `e = 0, 1, ...`
//! at `start + e·period/N`, of instance `e mod N` (its `j = e div N`-th
//! heartbeat), sent to node `(k + j) mod nodes`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::backend::Backend;
use super::driver::drive;
use super::{BenchArgs, Recorder, WorkloadReport};

/// Longest TTL a registration may ask for (the API's bound).
const MAX_TTL_SECONDS: u64 = 86_400;

/// What `fleet` runs with, from the command line, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    pub instances: u64,
    pub services: u64,
    pub period: Duration,
    /// The TTL each instance is registered with: 3 periods rounded up, at
    /// least 10 s.
    pub ttl_seconds: u64,
    pub max_in_flight: usize,
}

impl FleetSpec {
    /// The spec the flags ask for, or an error naming the bad flag.
    pub fn from_args(args: &BenchArgs) -> anyhow::Result<Self> {
        let (instances, services) = (args.fleet_instances, args.fleet_services);
        let period = args.fleet_period_secs;
        anyhow::ensure!(instances >= 1, "--fleet-instances must be at least 1");
        anyhow::ensure!(
            (1..=instances).contains(&services),
            "--fleet-services must be between 1 and --fleet-instances ({instances}), not {services}"
        );
        anyhow::ensure!(
            period.is_finite() && period > 0.0,
            "--fleet-period-secs must be a number of seconds above 0, not {period}"
        );
        let ttl_seconds = ttl_for(period);
        anyhow::ensure!(
            ttl_seconds <= MAX_TTL_SECONDS,
            "--fleet-period-secs {period} is too long: the TTL (3 periods) would pass {MAX_TTL_SECONDS} s"
        );
        let max_in_flight = usize::try_from(args.max_in_flight)
            .ok()
            .filter(|m| (1..=Semaphore::MAX_PERMITS.min(u32::MAX as usize)).contains(m))
            .ok_or_else(|| anyhow::anyhow!("--max-in-flight must be between 1 and 100000"))?;
        Ok(Self {
            instances,
            services,
            period: Duration::from_secs_f64(period),
            ttl_seconds,
            max_in_flight,
        })
    }

    /// The service of instance `k`.
    pub fn service(&self, k: u64) -> String {
        format!("bench-fleet-{}", k % self.services)
    }

    /// The id of instance `k`.
    pub fn id(k: u64) -> String {
        format!("fl-{k}")
    }

    /// Heartbeats per second the schedule asks for: N / period.
    pub fn offered_per_sec(&self) -> f64 {
        self.instances as f64 / self.period.as_secs_f64()
    }
}

/// The TTL for a heartbeat period: three periods rounded up, at least 10 s
/// (saturating for absurd periods, which [`FleetSpec::from_args`] refuses).
pub fn ttl_for(period_secs: f64) -> u64 {
    let ttl = (3.0 * period_secs).ceil();
    if ttl >= u64::MAX as f64 {
        u64::MAX
    } else {
        (ttl as u64).max(10)
    }
}

/// The open-loop schedule of N instances renewed once per period.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub instances: u64,
    pub period: Duration,
}

/// One scheduled heartbeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// The instance.
    pub k: u64,
    /// Its heartbeat number.
    pub j: u64,
    /// When it is due, from the start of the run.
    pub at: Duration,
}

impl Schedule {
    /// Instance `k`'s offset within the period: `k·period/N`.
    pub fn offset(&self, k: u64) -> Duration {
        self.period.mul_f64(k as f64 / self.instances as f64)
    }

    /// The `e`-th heartbeat in time order: instance `e mod N`'s
    /// `(e div N)`-th, due at `offset_k + j·period` = `e·period/N`.
    pub fn event(&self, e: u64) -> Event {
        let (k, j) = (e % self.instances, e / self.instances);
        let periods = u32::try_from(j).unwrap_or(u32::MAX);
        Event {
            k,
            j,
            at: self
                .offset(k)
                .saturating_add(self.period.saturating_mul(periods)),
        }
    }

    /// How many heartbeats are due before `window` has passed (those due
    /// at `e·period/N < window`).
    pub fn events_within(&self, window: Duration) -> u64 {
        let n = (window.as_secs_f64() * self.instances as f64 / self.period.as_secs_f64()).ceil();
        if n.is_finite() && n > 0.0 {
            n as u64
        } else {
            0
        }
    }
}

/// The figures only `fleet` has, in its report's `fleet` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    pub instances: u64,
    pub services: u64,
    pub period_secs: f64,
    /// The TTL the instances were registered with.
    pub ttl_seconds: u64,
    pub max_in_flight: usize,
    /// How long registering the instances took (before the run).
    pub register_seconds: f64,
    /// Heartbeats per second the schedule asks for: instances / period.
    pub offered_per_sec: f64,
    /// Successful heartbeats per second, over the run (from its start to
    /// the last answer).
    pub achieved_per_sec: f64,
    /// Heartbeats due within `--seconds` (all of them were sent).
    pub scheduled: u64,
    /// Heartbeats that found `--max-in-flight` outstanding and waited for
    /// a slot (their latency includes the wait).
    pub waited_for_slot: u64,
    /// Most any heartbeat was sent after its scheduled time (waiting for a
    /// slot, or the driver falling behind its own schedule).
    pub max_send_lag_ms: f64,
    /// Instances registered but not found after the run (null if counting
    /// failed).
    pub missing: Option<u64>,
    /// Leader changes during the run, summed over the nodes' own counters
    /// (null if a node's metrics could not be read).
    pub leader_changes: Option<u64>,
}

/// Runs `fleet` on `backend`: registers the instances with `clients` in
/// parallel (instance `k` through node `(c + k) mod nodes`), runs the open
/// loop for `duration`, counts the instances still there, removes them.
pub async fn run<B: Backend>(
    backend: &Arc<B>,
    spec: &FleetSpec,
    nodes: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<WorkloadReport> {
    let fleet = Arc::new(backend.fleet_new(spec));
    let registered = register(backend, &fleet, spec.instances, nodes, clients).await;
    if registered.errors > 0 {
        backend.fleet_cleanup(&fleet).await;
        anyhow::bail!(
            "registering the fleet: {} of {} registrations failed (first: {})",
            registered.errors,
            spec.instances,
            registered.first_error.as_deref().unwrap_or("?")
        );
    }
    let before = backend.leader_changes().await;
    let schedule = Schedule {
        instances: spec.instances,
        period: spec.period,
    };
    let run = open_loop(
        backend,
        &fleet,
        schedule,
        nodes,
        spec.max_in_flight,
        duration,
    )
    .await;
    let after = backend.leader_changes().await;
    let missing = match backend.fleet_count(&fleet).await {
        Ok(present) => Some(spec.instances.saturating_sub(present)),
        Err(e) => {
            eprintln!("bench: counting the fleet's instances: {e:#}");
            None
        }
    };
    backend.fleet_cleanup(&fleet).await;
    let mut report = run
        .recorder
        .report("fleet", spec.max_in_flight, run.elapsed);
    report.fleet = Some(FleetReport {
        instances: spec.instances,
        services: spec.services,
        period_secs: spec.period.as_secs_f64(),
        ttl_seconds: spec.ttl_seconds,
        max_in_flight: spec.max_in_flight,
        register_seconds: registered.seconds,
        offered_per_sec: spec.offered_per_sec(),
        achieved_per_sec: report.ops_per_sec,
        scheduled: run.scheduled,
        waited_for_slot: run.waited_for_slot,
        max_send_lag_ms: run.max_send_lag.as_secs_f64() * 1e3,
        missing,
        leader_changes: match (before, after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b)),
            _ => None,
        },
    });
    Ok(report)
}

/// Registers instances `0..count` with `clients` in parallel.
async fn register<B: Backend>(
    backend: &Arc<B>,
    fleet: &Arc<B::Fleet>,
    count: u64,
    nodes: usize,
    clients: usize,
) -> WorkloadReport {
    let next = Arc::new(AtomicU64::new(0));
    let (backend, fleet) = (backend.clone(), fleet.clone());
    let (rec, elapsed) = drive(clients, Duration::from_secs(86_400), move |c, _| {
        let (backend, fleet, next) = (backend.clone(), fleet.clone(), next.clone());
        async move {
            let mut rec = Recorder::default();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return rec;
                }
                let node = (c + k as usize) % nodes;
                let t = Instant::now();
                let outcome = backend.fleet_register(&fleet, k, node).await;
                rec.record(t, outcome);
            }
        }
    })
    .await;
    rec.report("fleet-register", clients, elapsed)
}

/// What the open loop saw.
struct OpenLoop {
    recorder: Recorder,
    elapsed: Duration,
    scheduled: u64,
    waited_for_slot: u64,
    max_send_lag: Duration,
}

/// Sends every heartbeat of `schedule` due within `duration` at its time,
/// or as soon as one of the `max_in_flight` slots frees; waits for every
/// answer. Each latency counts from the heartbeat's scheduled time.
async fn open_loop<B: Backend>(
    backend: &Arc<B>,
    fleet: &Arc<B::Fleet>,
    schedule: Schedule,
    nodes: usize,
    max_in_flight: usize,
    duration: Duration,
) -> OpenLoop {
    let scheduled = schedule.events_within(duration);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let (mut waited_for_slot, mut max_send_lag) = (0, Duration::ZERO);
    let start = Instant::now();
    for e in 0..scheduled {
        let ev = schedule.event(e);
        let Some(due) = start.checked_add(ev.at) else {
            break; // beyond what a clock can say: never within --seconds
        };
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                waited_for_slot += 1;
                match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break, // never: the semaphore is not closed
                }
            }
        };
        max_send_lag = max_send_lag.max(due.elapsed());
        let node = ((ev.k + ev.j) % nodes as u64) as usize;
        let (backend, fleet, recorder) = (backend.clone(), fleet.clone(), recorder.clone());
        tokio::spawn(async move {
            let outcome = backend.fleet_heartbeat(&fleet, ev.k, node).await;
            recorder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(due, outcome);
            drop(permit);
        });
    }
    // Every slot free again: every heartbeat answered (or timed out).
    let _all = slots.acquire_many(max_in_flight as u32).await;
    let elapsed = start.elapsed();
    let recorder = std::mem::take(&mut *recorder.lock().unwrap_or_else(|p| p.into_inner()));
    OpenLoop {
        recorder,
        elapsed,
        scheduled,
        waited_for_slot,
        max_send_lag,
    }
}

/// The sum of the samples of counter `name` (without labels or with any)
/// in a Prometheus text exposition; `None` if there is none.
pub fn counter_value(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.chars().next() {
            Some(' ') => rest,
            Some('{') => rest.split_once('}').map(|(_, v)| v).unwrap_or(""),
            _ => continue,
        };
        let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
        if value.is_finite() && value >= 0.0 {
            found = Some(found.unwrap_or(0) + value as u64);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(n: u64, period_ms: u64) -> Schedule {
        Schedule {
            instances: n,
            period: Duration::from_millis(period_ms),
        }
    }

    #[test]
    fn offsets_spread_evenly_over_the_period() {
        let s = schedule(4, 1_000);
        let offsets: Vec<Duration> = (0..4).map(|k| s.offset(k)).collect();
        assert_eq!(
            offsets,
            [0, 250, 500, 750].map(Duration::from_millis).to_vec()
        );
        // 10,000 instances over 30 s: 3 ms apart, the last one a gap
        // before the period's end.
        let s = schedule(10_000, 30_000);
        assert_eq!(s.offset(1), Duration::from_millis(3));
        assert_eq!(s.offset(9_999), Duration::from_millis(29_997));
    }

    #[test]
    fn heartbeats_are_due_at_offset_plus_whole_periods() {
        let s = schedule(4, 1_000);
        let ev = s.event(9);
        assert_eq!((ev.k, ev.j), (1, 2));
        assert_eq!(ev.at, s.offset(1) + 2 * s.period);
        // In time order, every instance once per period.
        let events: Vec<Event> = (0..8).map(|e| s.event(e)).collect();
        assert!(events.windows(2).all(|w| w[0].at < w[1].at));
        for k in 0..4 {
            let mine: Vec<Duration> = events.iter().filter(|e| e.k == k).map(|e| e.at).collect();
            assert_eq!(mine, [s.offset(k), s.offset(k) + s.period]);
        }
    }

    #[test]
    fn events_within_a_window() {
        let s = schedule(200, 1_000);
        assert_eq!(s.events_within(Duration::from_secs(3)), 600);
        assert_eq!(s.events_within(Duration::from_millis(2_501)), 501);
        assert_eq!(s.events_within(Duration::ZERO), 0);
        // A fraction of a period: only the instances due within it.
        let s = schedule(10, 10_000);
        assert_eq!(s.events_within(Duration::from_millis(3_000)), 3);
        assert_eq!(s.events_within(Duration::from_millis(3_001)), 4);
    }

    #[test]
    fn ttl_is_three_periods_at_least_ten_seconds() {
        assert_eq!(ttl_for(30.0), 90);
        assert_eq!(ttl_for(10.0), 30);
        assert_eq!(ttl_for(1.0), 10);
        assert_eq!(ttl_for(0.5), 10);
        assert_eq!(ttl_for(3.4), 11);
        assert_eq!(ttl_for(1e300), u64::MAX);
    }

    #[test]
    fn counters_from_prometheus_text() {
        let text = "# HELP raft_leader_changes_total x\n# TYPE raft_leader_changes_total counter\nraft_leader_changes_total 3\nraft_leader_changes_totalx 9\n";
        assert_eq!(counter_value(text, "raft_leader_changes_total"), Some(3));
        assert_eq!(counter_value("a{x=\"1\"} 2\na{x=\"2\"} 5\n", "a"), Some(7));
        assert_eq!(counter_value("b 1\n", "a"), None);
        assert_eq!(counter_value("a 1e+00\n", "a"), Some(1));
    }
}
