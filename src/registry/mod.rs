//! The registry state machine: what a service entry is, the commands that
//! change entries, and how each command is applied.
//!
//! This module owns the data model and its rules and nothing else: no I/O, no
//! clock, no Raft. Every command carries the time the leader stamped into it,
//! so applying the same log on any node gives the same state. The lease
//! rules (when a heartbeat needs a write, when an instance is due, when
//! expiry pauses) are in [`lease`].
//! Every command is an idempotent upsert or delete: applying a retried
//! command a second time leaves the registry as the first did.

pub mod lease;
pub mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use validate::{parse_heartbeat, parse_register, HeartbeatRequest, RegisterRequest};

/// Milliseconds since the Unix epoch, as stamped by the leader.
pub type Millis = i64;

/// One registered instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service_name: String,
    pub instance_id: String,
    pub host: String,
    pub port: u16,
    pub health_endpoint: String,
    pub metadata: BTreeMap<String, String>,
    pub ttl_seconds: u32,
    pub registered_at: Millis,
    pub last_heartbeat: Millis,
}

impl Instance {
    /// The moment after which this instance may be expired.
    pub fn deadline(&self) -> Millis {
        self.last_heartbeat
            .saturating_add(i64::from(self.ttl_seconds) * 1000)
    }
}

/// A change to the registry, as it travels through the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Insert or replace an instance. A re-registration of the same
    /// `instance_id` keeps the original `registered_at`.
    Register { instance: Instance },
    /// A checkpoint of renewals the leader acknowledged: raises each listed
    /// instance's `last_heartbeat` to the given time (never lowers it).
    /// Instances that are gone by now are skipped.
    Renew { renewals: Vec<Renewal> },
    /// Remove one instance, or the whole service when `instance_id` is `None`.
    Deregister {
        service_name: String,
        instance_id: Option<String>,
    },
    /// Remove the listed instances that are due at `now_ms` (see
    /// [`lease::is_due`]). Apply checks each deadline again, so an expiry
    /// that arrives after a renewal removes nothing; and one stamped with a
    /// term other than its entry's (a deposed leader's) removes nothing.
    Expire {
        now_ms: Millis,
        term: u64,
        instances: Vec<(String, String)>,
    },
    /// The leader paused or resumed expiry (mass-expiry protection); kept
    /// in the replicated state so every node reports it.
    SetExpiryPaused { paused: bool },
    /// Client writes that arrived together, committed in one entry (group
    /// commit, see `crate::writes`) and applied in order, each with its
    /// own result. Added last so older entries decode unchanged.
    Batch { commands: Vec<Command> },
}

/// One acknowledged renewal: the instance and the leader's time of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub service_name: String,
    pub instance_id: String,
    pub at: Millis,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The stored instance after a register.
    Registered(Instance),
    /// How many instances a heartbeat or deregister touched.
    Touched(usize),
    /// The service (or the named instance) is not registered.
    NotFound,
    /// How many instances an expiry removed.
    Expired(usize),
    /// A Raft-internal entry (blank or membership) that carries no command.
    None,
    /// The result of each command of a `Batch`, in order.
    Batch(Vec<CommandResult>),
}

/// The whole registry: service name → instance id → instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    services: BTreeMap<String, BTreeMap<String, Instance>>,
    expiry_paused: bool,
}

/// A key change made by `apply`, so a persistent copy can follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Instance),
    Delete {
        service_name: String,
        instance_id: String,
    },
    ExpiryPaused(bool),
}

