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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::backend::{Backend, FleetSpec};
use super::stats::drive_numbered;
use super::{FleetReport, Recorder, WorkloadReport};

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
    let before = backend.node_counters().await;
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
    let after = backend.node_counters().await;
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
    let node_cpu_seconds = before
        .zip(after)
        .and_then(|(b, a)| Some((a.cpu_seconds? - b.cpu_seconds?).max(0.0)));
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
        leader_changes: before
            .zip(after)
            .map(|(b, a)| a.leader_changes.saturating_sub(b.leader_changes)),
        node_cpu_seconds,
        cpu_ms_per_heartbeat: node_cpu_seconds
            .filter(|_| report.ops > 0)
            .map(|cpu| cpu * 1e3 / report.ops as f64),
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
    let (backend, fleet) = (backend.clone(), fleet.clone());
    let (rec, elapsed) = drive_numbered(
        clients,
        0..count,
        |_| (),
        move |(), c, k| {
            let (backend, fleet) = (backend.clone(), fleet.clone());
            async move {
                let node = (c + k as usize) % nodes;
                ((), backend.fleet_register(&fleet, k, node).await)
            }
        },
    )
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
}
