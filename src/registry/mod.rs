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

mod builder;
mod command;
mod instance;
pub mod lease;
mod metadata;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use builder::RegistryBuilder;
pub use command::{Change, Command, CommandResult, Renewal};
pub use instance::{Instance, InstanceExt, Millis, Tombstone, TombstonePolicy};
pub use metadata::Metadata;
pub use validate::{
    parse_heartbeat, parse_register, parse_register_with, HeartbeatRequest, RegisterRequest,
};

/// What a heartbeat renews or revives (see [`Registry::heartbeat_targets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatTargets {
    /// Live instances: `(instance id, until when a heartbeat is acknowledged
    /// without a write)` (see [`lease::ack_until`]).
    Live(Vec<(String, Millis)>),
    /// Expired instances whose tombstones a heartbeat may revive.
    Expired(Vec<String>),
    Nothing,
}

/// An entry of the deadline index: `(deadline, "service\0id")`.
fn deadline_key(deadline: Millis, service: &str, id: &str) -> (Millis, Box<str>) {
    let mut names = String::with_capacity(service.len() + 1 + id.len());
    names.push_str(service);
    names.push('\0');
    names.push_str(id);
    (deadline, names.into_boxed_str())
}

/// One service's live instances, by instance id.
type Instances = BTreeMap<String, Arc<Live>>;

/// A live instance and what is kept beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Live {
    instance: Instance,
    ext: InstanceExt,
}