impl Change {
    /// The service a change touches, if it touches one.
    pub fn service_name(&self) -> Option<&str> {
        match self {
            Self::Put(i) => Some(&i.service_name),
            Self::Delete { service_name, .. } => Some(service_name),
            Self::ExpiryPaused(_) => None,
        }
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `cmd`, found in a log entry of `entry_term`, reporting every
    /// changed key through `changes`.
    pub fn apply(
        &mut self,
        cmd: &Command,
        entry_term: u64,
        changes: &mut Vec<Change>,
    ) -> CommandResult {
        match cmd {
            Command::Register { instance } => {
                let mut stored = instance.clone();
                let instances = self
                    .services
                    .entry(instance.service_name.clone())
                    .or_default();
                if let Some(old) = instances.get(&instance.instance_id) {
                    stored.registered_at = old.registered_at;
                    stored.last_heartbeat = stored.last_heartbeat.max(old.last_heartbeat);
                }
                instances.insert(stored.instance_id.clone(), stored.clone());
                changes.push(Change::Put(stored.clone()));
                CommandResult::Registered(stored)
            }
            Command::Renew { renewals } => {
                let mut touched = 0;
                for r in renewals {
                    let Some(inst) = self
                        .services
                        .get_mut(&r.service_name)
                        .and_then(|m| m.get_mut(&r.instance_id))
                    else {
                        continue;
                    };
                    touched += 1;
                    if r.at > inst.last_heartbeat {
                        inst.last_heartbeat = r.at;
                        changes.push(Change::Put(inst.clone()));
                    }
                }
                CommandResult::Touched(touched)
            }
            Command::Deregister {
                service_name,
                instance_id,
            } => {
                let removed: Vec<Instance> = match instance_id {
                    None => self
                        .services
                        .remove(service_name)
                        .map(|m| m.into_values().collect())
                        .unwrap_or_default(),
                    Some(id) => self.remove_instance(service_name, id).into_iter().collect(),
                };
                if removed.is_empty() {
                    return CommandResult::NotFound;
                }
                let n = removed.len();
                changes.extend(removed.into_iter().map(|i| Change::Delete {
                    service_name: i.service_name,
                    instance_id: i.instance_id,
                }));
                CommandResult::Touched(n)
            }
            Command::Expire {
                now_ms,
                term,
                instances,
            } => {
                if *term != entry_term {
                    return CommandResult::Expired(0);
                }
                let mut n = 0;
                for (service, id) in instances {
                    let due = self
                        .get_instance(service, id)
                        .is_some_and(|i| lease::is_due(i, *now_ms));
                    if due && self.remove_instance(service, id).is_some() {
                        n += 1;
                        changes.push(Change::Delete {
                            service_name: service.clone(),
                            instance_id: id.clone(),
                        });
                    }
                }
                CommandResult::Expired(n)
            }
            Command::SetExpiryPaused { paused } => {
                if self.expiry_paused != *paused {
                    self.expiry_paused = *paused;
                    changes.push(Change::ExpiryPaused(*paused));
                }
                CommandResult::None
            }
            Command::Batch { commands } => CommandResult::Batch(
                commands
                    .iter()
                    .map(|c| self.apply(c, entry_term, changes))
                    .collect(),
            ),
        }
    }

    fn remove_instance(&mut self, service: &str, id: &str) -> Option<Instance> {
        let instances = self.services.get_mut(service)?;
        let removed = instances.remove(id);
        if instances.is_empty() {
            self.services.remove(service);
        }
        removed
    }

    /// Inserts an instance as loaded from disk or a snapshot.
    pub fn restore(&mut self, instance: Instance) {
        self.services
            .entry(instance.service_name.clone())
            .or_default()
            .insert(instance.instance_id.clone(), instance);
    }

    pub fn get_instance(&self, service: &str, id: &str) -> Option<&Instance> {
        self.services.get(service)?.get(id)
    }

    /// The instances of `service`, ordered by instance id.
    pub fn service(&self, service: &str) -> Option<impl Iterator<Item = &Instance>> {
        self.services.get(service).map(|m| m.values())
    }

    /// Service names in sorted order.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn instance_count(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum()
    }

    /// Every instance due for expiry at `now_ms`, as `(service, instance id)`.
    pub fn due(&self, now_ms: Millis) -> Vec<(String, String)> {
        self.instances()
            .filter(|i| lease::is_due(i, now_ms))
            .map(|i| (i.service_name.clone(), i.instance_id.clone()))
            .collect()
    }

    /// Whether the leader has paused expiry (mass-expiry protection).
    pub fn expiry_paused(&self) -> bool {
        self.expiry_paused
    }

