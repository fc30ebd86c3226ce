//! Power loss: the node's promises tested on a file system that keeps only
//! what was fsynced ([`lazyfs`], a FUSE file system served by this test
//! process).
//!
//! - `scenarios`: real node processes under write load lose power (one node;
//!   the leader of three; all three at once) and must keep every
//!   acknowledged write; controls must lose some.
//! - `vote`: a voter that loses power after voting must not vote again
//!   against it.
//! - `fs_selftest`: the file system itself, and what sled's flush alone
//!   keeps (nothing).
//!
//! Needs `/dev/fuse` (root, or `fusermount3` from Debian's `fuse3`); without
//! it each test says SKIPPED, except in CI (`CI` set), where it fails.

#[path = "../blocking/mod.rs"]
mod blocking;
mod fs_selftest;
mod lazyfs;
mod scenarios;
mod vote;
