//! From the node's flags to the settings of its parts: openraft's
//! configuration, the API's request limits, the leader's expiry settings,
//! and the voters a new cluster bootstraps with. Checks that span flags
//! (a token file needs a cluster secret) are made here, before anything
//! is opened.

use std::collections::BTreeMap;
use std::time::Duration;

use super::StartError;
use crate::api;
use crate::config::NodeArgs;
use crate::raft::NodeId;

/// Builds openraft's configuration from the node's flags.
pub fn raft_config(args: &NodeArgs) -> Result<openraft::Config, StartError> {
    let config = openraft::Config {
        cluster_name: "vertice-register".into(),
        heartbeat_interval: args.heartbeat_ms,
        election_timeout_min: args.election_timeout_ms,
        election_timeout_max: args.election_timeout_ms * 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(args.snapshot_threshold),
        max_in_snapshot_log_to_keep: (args.snapshot_threshold / 10).min(1000),
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))
}

/// The request limits of the public API, from the node's flags.
pub(super) fn limits(args: &NodeArgs) -> api::LimitConfig {
    api::LimitConfig {
        per_ip: args.rate_limit_per_ip,
        per_token: args.rate_limit_per_token,
        read_timeout: Duration::from_millis(args.read_timeout_ms),
    }
}

/// The leader's expiry settings, from the node's flags.
pub(super) fn expiry(args: &NodeArgs) -> crate::leader::leases::ExpiryConfig {
    crate::leader::leases::ExpiryConfig {
        protection: crate::registry::lease::Protection {
            threshold: args.expiry_pause_threshold,
            min_instances: args.expiry_pause_min_instances,
        },
        window: Duration::from_secs(args.expiry_window_secs),
        pause_max: Duration::from_secs(args.expiry_pause_max_secs),
        tombstones: crate::registry::TombstonePolicy {
            retention_ms: i64::try_from(args.tombstone_retention_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            max: if args.tombstone_retention_secs == 0 {
                0
            } else {
                args.max_tombstones
            },
        },
        broken_leases: args.test_broken_leases,
    }
}

/// The voters this node bootstraps with: `--peers`, or itself alone.
pub(super) fn initial_members(args: &NodeArgs) -> Result<BTreeMap<NodeId, String>, StartError> {
    let peers = match &args.peers {
        Some(p) => p.0.clone(),
        None => BTreeMap::from([(args.id, args.advertise().to_string())]),
    };
    if args.tokens.is_some() && args.cluster_secret.is_none() && !args.insecure {
        return Err(StartError::Config(
            "--tokens needs --cluster-secret too: without one the node-to-node /raft/* routes are open, which bypasses the tokens (or pass --insecure)"
                .into(),
        ));
    }
    if args.join.is_some() {
        // A joining node starts empty and is added by the running cluster.
        return Ok(BTreeMap::new());
    }
    if !peers.contains_key(&args.id) {
        return Err(StartError::Config(format!(
            "--peers does not list this node's id {}",
            args.id
        )));
    }
    if peers.len() > 1 && args.cluster_secret.is_none() && !args.insecure {
        return Err(StartError::Config(
            "a cluster of more than one voter needs --cluster-secret (or --insecure to run without one)"
                .into(),
        ));
    }
    Ok(peers)
}