    /// Sets the paused flag as loaded from disk or a snapshot.
    pub fn restore_expiry_paused(&mut self, paused: bool) {
        self.expiry_paused = paused;
    }

    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services.values().flat_map(BTreeMap::values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(service: &str, id: &str, t: Millis) -> Instance {
        Instance {
            service_name: service.into(),
            instance_id: id.into(),
            host: "10.0.0.1".into(),
            port: 80,
            health_endpoint: "/health".into(),
            metadata: BTreeMap::new(),
            ttl_seconds: 10,
            registered_at: t,
            last_heartbeat: t,
        }
    }

    fn apply(r: &mut Registry, c: Command) -> CommandResult {
        r.apply(&c, 1, &mut Vec::new())
    }

    #[test]
    fn register_is_an_idempotent_upsert() {
        let mut r = Registry::new();
        let c = Command::Register {
            instance: inst("a", "1", 1000),
        };
        apply(&mut r, c.clone());
        let once = r.clone();
        apply(&mut r, c);
        assert_eq!(r, once);
        // A later registration keeps registered_at, moves last_heartbeat.
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 5000),
            },
        );
        let i = r.get_instance("a", "1").unwrap();
        assert_eq!((i.registered_at, i.last_heartbeat), (1000, 5000));
    }

    fn renew(id: &str, at: Millis) -> Command {
        Command::Renew {
            renewals: vec![Renewal {
                service_name: "a".into(),
                instance_id: id.into(),
                at,
            }],
        }
    }

    #[test]
    fn renew_skips_the_unknown_and_never_moves_time_back() {
        let mut r = Registry::new();
        assert_eq!(apply(&mut r, renew("1", 5)), CommandResult::Touched(0));
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 1000),
            },
        );
        assert_eq!(apply(&mut r, renew("2", 2000)), CommandResult::Touched(0));
        assert_eq!(apply(&mut r, renew("1", 3000)), CommandResult::Touched(1));
        assert_eq!(apply(&mut r, renew("1", 2000)), CommandResult::Touched(1));
        assert_eq!(r.get_instance("a", "1").unwrap().last_heartbeat, 3000);
    }

    #[test]
    fn deregister_removes_instance_or_service() {
        let mut r = Registry::new();
        for id in ["1", "2", "3"] {
            apply(
                &mut r,
                Command::Register {
                    instance: inst("a", id, 0),
                },
            );
        }
        let dereg = |id: Option<&str>| Command::Deregister {
            service_name: "a".into(),
            instance_id: id.map(Into::into),
        };
        assert_eq!(apply(&mut r, dereg(Some("1"))), CommandResult::Touched(1));
        assert_eq!(apply(&mut r, dereg(Some("1"))), CommandResult::NotFound);
        assert_eq!(apply(&mut r, dereg(None)), CommandResult::Touched(2));
        assert_eq!(r.service_count(), 0);
        assert_eq!(apply(&mut r, dereg(None)), CommandResult::NotFound);
    }

    #[test]
    fn an_expiry_applied_after_a_renewal_is_a_no_op() {
        let mut r = Registry::new();
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 0),
            },
        );
        // ttl 10 s: due from 12 s on (ttl + expiry slack).
        let now = 10_000 + lease::EXPIRY_SLACK_MS;
        let due = r.due(now);
        assert_eq!(due, vec![("a".to_string(), "1".to_string())]);
        // A renewal commits between the leader's decision and the expiry.
        apply(&mut r, renew("1", 9_000));
        let expire = Command::Expire {
            now_ms: now,
            term: 1,
            instances: due,
        };
        assert_eq!(apply(&mut r, expire), CommandResult::Expired(0));
        assert_eq!(r.instance_count(), 1);
        let later = Command::Expire {
            now_ms: 19_000 + lease::EXPIRY_SLACK_MS,
            term: 1,
            instances: vec![("a".into(), "1".into())],
        };
        assert_eq!(apply(&mut r, later), CommandResult::Expired(1));
        assert_eq!(r.service_count(), 0);
    }

    #[test]
    fn a_deposed_leaders_expiry_removes_nothing() {
        let mut r = Registry::new();
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 0),
            },
        );
        // Stamped by the leader of term 3, found in an entry of term 4.
        let stale = Command::Expire {
            now_ms: 1_000_000,
            term: 3,
            instances: vec![("a".into(), "1".into())],
        };
        assert_eq!(
            r.apply(&stale, 4, &mut Vec::new()),
            CommandResult::Expired(0)
        );
        assert_eq!(r.instance_count(), 1);
        assert_eq!(
            r.apply(&stale, 3, &mut Vec::new()),
            CommandResult::Expired(1)
        );
    }

    #[test]
    fn the_paused_flag_is_replicated_state() {
        let mut r = Registry::new();
        let mut changes = Vec::new();
        r.apply(&Command::SetExpiryPaused { paused: true }, 1, &mut changes);
        assert!(r.expiry_paused());
        assert_eq!(changes, vec![Change::ExpiryPaused(true)]);
    }
}