/// The whole registry: service name → instance id → instance, and the
/// tombstones of expired instances the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// Each service's instances behind an `Arc`, and each instance too,
    /// copied on write: a snapshot takes the map of `Arc`s under the lock
    /// (a pointer per service) and encodes outside it
    /// ([`Registry::for_snapshot`]); a service written meanwhile has its map
    /// of pointers copied, and an instance written meanwhile itself. A
    /// B-tree slot holds a pointer rather than the whole entry, as slots
    /// run half empty after in-order inserts (a loaded registry).
    services: BTreeMap<String, Arc<Instances>>,
    /// Every live instance by its deadline, so that an expiry round reads
    /// the due instances only, not the whole registry. Derived from
    /// `services`: every change to a live instance goes through
    /// [`Registry::insert_live`], [`Registry::renew_live`] or
    /// [`Registry::remove_instance`], which keep the two in step.
    /// Each entry is the deadline and `service\0id` in one allocation
    /// ([`deadline_key`]; names never hold a NUL, so the order is that of
    /// `(service, id)`).
    deadlines: BTreeSet<(Millis, Box<str>)>,
    expiry_paused: bool,
    tombstones: BTreeMap<String, BTreeMap<String, Tombstone>>,
    /// Restored from a backup, and no leader has restarted the instances'
    /// clocks yet ([`Command::RestartClocks`]): expiry waits until one has.
    clocks_pending: bool,
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
            Command::Register { instance } => self.register(instance, None, changes),
            Command::RegisterFrom { instance, ext } => self.register(instance, Some(ext), changes),
            Command::Renew { renewals } => {
                let mut touched = 0;
                for r in renewals {
                    let Some(live) = self
                        .services
                        .get_mut(&r.service_name)
                        .and_then(|m| Arc::make_mut(m).get_mut(&r.instance_id))
                        .map(Arc::make_mut)
                    else {
                        continue;
                    };
                    touched += 1;
                    if r.at > live.instance.last_heartbeat {
                        let was = live.instance.deadline();
                        live.instance.last_heartbeat = r.at;
                        changes.push(Change::Put(live.instance.clone()));
                        let now_due = live.instance.deadline();
                        Self::move_deadline(
                            &mut self.deadlines,
                            &r.service_name,
                            &r.instance_id,
                            was,
                            now_due,
                        );
                    }
                }
                CommandResult::Touched(touched)
            }
            Command::Deregister {
                service_name,
                instance_id,
            } => self.deregister(service_name, instance_id.as_deref(), None, changes),
            Command::DeregisterFrom {
                service_name,
                instance_id,
                origin,
            } => self.deregister(
                service_name,
                instance_id.as_deref(),
                origin.as_deref(),
                changes,
            ),
            Command::Expire {
                now_ms,
                term,
                instances,
            } => self.expire(
                (*now_ms, *term, entry_term),
                instances,
                None,
                lease::LEGACY_EXPIRY_SLACK_MS,
                changes,
            ),
            Command::ExpireKeep {
                now_ms,
                term,
                instances,
                keep,
            } => self.expire(
                (*now_ms, *term, entry_term),
                instances,
                Some(keep),
                lease::LEGACY_EXPIRY_SLACK_MS,
                changes,
            ),
            Command::ExpireAfter {
                now_ms,
                term,
                instances,
                keep,
                margin_ms,
            } => self.expire(
                (*now_ms, *term, entry_term),
                instances,
                Some(keep),
                *margin_ms,
                changes,
            ),
            Command::Revive {
                service_name,
                instance_ids,
                at,
                retention_ms,
            } => {
                let mut revived = Vec::new();
                for id in instance_ids {
                    let fresh = self
                        .tombstone(service_name, id)
                        .is_some_and(|t| at.saturating_sub(t.expired_at) <= *retention_ms);
                    if !fresh || self.get_instance(service_name, id).is_some() {
                        continue;
                    }
                    let Some(t) = self.unbury(service_name, id, changes) else {
                        continue;
                    };
                    let mut instance = t.instance;
                    instance.registered_at = *at;
                    instance.last_heartbeat = *at;
                    self.put(instance, t.ext, changes);
                    revived.push(id.clone());
                }
                if revived.is_empty() {
                    CommandResult::NotFound
                } else {
                    CommandResult::Revived(revived)
                }
            }
            Command::SetExpiryPaused { paused } => {
                if self.expiry_paused != *paused {
                    self.expiry_paused = *paused;
                    changes.push(Change::ExpiryPaused(*paused));
                }
                CommandResult::None
            }
            Command::RestartClocks { at } => {
                let mut touched = 0;
                for (service, instances) in &mut self.services {
                    // Copied (if a snapshot shares it) only when it changes.
                    if instances.values().all(|l| l.instance.last_heartbeat >= *at) {
                        continue;
                    }
                    for (id, live) in Arc::make_mut(instances).iter_mut() {
                        if *at > live.instance.last_heartbeat {
                            let live = Arc::make_mut(live);
                            let was = live.instance.deadline();
                            live.instance.last_heartbeat = *at;
                            changes.push(Change::Put(live.instance.clone()));
                            let now_due = live.instance.deadline();
                            Self::move_deadline(&mut self.deadlines, service, id, was, now_due);
                            touched += 1;
                        }
                    }
                }
                if self.clocks_pending {
                    self.clocks_pending = false;
                    changes.push(Change::ClocksPending(false));
                }
                CommandResult::Touched(touched)
            }
            Command::Batch { commands } => CommandResult::Batch(
                commands
                    .iter()
                    .map(|c| self.apply(c, entry_term, changes))
                    .collect(),
            ),
        }
    }

    /// Inserts or replaces a registration; `ext` `None` (a `Register` of an
    /// earlier release) keeps what was known beside the instance.
    fn register(
        &mut self,
        instance: &Instance,
        ext: Option<&InstanceExt>,
        changes: &mut Vec<Change>,
    ) -> CommandResult {
        let mut stored = instance.clone();
        let mut kept = InstanceExt::default();
        if let Some(old) = self.live(&instance.service_name, &instance.instance_id) {
            stored.registered_at = old.instance.registered_at;
            stored.last_heartbeat = stored.last_heartbeat.max(old.instance.last_heartbeat);
            kept = old.ext.clone();
        }
        let ext = ext.cloned().unwrap_or(kept);
        self.unbury(&instance.service_name, &instance.instance_id, changes);
        self.put(stored.clone(), ext, changes);
        CommandResult::Registered(stored)
    }

    fn put(&mut self, instance: Instance, ext: InstanceExt, changes: &mut Vec<Change>) {
        changes.push(Change::Put(instance.clone()));
        changes.push(Change::Ext {
            service_name: instance.service_name.clone(),
            instance_id: instance.instance_id.clone(),
            ext: ext.clone(),
        });
        self.insert_live(instance, ext);
    }

    /// Stores a live instance (replacing one of the same id) and keeps the
    /// deadline index in step.
    fn insert_live(&mut self, instance: Instance, ext: InstanceExt) {
        let deadline = instance.deadline();
        let key = deadline_key(deadline, &instance.service_name, &instance.instance_id);
        // Looked up first: the service's name is copied only for a new one.
        let instances = match self.services.get_mut(&instance.service_name) {
            Some(instances) => Arc::make_mut(instances),
            None => Arc::make_mut(
                self.services
                    .entry(instance.service_name.clone())
                    .or_default(),
            ),
        };
        let old = instances.insert(
            instance.instance_id.clone(),
            Arc::new(Live { instance, ext }),
        );
        if let Some(old) = old {
            self.deadlines
                .remove(&(old.instance.deadline(), key.1.clone()));
        }
        self.deadlines.insert(key);
    }

    /// Moves an instance's entry in the deadline index.
    fn move_deadline(
        deadlines: &mut BTreeSet<(Millis, Box<str>)>,
        service: &str,
        id: &str,
        from: Millis,
        to: Millis,
    ) {
        if from != to {
            // The entry taken out gives its names back for the new one.
            let key = deadline_key(from, service, id);
            let (_, names) = deadlines.take(&key).unwrap_or(key);
            deadlines.insert((to, names));
        }
    }

    fn deregister(
        &mut self,
        service: &str,
        instance_id: Option<&str>,
        origin: Option<&str>,
        changes: &mut Vec<Change>,
    ) -> CommandResult {
        let ids: Vec<String> = match instance_id {
            Some(id) => vec![id.to_string()],
            None => {
                let mine = origin.map_or_else(Vec::new, |o| {
                    self.known_ids(service, |e| e.origin.as_deref() == Some(o))
                });
                if mine.is_empty() {
                    self.known_ids(service, |_| true)
                } else {
                    mine
                }
            }
        };
        let mut removed = 0;
        for id in &ids {
            self.unbury(service, id, changes);
            if self.remove_instance(service, id).is_some() {
                removed += 1;
                changes.push(Change::Delete {
                    service_name: service.to_string(),
                    instance_id: id.clone(),
                });
            }
        }
        if removed == 0 {
            CommandResult::NotFound
        } else {
            CommandResult::Touched(removed)
        }
    }

    /// The ids of `service`'s live and tombstoned instances whose
    /// [`InstanceExt`] passes `pick`, sorted, without repeats.
    fn known_ids(&self, service: &str, pick: impl Fn(&InstanceExt) -> bool) -> Vec<String> {
        let live = self
            .services
            .get(service)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, l)| pick(&l.ext))
            .map(|(id, _)| id);
        let dead = self
            .tombstones
            .get(service)
            .into_iter()
            .flatten()
            .filter(|(_, t)| pick(&t.ext))
            .map(|(id, _)| id);
        let ids: std::collections::BTreeSet<&String> = live.chain(dead).collect();
        ids.into_iter().cloned().collect()
    }

    /// `stamp`: the entry's `(now_ms, term)` and the term of the log entry
    /// that carries it.
    fn expire(
        &mut self,
        (now_ms, term, entry_term): (Millis, u64, u64),
        instances: &[(String, String)],
        keep: Option<&TombstonePolicy>,
        margin: Millis,
        changes: &mut Vec<Change>,
    ) -> CommandResult {
        if term != entry_term {
            return CommandResult::Expired(0);
        }
        let mut n = 0;
        for (service, id) in instances {
            let due = self
                .get_instance(service, id)
                .is_some_and(|i| lease::is_due(i, margin, now_ms));
            if !due {
                continue;
            }
            let Some(live) = self.remove_instance(service, id) else {
                continue;
            };
            n += 1;
            changes.push(Change::Delete {
                service_name: service.clone(),
                instance_id: id.clone(),
            });
            if keep.is_some_and(|k| k.max > 0) {
                let Live { instance, ext } = Arc::unwrap_or_clone(live);
                let t = Tombstone {
                    instance,
                    ext,
                    expired_at: now_ms,
                };
                changes.push(Change::Bury(t.clone()));
                self.tombstones
                    .entry(service.clone())
                    .or_default()
                    .insert(id.clone(), t);
            }
        }
        if let Some(k) = keep {
            self.prune_tombstones(now_ms, k, changes);
        }
        CommandResult::Expired(n)
    }

    /// Drops tombstones older than the retention window, then the oldest
    /// ones beyond the most kept (ties: by service, then instance id).
    fn prune_tombstones(
        &mut self,
        now_ms: Millis,
        keep: &TombstonePolicy,
        changes: &mut Vec<Change>,
    ) {
        if !self.needs_pruning(now_ms, keep) {
            return;
        }
        let mut all: Vec<(Millis, String, String)> = self
            .tombstones
            .iter()
            .flat_map(|(s, m)| {
                m.iter()
                    .map(move |(id, t)| (t.expired_at, s.clone(), id.clone()))
            })
            .collect();
        all.sort();
        let old = all
            .iter()
            .take_while(|(at, _, _)| now_ms.saturating_sub(*at) > keep.retention_ms)
            .count();
        let over = all.len().saturating_sub(keep.max as usize);
        for (_, service, id) in all.into_iter().take(old.max(over)) {
            self.unbury(&service, &id, changes);
        }
    }

    fn unbury(&mut self, service: &str, id: &str, changes: &mut Vec<Change>) -> Option<Tombstone> {
        let graves = self.tombstones.get_mut(service)?;
        let t = graves.remove(id)?;
        if graves.is_empty() {
            self.tombstones.remove(service);
        }
        changes.push(Change::Unbury {
            service_name: service.to_string(),
            instance_id: id.to_string(),
        });
        Some(t)
    }

    fn remove_instance(&mut self, service: &str, id: &str) -> Option<Arc<Live>> {
        let instances = Arc::make_mut(self.services.get_mut(service)?);
        let removed = instances.remove(id);
        if instances.is_empty() {
            self.services.remove(service);
        }
        if let Some(r) = &removed {
            self.deadlines
                .remove(&deadline_key(r.instance.deadline(), service, id));
        }
        removed
    }

    fn live(&self, service: &str, id: &str) -> Option<&Live> {
        self.services.get(service)?.get(id).map(|l| &**l)
    }

    /// Inserts an instance as loaded from disk or a snapshot.
    pub fn restore(&mut self, instance: Instance, ext: InstanceExt) {
        self.insert_live(instance, ext);
    }

    /// Sets what is kept beside a restored instance (loaded from disk).
    pub fn restore_ext(&mut self, service: &str, id: &str, ext: InstanceExt) {
        if let Some(live) = self
            .services
            .get_mut(service)
            .and_then(|m| Arc::make_mut(m).get_mut(id))
        {
            Arc::make_mut(live).ext = ext;
        }
    }

    /// Inserts a tombstone as loaded from disk or a snapshot.
    pub fn restore_tombstone(&mut self, t: Tombstone) {
        self.tombstones
            .entry(t.instance.service_name.clone())
            .or_default()
            .insert(t.instance.instance_id.clone(), t);
    }

    pub fn get_instance(&self, service: &str, id: &str) -> Option<&Instance> {
        self.live(service, id).map(|l| &l.instance)
    }

    /// What is kept beside a live instance.
    pub fn ext(&self, service: &str, id: &str) -> Option<&InstanceExt> {
        self.live(service, id).map(|l| &l.ext)
    }

    /// The instances of `service`, ordered by instance id.
    pub fn service(&self, service: &str) -> Option<impl Iterator<Item = &Instance>> {
        self.services
            .get(service)
            .map(|m| m.values().map(|l| &l.instance))
    }

    /// The instances of `service` with what is kept beside each, ordered by
    /// instance id.
    pub fn service_ext(
        &self,
        service: &str,
    ) -> Option<impl Iterator<Item = (&Instance, &InstanceExt)>> {
        self.services
            .get(service)
            .map(|m| m.values().map(|l| (&l.instance, &l.ext)))
    }

    /// What a heartbeat for `service` renews: the named instance, or, for
    /// a name-only heartbeat from `origin`, the instances registered from
    /// there, else every instance of the service (the old clients' way).
    /// A caller's own expired instances come before other callers' live
    /// ones, so that of two replicas the one that was cut off comes back
    /// instead of renewing the other. Expired ones count only while their
    /// tombstones are kept; the `Revive` command checks the retention.
    pub fn heartbeat_targets(
        &self,
        service: &str,
        instance_id: Option<&str>,
        origin: Option<&str>,
    ) -> HeartbeatTargets {
        // The named instance: one lookup each, live first.
        if let Some(id) = instance_id {
            return match (self.live(service, id), self.tombstone(service, id)) {
                (Some(l), _) => {
                    HeartbeatTargets::Live(vec![(id.to_string(), lease::ack_until(&l.instance))])
                }
                (None, Some(_)) => HeartbeatTargets::Expired(vec![id.to_string()]),
                (None, None) => HeartbeatTargets::Nothing,
            };
        }
        let live = |pick: &dyn Fn(&InstanceExt) -> bool| -> Vec<(String, Millis)> {
            self.service_ext(service)
                .into_iter()
                .flatten()
                .filter(|(_, e)| pick(e))
                .map(|(i, _)| (i.instance_id.clone(), lease::ack_until(i)))
                .collect()
        };
        let dead = |pick: &dyn Fn(&InstanceExt) -> bool| -> Vec<String> {
            self.service_tombstones(service)
                .filter(|t| pick(&t.ext))
                .map(|t| t.instance.instance_id.clone())
                .collect()
        };
        // Live ones that `pick` chooses, else expired ones (looked for only
        // when there are no live ones).
        let found = |pick: &dyn Fn(&InstanceExt) -> bool| {
            let l = live(pick);
            if !l.is_empty() {
                return Some(HeartbeatTargets::Live(l));
            }
            let d = dead(pick);
            (!d.is_empty()).then_some(HeartbeatTargets::Expired(d))
        };
        let mine = |e: &InstanceExt| origin.is_some() && e.origin.as_deref() == origin;
        let result = found(&mine).or_else(|| found(&|_| true));
        result.unwrap_or(HeartbeatTargets::Nothing)
    }

    /// The tombstone of an expired instance, if one is kept.
    pub fn tombstone(&self, service: &str, id: &str) -> Option<&Tombstone> {
        self.tombstones.get(service)?.get(id)
    }

    /// The tombstones of `service`, ordered by instance id.
    pub fn service_tombstones(&self, service: &str) -> impl Iterator<Item = &Tombstone> {
        self.tombstones
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Every tombstone, ordered by service and instance id.
    pub fn tombstones(&self) -> impl Iterator<Item = &Tombstone> {
        self.tombstones.values().flat_map(BTreeMap::values)
    }

    pub fn tombstone_count(&self) -> usize {
        self.tombstones.values().map(BTreeMap::len).sum()
    }

    /// Whether `keep` would drop any tombstone at `now_ms`: more than its
    /// most, or one older than its retention window.
    pub fn needs_pruning(&self, now_ms: Millis, keep: &TombstonePolicy) -> bool {
        self.tombstone_count() > keep.max as usize
            || self
                .tombstones()
                .any(|t| now_ms.saturating_sub(t.expired_at) > keep.retention_ms)
    }

    /// Service names in sorted order.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn instance_count(&self) -> usize {
        self.services.values().map(|m| m.len()).sum()
    }

    /// Every instance whose committed deadline is `margin` or more behind
    /// `now_ms`, as `(service, instance id)`. Most overdue first; reads the
    /// due instances only (a deadline index), so a round costs what expires,
    /// not the size of the registry.
    pub fn due(&self, now_ms: Millis, margin: Millis) -> Vec<(String, String)> {
        self.deadlines
            .iter()
            .take_while(|(deadline, _)| lease::deadline_passed(*deadline, margin, now_ms))
            .filter_map(|(_, names)| names.split_once('\0'))
            .map(|(service, id)| (service.to_string(), id.to_string()))
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

    /// Whether the registry was restored from a backup and its instances'
    /// clocks still wait for a leader to restart them.
    pub fn clocks_pending(&self) -> bool {
        self.clocks_pending
    }

    /// Sets the flag as loaded from disk or a snapshot, or for a restore.
    pub fn restore_clocks_pending(&mut self, pending: bool) {
        self.clocks_pending = pending;
    }

    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services
            .values()
            .flat_map(|m| m.values())
            .map(|l| &l.instance)
    }

    /// Every live instance with what is kept beside it.
    pub fn instances_ext(&self) -> impl Iterator<Item = (&Instance, &InstanceExt)> {
        self.services
            .values()
            .flat_map(|m| m.values())
            .map(|l| (&l.instance, &l.ext))
    }

    /// What a snapshot encodes, taken in a moment: the instances shared
    /// with this registry (a pointer per service; a later write copies the
    /// service it touches), the tombstones copied (they are bounded) and no
    /// deadline index. For encoding only: expiry and lookups by deadline do
    /// not work on it.
    pub fn for_snapshot(&self) -> Registry {
        Registry {
            services: self.services.clone(),
            deadlines: BTreeSet::new(),
            expiry_paused: self.expiry_paused,
            tombstones: self.tombstones.clone(),
            clocks_pending: self.clocks_pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance with a TTL of 10 s, registered and renewed at `t`.
    pub(super) fn inst(service: &str, id: &str, t: Millis) -> Instance {
        Instance {
            service_name: service.into(),
            instance_id: id.into(),
            host: "10.0.0.1".into(),
            port: 80,
            health_endpoint: "/health".into(),
            metadata: Default::default(),
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

    /// A restore's clock restart: every instance older than `at` gets it
    /// (and a deadline from it), none moves back, the flag clears, and
    /// nothing is due before the new deadlines.
    #[test]
    fn restarting_clocks_gives_every_instance_its_ttl_from_then() {
        let mut r = Registry::new();
        for (id, t) in [("1", 1_000), ("2", 50_000)] {
            apply(
                &mut r,
                Command::Register {
                    instance: inst("a", id, t),
                },
            );
        }
        r.restore_clocks_pending(true);
        assert_eq!(r.due(40_000, 0).len(), 1);
        let mut changes = Vec::new();
        let res = r.apply(&Command::RestartClocks { at: 30_000 }, 1, &mut changes);
        assert_eq!(res, CommandResult::Touched(1));
        assert!(!r.clocks_pending());
        assert!(changes.contains(&Change::ClocksPending(false)));
        assert_eq!(r.get_instance("a", "1").unwrap().last_heartbeat, 30_000);
        assert_eq!(r.get_instance("a", "2").unwrap().last_heartbeat, 50_000);
        assert!(r.due(39_999, 0).is_empty());
        assert_eq!(r.due(40_000, 0).len(), 1);
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
        let now = 10_000 + lease::LEGACY_EXPIRY_SLACK_MS;
        let due = r.due(now, lease::LEGACY_EXPIRY_SLACK_MS);
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
            now_ms: 19_000 + lease::LEGACY_EXPIRY_SLACK_MS,
            term: 1,
            instances: vec![("a".into(), "1".into())],
        };
        assert_eq!(apply(&mut r, later), CommandResult::Expired(1));
        assert_eq!(r.service_count(), 0);
    }

    #[test]
    fn expire_after_judges_with_the_margin_the_leader_stamped() {
        let mut r = Registry::new();
        apply(
            &mut r,
            Command::Register {
                instance: inst("a", "1", 0),
            },
        );
        let expire = |now_ms, margin_ms| Command::ExpireAfter {
            now_ms,
            term: 1,
            instances: vec![("a".into(), "1".into())],
            keep: TombstonePolicy {
                retention_ms: 60_000,
                max: 10,
            },
            margin_ms,
        };
        // ttl 10 s, margin 1 s: not at 10.999 s, at 11 s.
        assert_eq!(
            apply(&mut r, expire(10_999, 1_000)),
            CommandResult::Expired(0)
        );
        assert_eq!(
            apply(&mut r, expire(11_000, 1_000)),
            CommandResult::Expired(1)
        );
        assert_eq!(r.tombstone_count(), 1);
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
    fn from(service: &str, id: &str, t: Millis, origin: &str) -> Command {
        Command::RegisterFrom {
            instance: inst(service, id, t),
            ext: InstanceExt {
                origin: Some(origin.into()),
                https: false,
            },
        }
    }

    fn expire_keep(
        now_ms: Millis,
        keys: &[(&str, &str)],
        retention_ms: Millis,
        max: u32,
    ) -> Command {
        Command::ExpireKeep {
            now_ms,
            term: 1,
            instances: keys
                .iter()
                .map(|(s, i)| (s.to_string(), i.to_string()))
                .collect(),
            keep: TombstonePolicy { retention_ms, max },
        }
    }

    fn revive(id: &str, at: Millis, retention_ms: Millis) -> Command {
        Command::Revive {
            service_name: "a".into(),
            instance_ids: vec![id.into()],
            at,
            retention_ms,
        }
    }

    /// Due from ttl (10 s) + slack after its last heartbeat.
    const DUE: Millis = 10_000 + lease::LEGACY_EXPIRY_SLACK_MS;

    #[test]
    fn name_only_calls_touch_the_callers_own_instances() {
        let mut r = Registry::new();
        apply(&mut r, from("a", "x", 0, "10.0.0.1"));
        apply(&mut r, from("a", "y", 0, "10.0.0.2"));
        let ids = |t: HeartbeatTargets| match t {
            HeartbeatTargets::Live(v) => v.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ids(r.heartbeat_targets("a", None, Some("10.0.0.1"))), ["x"]);
        // An address with no instance of its own: all of them (old behaviour).
        assert_eq!(
            ids(r.heartbeat_targets("a", None, Some("10.0.0.9"))),
            ["x", "y"]
        );
        assert_eq!(ids(r.heartbeat_targets("a", None, None)), ["x", "y"]);
        let dereg = |origin: &str| Command::DeregisterFrom {
            service_name: "a".into(),
            instance_id: None,
            origin: Some(origin.into()),
        };
        assert_eq!(apply(&mut r, dereg("10.0.0.2")), CommandResult::Touched(1));
        assert!(r.get_instance("a", "x").is_some());
        assert_eq!(r.ext("a", "x").unwrap().origin.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn a_heartbeat_revives_an_expired_instance_within_the_window_only() {
        let mut r = Registry::new();
        apply(&mut r, from("a", "x", 0, "10.0.0.1"));
        apply(&mut r, from("a", "y", 0, "10.0.0.2"));
        apply(&mut r, renew("y", 5_000));
        assert_eq!(
            apply(&mut r, expire_keep(DUE, &[("a", "x")], 60_000, 10)),
            CommandResult::Expired(1)
        );
        assert_eq!(r.tombstone_count(), 1);
        // The cut-off replica's heartbeat finds its own tombstone first,
        // not the other replica's live instance.
        assert_eq!(
            r.heartbeat_targets("a", None, Some("10.0.0.1")),
            HeartbeatTargets::Expired(vec!["x".into()])
        );
        // Past the window: nothing comes back.
        let late = DUE + 60_001;
        assert_eq!(
            apply(&mut r, revive("x", late, 60_000)),
            CommandResult::NotFound
        );
        let at = DUE + 60_000;
        assert_eq!(
            apply(&mut r, revive("x", at, 60_000)),
            CommandResult::Revived(vec!["x".into()])
        );
        let x = r.get_instance("a", "x").unwrap();
        assert_eq!((x.registered_at, x.last_heartbeat, x.port), (at, at, 80));
        assert_eq!(r.ext("a", "x").unwrap().origin.as_deref(), Some("10.0.0.1"));
        assert_eq!(r.tombstone_count(), 0);
        // A second revival finds no tombstone.
        assert_eq!(
            apply(&mut r, revive("x", at, 60_000)),
            CommandResult::NotFound
        );
    }

    #[test]
    fn deregistration_and_registration_remove_tombstones() {
        let mut r = Registry::new();
        for id in ["x", "y"] {
            apply(&mut r, from("a", id, 0, "10.0.0.1"));
        }
        apply(
            &mut r,
            expire_keep(DUE, &[("a", "x"), ("a", "y")], 60_000, 10),
        );
        assert_eq!(r.tombstone_count(), 2);
        // Registering again replaces the tombstone.
        apply(&mut r, from("a", "y", DUE, "10.0.0.1"));
        assert!(r.tombstone("a", "y").is_none());
        // A deregistration that finds nothing live still removes the
        // caller's tombstones: a deregistered instance never comes back.
        let dereg = Command::DeregisterFrom {
            service_name: "a".into(),
            instance_id: Some("x".into()),
            origin: None,
        };
        assert_eq!(apply(&mut r, dereg), CommandResult::NotFound);
        assert_eq!(r.tombstone_count(), 0);
        assert_eq!(
            apply(&mut r, revive("x", DUE, 60_000)),
            CommandResult::NotFound
        );
    }

    #[test]
    fn tombstones_are_bounded_and_pruned_oldest_first() {
        let mut r = Registry::new();
        for (k, id) in ["p", "q", "s"].iter().enumerate() {
            apply(&mut r, from("a", id, k as Millis * 1000, "10.0.0.1"));
            // Each expires in its own round, a second apart.
            let now = DUE + k as Millis * 1000;
            apply(&mut r, expire_keep(now, &[("a", id)], 60_000, 2));
        }
        // At most two kept: the oldest ("p") went.
        let kept: Vec<&str> = r
            .tombstones()
            .map(|t| t.instance.instance_id.as_str())
            .collect();
        assert_eq!(kept, ["q", "s"]);
        // An empty expiry past the window prunes what is older than it.
        apply(&mut r, expire_keep(DUE + 1000 + 60_001, &[], 60_000, 2));
        let kept: Vec<&str> = r
            .tombstones()
            .map(|t| t.instance.instance_id.as_str())
            .collect();
        assert_eq!(kept, ["s"]);
        // Keeping none: the plain old expiry, and max 0.
        apply(&mut r, expire_keep(DUE + 1000 + 60_001, &[], 60_000, 0));
        assert_eq!(r.tombstone_count(), 0);
    }

    #[test]
    fn the_due_list_comes_from_the_deadline_index_most_overdue_first() {
        let mut r = Registry::new();
        for (id, t) in [("late", 5_000), ("early", 0), ("fresh", 60_000)] {
            apply(
                &mut r,
                Command::Register {
                    instance: inst("a", id, t),
                },
            );
        }
        let now = 15_000 + lease::LEGACY_EXPIRY_SLACK_MS;
        assert_eq!(
            r.due(now, lease::LEGACY_EXPIRY_SLACK_MS),
            [
                ("a".to_string(), "early".to_string()),
                ("a".to_string(), "late".to_string())
            ]
        );
        // A renewal moves an instance out of the due list; a removal drops it.
        apply(&mut r, renew("early", 14_000));
        assert_eq!(
            r.due(now, lease::LEGACY_EXPIRY_SLACK_MS),
            [("a".to_string(), "late".to_string())]
        );
        apply(
            &mut r,
            Command::Deregister {
                service_name: "a".into(),
                instance_id: Some("late".into()),
            },
        );
        assert!(r.due(now, lease::LEGACY_EXPIRY_SLACK_MS).is_empty());
        assert_eq!(r.deadlines.len(), r.instance_count());
    }
}
