//! Latency recording and the report of one workload run: per-client
//! recorders merged at the end, exact percentiles by nearest rank over every
//! latency (a few hundred thousand numbers at most: sorting them is cheaper
//! than getting a histogram's bucket bounds right).
//!
//! Also the two runners every workload's clients go through: [`drive`]
//! (clients until a deadline) and [`drive_numbered`] (numbered jobs shared
//! out to workers, for fill and the fleet's registration).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What one client saw: every successful operation's latency and the errors.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Latencies of the successful operations, in nanoseconds.
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Recorder {
    /// Records the outcome of one operation started at `start`.
    pub fn record<E: std::fmt::Display>(&mut self, start: Instant, outcome: Result<(), E>) {
        match outcome {
            Ok(()) => self
                .latencies_ns
                .push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e.to_string());
                }
            }
        }
    }

    /// Adds another client's figures to these.
    pub fn merge(&mut self, other: Recorder) {
        self.latencies_ns.extend(other.latencies_ns);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The report of a run that lasted `elapsed`.
    pub fn report(mut self, workload: &str, clients: usize, elapsed: Duration) -> WorkloadReport {
        self.latencies_ns.sort_unstable();
        let lat = &self.latencies_ns;
        let ms = |ns: u64| ns as f64 / 1e6;
        let secs = elapsed.as_secs_f64();
        WorkloadReport {
            workload: workload.to_owned(),
            clients,
            seconds: secs,
            ops: lat.len() as u64,
            ops_per_sec: if secs > 0.0 {
                lat.len() as f64 / secs
            } else {
                0.0
            },
            p50_ms: ms(percentile(lat, 50.0)),
            p99_ms: ms(percentile(lat, 99.0)),
            max_ms: ms(lat.last().copied().unwrap_or(0)),
            errors: self.errors,
            first_error: self.first_error,
            leader_changes: None,
            fleet: None,
        }
    }
}

/// The `p`-th percentile (0 < p <= 100) of ascending `sorted` by nearest
/// rank: the smallest value with at least p% of the values at or below it.
/// 0 for an empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The figures of one workload run, as printed and as `--json` gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadReport {
    pub workload: String,
    pub clients: usize,
    /// How long the run lasted (the operations in flight at the deadline
    /// included).
    pub seconds: f64,
    /// Successful operations.
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Failed operations (transport errors, timeouts, non-2xx answers).
    pub errors: u64,
    /// The first error seen, to tell what went wrong.
    pub first_error: Option<String>,
    /// Leader changes during the run, summed over the nodes' counters
    /// (`fill` reports it; `fleet` has its own in `fleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_changes: Option<u64>,
    /// The `fleet` workload's own figures (absent for the others). Its
    /// `clients` is --max-in-flight, `ops_per_sec` the achieved rate, and
    /// its latencies count from each heartbeat's scheduled time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetReport>,
}

impl WorkloadReport {
    /// One line for people.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<18} clients={:<3} ops/s={:>8.0}  p50={:>6.2}ms  p99={:>6.2}ms  max={:>7.2}ms  errors={}",
            self.workload,
            self.clients,
            self.ops_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.errors
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!(" (first: {e})"));
        }
        if let Some(n) = self.leader_changes {
            s.push_str(&format!("  leader_changes={n}"));
        }
        if let Some(f) = &self.fleet {
            let opt = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
            s.push_str(&format!(
                "\n{:<18} instances={} services={} period={}s offered={:.0}/s achieved={:.0}/s scheduled={} waited_for_slot={} max_send_lag={:.2}ms missing={} leader_changes={} node_cpu={} (registered in {:.1}s)",
                "",
                f.instances,
                f.services,
                f.period_secs,
                f.offered_per_sec,
                f.achieved_per_sec,
                f.scheduled,
                f.waited_for_slot,
                f.max_send_lag_ms,
                opt(f.missing),
                opt(f.leader_changes),
                f.cpu_ms_per_heartbeat
                    .map_or("?".to_owned(), |v| format!("{v:.3}ms/heartbeat")),
                f.register_seconds
            ));
        }
        s
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
    /// CPU time the nodes spent during the run (user + system, summed over
    /// the nodes' `process_cpu_seconds_total`; null if not readable).
    #[serde(default)]
    pub node_cpu_seconds: Option<f64>,
    /// `node_cpu_seconds` per answered heartbeat, in milliseconds.
    #[serde(default)]
    pub cpu_ms_per_heartbeat: Option<f64>,
}

