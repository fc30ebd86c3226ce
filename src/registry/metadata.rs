//! An instance's metadata: string keys to string values, kept as one sorted
//! vector.
//!
//! Why not a `BTreeMap`: a map with even one entry allocates a whole B-tree
//! leaf (about 540 bytes for `String` pairs), which made metadata the
//! largest part of a live instance in memory (a million instances with two
//! keys each held about 1.4 KiB apiece). Metadata is small (at most 64
//! entries, see [`super::validate`]), written once per registration and read
//! whole, so a sorted vector costs nothing in speed and a tenth of the
//! memory.
//!
//! The encoding is the map's, byte for byte: a map in key order (bincode: a
//! length, then each key and value; JSON: an object). Log entries,
//! snapshots and records written with the map read back unchanged.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Sorted by key, each key once.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// From pairs in any order; a repeated key keeps its last value (as a
    /// map built from the same pairs would).
    fn from_pairs(mut pairs: Vec<(String, String)>) -> Self {
        // Stable: equal keys keep their order, so the last one is last.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        // `dedup_by` passes (later, kept earlier): move the later value in.
        pairs.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        pairs.shrink_to_fit();
        Self(pairs)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|at| self.0[at].1.as_str())
    }

    /// Sets `key`, returning its previous value.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, value)),
            Err(at) => {
                self.0.insert(at, (key, value));
                None
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(key, value)` in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        let mut pairs: Vec<_> = map.into_iter().collect();
        pairs.shrink_to_fit();
        Self(pairs)
    }
}

impl<const N: usize> From<[(String, String); N]> for Metadata {
    fn from(pairs: [(String, String); N]) -> Self {
        Self::from_pairs(pairs.into())
    }
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self::from_pairs(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a str, &'a str),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;

        impl<'de> Visitor<'de> for MapVisitor {
            type Value = Metadata;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Metadata, A::Error> {
                // Never trust a length from the wire for an allocation.
                let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = access.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(Metadata::from_pairs(pairs))
            }
        }

        deserializer.deserialize_map(MapVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encodes_exactly_as_the_map_did() {
        for pairs in [
            &[][..],
            &[("zone", "a")][..],
            &[("zone", "a"), ("version", "1.0.7"), ("b", "")][..],
        ] {
            let m = map(pairs);
            let ours = Metadata::from(m.clone());
            assert_eq!(
                bincode::serialize(&ours).unwrap(),
                bincode::serialize(&m).unwrap()
            );
            assert_eq!(
                serde_json::to_string(&ours).unwrap(),
                serde_json::to_string(&m).unwrap()
            );
            let back: Metadata = bincode::deserialize(&bincode::serialize(&m).unwrap()).unwrap();
            assert_eq!(back, ours);
            let back: Metadata = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
            assert_eq!(back, ours);
        }
    }

    #[test]
    fn unsorted_and_repeated_keys_read_as_a_map_would() {
        let json = r#"{"z":"1","a":"2","z":"3"}"#;
        let ours: Metadata = serde_json::from_str(json).unwrap();
        let m: BTreeMap<String, String> = serde_json::from_str(json).unwrap();
        assert_eq!(ours, Metadata::from(m));
        assert_eq!(ours.get("z"), Some("3"));
        assert_eq!(ours.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["a", "z"]);
    }

    #[test]
    fn get_and_insert() {
        let mut m = Metadata::new();
        assert!(m.is_empty());
        assert_eq!(m.insert("b".into(), "1".into()), None);
        assert_eq!(m.insert("a".into(), "2".into()), None);
        assert_eq!(m.insert("b".into(), "3".into()), Some("1".into()));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("b"), Some("3"));
        assert_eq!(m.get("c"), None);
        assert_eq!(format!("{m:?}"), r#"{"a": "2", "b": "3"}"#);
    }
}
