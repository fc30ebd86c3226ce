//! Building a whole registry at once, as a starting node loads it from its
//! records or a follower from a snapshot: a million instances arrive sorted
//! by `(service, id)`, and inserting them one by one searched two B-trees
//! per instance (a fifth of a node's start-up at a million). The builder
//! gathers each service's instances in a vector and builds its map in one
//! go, and sorts the deadline index once at the end. Instances that arrive
//! out of order still land where they belong (inserted one by one).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{deadline_key, Instance, InstanceExt, Instances, Live, Millis, Registry, Tombstone};

/// A service's instances as they arrive: `(id, instance)`, in id order.
type Gathered = Vec<(String, Arc<Live>)>;

/// Collects instances for a [`Registry`]; [`RegistryBuilder::finish`]
/// gives the registry.
#[derive(Default)]
pub struct RegistryBuilder {
    registry: Registry,
    /// The service being gathered and its instances so far, in id order.
    current: Option<(String, Gathered)>,
    deadlines: Vec<(Millis, Box<str>)>,
    /// What is kept beside instances, set once they are all in.
    exts: Vec<(String, String, InstanceExt)>,
}

impl RegistryBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a live instance. In `(service, id)` order it costs a push; out
    /// of order, an insert into what was built so far.
    pub fn push(&mut self, instance: Instance, ext: InstanceExt) {
        let in_order = match &self.current {
            Some((service, ids)) if *service == instance.service_name => ids
                .last()
                .is_none_or(|(last, _)| *last < instance.instance_id),
            Some((service, _)) => {
                *service < instance.service_name
                    && !self.registry.services.contains_key(&instance.service_name)
            }
            None => !self.registry.services.contains_key(&instance.service_name),
        };
        if !in_order {
            self.settle();
            self.registry.insert_live(instance, ext);
            return;
        }
        if self
            .current
            .as_ref()
            .is_some_and(|(service, _)| *service != instance.service_name)
        {
            self.flush();
        }
        self.deadlines.push(deadline_key(
            instance.deadline(),
            &instance.service_name,
            &instance.instance_id,
        ));
        let (_, ids) = self
            .current
            .get_or_insert_with(|| (instance.service_name.clone(), Vec::new()));
        ids.push((
            instance.instance_id.clone(),
            Arc::new(Live { instance, ext }),
        ));
    }

    /// Sets what is kept beside an instance (ignored if it never comes).
    pub fn ext(&mut self, service: String, id: String, ext: InstanceExt) {
        self.exts.push((service, id, ext));
    }

    pub fn tombstone(&mut self, t: Tombstone) {
        self.registry.restore_tombstone(t);
    }

    pub fn expiry_paused(&mut self, paused: bool) {
        self.registry.restore_expiry_paused(paused);
    }

    pub fn clocks_pending(&mut self, pending: bool) {
        self.registry.restore_clocks_pending(pending);
    }

    /// Moves the service being gathered into the registry.
    fn flush(&mut self) {
        if let Some((service, ids)) = self.current.take() {
            // Sorted and distinct (checked in `push`): built in one pass.
            let instances: Instances = ids.into_iter().collect();
            self.registry.services.insert(service, Arc::new(instances));
        }
    }

    /// Moves everything gathered into the registry, so that it can take
    /// an insert of its own (which replaces an instance and its deadline).
    fn settle(&mut self) {
        self.flush();
        if !self.deadlines.is_empty() {
            let mut gathered = std::mem::take(&mut self.deadlines);
            gathered.sort_unstable();
            let gathered: BTreeSet<_> = gathered.into_iter().collect();
            if self.registry.deadlines.is_empty() {
                self.registry.deadlines = gathered;
            } else {
                self.registry.deadlines.extend(gathered);
            }
        }
    }

    /// The registry, with its deadline index.
    pub fn finish(mut self) -> Registry {
        self.settle();
        let exts = std::mem::take(&mut self.exts);
        let sorted = exts
            .windows(2)
            .all(|w| (&w[0].0, &w[0].1) < (&w[1].0, &w[1].1));
        // Every instance registered over HTTP has one (its origin): then a
        // walk beside the instances, rather than a search for each.
        if sorted && exts.len() * 16 >= self.registry.deadlines.len() {
            self.merge_exts(exts);
        } else {
            for (service, id, ext) in exts {
                self.registry.restore_ext(&service, &id, ext);
            }
        }
        self.registry
    }

    /// Sets each ext on its instance, both sorted by `(service, id)`.
    fn merge_exts(&mut self, exts: Vec<(String, String, InstanceExt)>) {
        let mut exts = exts.into_iter().peekable();
        for (service, instances) in self.registry.services.iter_mut() {
            while exts.next_if(|(s, _, _)| s < service).is_some() {}
            if exts.peek().is_none_or(|(s, _, _)| s != service) {
                continue;
            }
            for (id, live) in Arc::make_mut(instances).iter_mut() {
                while exts.next_if(|(s, i, _)| s == service && i < id).is_some() {}
                if let Some((_, _, ext)) = exts.next_if(|(s, i, _)| s == service && i == id) {
                    Arc::make_mut(live).ext = ext;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::inst;
    use super::*;

    /// Whatever the order, the builder gives the registry that inserting
    /// one by one gives, deadline index included.
    #[test]
    fn builds_what_inserting_one_by_one_builds() {
        let sorted: Vec<Instance> = ["a", "a-b", "b", "c"]
            .iter()
            .flat_map(|s| {
                (0..50).map(move |i| inst(s, &format!("10.0.0.{i:03}:80"), 1_000 + i % 7))
            })
            .collect();
        let mut shuffled = sorted.clone();
        // A fixed permutation: reversed halves, then a few swaps.
        shuffled[..100].reverse();
        shuffled.swap(3, 150);
        shuffled.swap(199, 0);
        let mut with_repeats = sorted.clone();
        with_repeats.insert(60, inst("a", "10.0.0.007:80", 5_000)); // replaces one
        let ext = |n: usize| InstanceExt {
            origin: Some(format!("10.1.0.{n}")),
            https: n.is_multiple_of(2),
        };
        // Exts for every third instance (walked beside them), for three
        // (looked up), repeated or out of order (looked up), and for unknown
        // ones.
        let many: Vec<_> = sorted
            .iter()
            .enumerate()
            .filter(|(n, _)| n.is_multiple_of(3))
            .collect();
        let mut repeated = many.clone();
        repeated.insert(5, (999, &sorted[0]));
        let few: Vec<_> = sorted.iter().enumerate().take(3).collect();
        let mut unordered = many.clone();
        unordered.reverse();
        let ghost = inst("b", "nowhere", 1);
        let ghosts = vec![(1, &ghost), (2, &ghost)];
        for input in [sorted.clone(), shuffled, with_repeats] {
            for exts in [&many, &repeated, &few, &unordered, &ghosts] {
                let mut one_by_one = Registry::new();
                let mut builder = RegistryBuilder::new();
                for i in &input {
                    one_by_one.insert_live(i.clone(), InstanceExt::default());
                    builder.push(i.clone(), InstanceExt::default());
                }
                for (n, i) in exts.iter() {
                    one_by_one.restore_ext(&i.service_name, &i.instance_id, ext(*n));
                    builder.ext(i.service_name.clone(), i.instance_id.clone(), ext(*n));
                }
                let built = builder.finish();
                assert_eq!(built, one_by_one);
                assert_eq!(built.deadlines.len(), built.instance_count());
            }
        }
    }
}
