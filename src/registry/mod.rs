//! The registry state machine: what a service entry is, the commands that
//! change entries, and how each command is applied.
//!
//! This module owns the data model and its rules and nothing else: no I/O, no
//! clock, no Raft. Every command carries the time the leader stamped into it
//! (`now_ms`), so applying the same log on any node gives the same state.
//! Every command is an idempotent upsert or delete: applying a retried
//! command a second time leaves the registry as the first did.

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
    /// Renew one instance, or every instance of the service when
    /// `instance_id` is `None`.
    Heartbeat {
        service_name: String,
        instance_id: Option<String>,
        now_ms: Millis,
    },
    /// Remove one instance, or the whole service when `instance_id` is `None`.
    Deregister {
        service_name: String,
        instance_id: Option<String>,
    },
    /// Remove the listed instances whose deadline is at or before `now_ms`.
    /// Apply checks the deadline again, so an expiry that arrives after a
    /// renewal removes nothing.
    Expire {
        now_ms: Millis,
        instances: Vec<(String, String)>,
    },
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
}

/// The whole registry: service name → instance id → instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    services: BTreeMap<String, BTreeMap<String, Instance>>,
}

/// A key change made by `apply`, so a persistent copy can follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Instance),
    Delete {
        service_name: String,
        instance_id: String,
    },
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `cmd`, reporting every changed key through `changes`.
    pub fn apply(&mut self, cmd: &Command, changes: &mut Vec<Change>) -> CommandResult {
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
            Command::Heartbeat {
                service_name,
                instance_id,
                now_ms,
            } => {
                let Some(instances) = self.services.get_mut(service_name) else {
                    return CommandResult::NotFound;
                };
                let mut touched = 0;
                for inst in instances.values_mut() {
                    if instance_id
                        .as_ref()
                        .is_some_and(|id| *id != inst.instance_id)
                    {
                        continue;
                    }
                    touched += 1;
                    if *now_ms > inst.last_heartbeat {
                        inst.last_heartbeat = *now_ms;
                        changes.push(Change::Put(inst.clone()));
                    }
                }
                if touched == 0 {
                    CommandResult::NotFound
                } else {
                    CommandResult::Touched(touched)
                }
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
            Command::Expire { now_ms, instances } => {
                let mut n = 0;
                for (service, id) in instances {
                    let due = self
                        .get_instance(service, id)
                        .is_some_and(|i| i.deadline() <= *now_ms);
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

    /// Every instance whose deadline is at or before `now_ms`, as
    /// `(service, instance id)` pairs.
    pub fn expired(&self, now_ms: Millis) -> Vec<(String, String)> {
        self.instances()
            .filter(|i| i.deadline() <= now_ms)
            .map(|i| (i.service_name.clone(), i.instance_id.clone()))
            .collect()
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
        r.apply(&c, &mut Vec::new())
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

    #[test]
    fn heartbeat_of_unknown_is_not_found_and_never_moves_time_back() {
        let mut r = Registry::new();
        let hb = |id: Option<&str>, t| Command::Heartbeat {
            service_name: "a".into(),
            instance_id: id.map(Into::into),
            now_ms: t,
        };
        assert_eq!(apply(&mut r, hb(None, 1)), CommandResult::NotFound);
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 1000),
            },
        );
        assert_eq!(apply(&mut r, hb(Some("2"), 2000)), CommandResult::NotFound);
        assert_eq!(apply(&mut r, hb(None, 3000)), CommandResult::Touched(1));
        assert_eq!(apply(&mut r, hb(None, 2000)), CommandResult::Touched(1));
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
    fn expire_rechecks_the_deadline_at_apply() {
        let mut r = Registry::new();
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 0),
            },
        );
        // The leader saw it expired at t=10s, but a renewal got in first.
        let due = r.expired(10_000);
        assert_eq!(due, vec![("a".to_string(), "1".to_string())]);
        apply(
            &mut r,
            Command::Heartbeat {
                service_name: "a".into(),
                instance_id: None,
                now_ms: 9_000,
            },
        );
        let expire = Command::Expire {
            now_ms: 10_000,
            instances: due,
        };
        assert_eq!(apply(&mut r, expire.clone()), CommandResult::Expired(0));
        assert_eq!(r.instance_count(), 1);
        let later = Command::Expire {
            now_ms: 19_000,
            instances: vec![("a".into(), "1".into())],
        };
        assert_eq!(apply(&mut r, later), CommandResult::Expired(1));
        assert_eq!(r.service_count(), 0);
    }
}
