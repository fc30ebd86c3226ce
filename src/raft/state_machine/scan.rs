//! Reading every record of the `sm` tree fast, for a node's start-up: at a
//! million instances, walking sled's pages and decoding the records is
//! most of the time before a node can serve. The instance keys are cut
//! into ranges; two threads read and decode ranges, each taking the next
//! one not yet taken, and the caller gets the records in key order, range
//! after range. A range's records wait in memory until the caller reaches
//! them (decoded, they are what the registry will hold anyway).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use crate::raft::codec::{describe_sled, Corruption};

/// Ranges the instance keys are cut into: enough that two readers finish
/// close together however the names spread, few enough to cost nothing.
const RANGES: usize = 16;
/// Threads reading sled (the machines this runs on have two cores or more;
/// the caller's thread loads what they read).
const READERS: usize = 2;
/// Records per hand-over.
const BATCH: usize = 4096;

type Batch<T> = Result<Vec<T>, Corruption>;
/// A key range: from (included), to (excluded); `None` is open.
type Range<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Calls `each` with every record of `tree` as `decode` makes it of its
/// key and value, in key order, stopping at the first error (a record
/// `decode` refuses, or one `each` returns). The ranges are cut among the
/// keys starting with `prefix` (the many).
pub(super) fn scan<T: Send>(
    tree: &sled::Tree,
    prefix: &[u8],
    decode: impl Fn(&[u8], &[u8]) -> Result<T, Corruption> + Sync,
    mut each: impl FnMut(T) -> Result<(), Corruption>,
) -> Result<(), Corruption> {
    let bounds = split_points(tree, prefix)?;
    let ranges: Vec<Range> = (0..=bounds.len())
        .map(|i| {
            let lo = i.checked_sub(1).map(|j| bounds[j].as_slice());
            (lo, bounds.get(i).map(Vec::as_slice))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (senders, receivers): (Vec<_>, Vec<_>) = ranges
        .iter()
        .map(|_| {
            let (tx, rx) = mpsc::channel::<Batch<T>>();
            (Mutex::new(Some(tx)), rx)
        })
        .unzip();
    std::thread::scope(|scope| {
        for _ in 0..READERS.min(ranges.len()) {
            let (ranges, next, stop, senders, decode) = (&ranges, &next, &stop, &senders, &decode);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(lo, hi)) = ranges.get(i) else {
                    return;
                };
                let tx = senders[i].lock().ok().and_then(|mut tx| tx.take());
                let Some(tx) = tx.filter(|_| !stop.load(Ordering::Relaxed)) else {
                    return;
                };
                read_range(tree, (lo, hi), decode, tx, stop);
            });
        }
        let result = (|| {
            for rx in &receivers {
                // A range ends with an empty batch. A reader that stopped
                // without sending it panicked (sled asserts on some damage),
                // which the scope passes on once it has joined the threads.
                loop {
                    let batch = rx.recv().map_err(|_| {
                        Corruption::new("state machine", "reading the records failed")
                    })??;
                    if batch.is_empty() {
                        break;
                    }
                    for record in batch {
                        each(record)?;
                    }
                }
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result
    })
}

/// Reads and decodes one key range, then sends an empty batch.
fn read_range<T>(
    tree: &sled::Tree,
    (lo, hi): Range,
    decode: &impl Fn(&[u8], &[u8]) -> Result<T, Corruption>,
    tx: mpsc::Sender<Batch<T>>,
    stop: &AtomicBool,
) {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let range = (
        lo.map_or(Unbounded, Included),
        hi.map_or(Unbounded, Excluded),
    );
    let mut batch = Vec::with_capacity(BATCH);
    for item in tree.range::<&[u8], _>(range) {
        let decoded = item
            .map_err(|e| Corruption::new("state machine", describe_sled(&e)))
            .and_then(|(k, v)| decode(&k, &v));
        match decoded {
            Ok(kv) => batch.push(kv),
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
        if batch.len() == BATCH {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            let _ = tx.send(Ok(full));
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch));
    }
    let _ = tx.send(Ok(Vec::new()));
}

/// Keys that cut the records under `prefix` into about [`RANGES`] ranges of
/// similar size, by interpolating between the first and the last instance
/// key under `prefix` (names spread unevenly, which the number of ranges
/// makes up for).
fn split_points(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<Vec<u8>>, Corruption> {
    let sled_err = |e: sled::Error| Corruption::new("state machine", describe_sled(&e));
    let mut instances = tree.scan_prefix(prefix);
    let first = match instances.next() {
        Some(kv) => kv.map_err(sled_err)?.0,
        None => return Ok(Vec::new()),
    };
    let last = match instances.next_back() {
        Some(kv) => kv.map_err(sled_err)?.0,
        None => return Ok(Vec::new()),
    };
    let common = first
        .iter()
        .zip(last.iter())
        .take_while(|(a, b)| a == b)
        .count();
    // The eight bytes after the common prefix, as numbers.
    let tail = |k: &[u8]| {
        let mut b = [0u8; 8];
        for (i, x) in k.iter().skip(common).take(8).enumerate() {
            b[i] = *x;
        }
        u64::from_be_bytes(b)
    };
    let (lo, hi) = (tail(&first), tail(&last));
    let mut points: Vec<Vec<u8>> = Vec::new();
    for i in 1..RANGES as u64 {
        let at = lo + ((hi - lo) as u128 * i as u128 / RANGES as u128) as u64;
        let mut key = first[..common].to_vec();
        key.extend_from_slice(&at.to_be_bytes());
        while key.last() == Some(&0) && key.len() > common {
            key.pop();
        }
        if points.last().is_none_or(|p| *p < key) && *key > *first {
            points.push(key);
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record comes back once, in key order, whatever the ranges;
    /// the first refused record, in key order, is the error.
    #[test]
    fn gives_every_record_in_key_order() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("sm").unwrap();
        let mut expect = Vec::new();
        for (service, n) in [("a", 3), ("api", 5000), ("b", 1), ("zz\u{ff}", 7000)] {
            for i in 0..n {
                let k = format!("i/{service}\0{i}").into_bytes();
                tree.insert(&k, b"v").unwrap();
                expect.push(k);
            }
        }
        for k in [&b"a"[..], b"m/applied", b"x/y"] {
            tree.insert(k, b"v").unwrap();
            expect.push(k.to_vec());
        }
        expect.sort();
        assert!(split_points(&tree, b"i/").unwrap().len() > 4);
        let keys = |k: &[u8], _: &[u8]| Ok(k.to_vec());
        let mut got = Vec::new();
        scan(&tree, b"i/", keys, |k| {
            got.push(k);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, expect);

        let refuse = |k: &[u8], _: &[u8]| match k.ends_with(b"\x00777") || k == b"x/y" {
            true => Err(Corruption::new(String::from_utf8_lossy(k), "bad")),
            false => Ok(()),
        };
        let err = scan(&tree, b"i/", refuse, |_| Ok(())).unwrap_err();
        assert_eq!(err.to_string(), "i/api\x00777: bad");
    }
}