/// Runs `clients` copies of `client` until `duration` has passed and merges
/// what they recorded. Each client gets its number and the deadline, and
/// must not start an operation after the deadline.
pub(super) async fn drive<F, Fut>(
    clients: usize,
    duration: Duration,
    client: F,
) -> (Recorder, Duration)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: Future<Output = Recorder> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| tokio::spawn(client(c, deadline)))
        .collect();
    let mut all = Recorder::default();
    for t in tasks {
        match t.await {
            Ok(r) => all.merge(r),
            Err(e) => all.record(Instant::now(), Err(format!("client task failed: {e}"))),
        }
    }
    (all, started.elapsed())
}

/// Runs the numbered jobs `jobs` on `clients` workers, each taking the next
/// number until none is left, and merges what they recorded. A worker
/// starts with `init(worker)` and hands that state to each of its jobs,
/// which gives it back with the outcome; each job's latency is recorded.
pub(super) async fn drive_numbered<S, I, J, Fut, E>(
    clients: usize,
    jobs: std::ops::Range<u64>,
    init: I,
    job: J,
) -> (Recorder, Duration)
where
    S: Send + 'static,
    I: Fn(usize) -> S + Send + Sync + 'static,
    J: Fn(S, usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (S, Result<(), E>)> + Send,
    E: std::fmt::Display,
{
    let next = Arc::new(AtomicU64::new(jobs.start));
    let (init, job) = (Arc::new(init), Arc::new(job));
    drive(clients, Duration::from_secs(86_400), move |c, _| {
        let (next, init, job) = (next.clone(), init.clone(), job.clone());
        let end = jobs.end;
        async move {
            let mut state = init(c);
            let mut rec = Recorder::default();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= end {
                    return rec;
                }
                let t = Instant::now();
                let (kept, outcome) = job(state, c, k).await;
                state = kept;
                rec.record(t, outcome);
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.5), 1);
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(percentile(&[7], 50.0), 7);
        assert_eq!(percentile(&[7], 99.0), 7);
        // Ten values: p99 is the largest, p50 the fifth.
        let ten: Vec<u64> = (10..=100).step_by(10).collect();
        assert_eq!(percentile(&ten, 99.0), 100);
        assert_eq!(percentile(&ten, 50.0), 50);
        assert_eq!(percentile(&ten, 90.0), 90);
        assert_eq!(percentile(&ten, 91.0), 100);
    }

    #[test]
    fn report_merges_clients_and_counts_errors() {
        let start = Instant::now();
        let mut a = Recorder::default();
        a.record::<String>(start, Ok(()));
        a.record(start, Err("boom"));
        let mut b = Recorder::default();
        b.record::<String>(start, Ok(()));
        b.record(start, Err("later"));
        a.merge(b);
        let r = a.report("lookup", 2, Duration::from_secs(2));
        assert_eq!(r.ops, 2);
        assert_eq!(r.errors, 2);
        assert_eq!(r.ops_per_sec, 1.0);
        assert_eq!(r.first_error.as_deref(), Some("boom"));
        assert!(r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms);
    }

    #[test]
    fn empty_run_reports_zeros() {
        let r = Recorder::default().report("list", 1, Duration::ZERO);
        assert_eq!((r.ops, r.errors), (0, 0));
        assert_eq!((r.ops_per_sec, r.p50_ms, r.max_ms), (0.0, 0.0, 0.0));
    }
}
