//! A node's background tasks besides the leader's (those are in
//! [`crate::leader`]): the election watchdog, joining a running cluster, and
//! the accounting of leader and membership changes. Each stops when the
//! node's stop signal is raised.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::watch;

use crate::api::AppState;
use crate::raft::NodeId;

/// openraft 0.9.25 can repeat split votes; if no leader shows up within a
/// few election timeouts, start an election ourselves (with jitter, so two
/// watchdogs do not collide again).
pub(super) async fn watchdog(
    state: Arc<AppState>,
    config: Arc<openraft::Config>,
    mut stop: watch::Receiver<bool>,
) {
    let bound = Duration::from_millis(config.election_timeout_max * 3);
    let mut leaderless_since: Option<Instant> = None;
    loop {
        let pause = Duration::from_millis(config.heartbeat_interval + rand::random::<u64>() % 100);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let m = state.leadership.raft.metrics().borrow().clone();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == state.leadership.id);
        let view = state.leadership.leader_view();
        if view.live || !voter || m.state == ServerState::Leader {
            leaderless_since = None;
            continue;
        }
        let since = *leaderless_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= bound {
            tracing::warn!(
                term = m.current_term,
                "no leader for {:?}; triggering an election",
                since.elapsed()
            );
            let _ = state.leadership.raft.trigger().elect().await;
            leaderless_since = Some(Instant::now());
        }
    }
}

/// Asks a running cluster to add this node, until it says yes. An already
/// added node is answered at once ("no change"), so restarting with the same
/// `--join` is harmless.
pub(super) async fn join(state: Arc<AppState>, url: String, advertise: String, voter: bool) {
    let url = format!("{}/cluster/nodes", url.trim_end_matches('/'));
    let body = serde_json::json!({"id": state.leadership.id, "addr": advertise, "voter": voter});
    let mut attempt: u32 = 0;
    loop {
        let req = state
            .leadership
            .net
            .post(&url)
            .json(&body)
            .timeout(Duration::from_secs(90));
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(%url, "joined the cluster");
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                tracing::error!(%url, %status, %text, "the cluster refused to add this node; not retrying");
                return;
            }
            Ok(r) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(%url, status = %r.status(), "could not join yet; retrying");
                }
            }
            Err(e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(%url, error = %e, "could not reach the cluster to join; retrying");
                }
            }
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Counts and logs every change of leader this node sees.
pub(super) async fn leader_changes(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut metrics = state.leadership.raft.metrics();
    let mut last: Option<NodeId> = None;
    let mut members: BTreeSet<NodeId> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
        let (leader, term, voters) = {
            let m = metrics.borrow();
            (
                m.current_leader,
                m.current_term,
                m.membership_config
                    .membership()
                    .voter_ids()
                    .collect::<BTreeSet<_>>(),
            )
        };
        if leader != last {
            if leader.is_some() {
                state.metrics.leader_changes.inc();
            }
            tracing::info!(?leader, term, "leader changed");
            last = leader;
        }
        if voters != members {
            tracing::info!(?voters, "membership changed");
            members = voters;
        }
    }
}
