//! A voter that loses power right after it granted a vote must not grant a
//! conflicting one when it comes back: otherwise two candidates can each
//! count it, and two leaders can be elected with the same leader id.
//!
//! In openraft's default mode a vote, and a leader's id, is (term, node id),
//! ordered by term and then node id: having voted for (5, 3) a voter still
//! grants (5, 4) or (6, 1), and refuses (5, 2). So the second vote asked here
//! is the lower one, which a voter that remembers its vote must refuse.
//!
//! A child process (this test binary again, running `vote_child`) opens the
//! node's real stores on a [`LazyFs`] and runs openraft on them as voter 9;
//! it grants candidate 3's vote request for term 5 and says so. The parent
//! then kills it with `kill -9`, drops everything it had not synced, opens
//! the same stores in openraft again and sends candidate 2's request for
//! term 5. The control runs the child without the syncs
//! ([`DiskSync::disabled`], sled's flush alone), and the restarted voter
//! then grants the second vote.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use openraft::raft::VoteRequest;
use openraft::Vote;
use vertice_register::raft::{
    open_db, DiskSync, Faults, LogStore, Network, Raft, StateMachineStore,
};

use crate::lazyfs::Mode;
use crate::scenarios::mount;

const CHILD_DIR: &str = "POWERLOSS_VOTE_CHILD_DIR";
const CHILD_SYNC: &str = "POWERLOSS_VOTE_CHILD_SYNC";
const GRANTED: &str = "vote granted";

/// The voter: node 9, on the stores in `dir`.
async fn voter(dir: &Path, sync: bool) -> (Raft, LogStore) {
    let db = open_db(dir).expect("sled opens");
    let sync = match sync {
        true => DiskSync::open(dir, None).expect("sled's files sync"),
        false => DiskSync::disabled(),
    };
    let log = LogStore::open(&db, sync.clone()).unwrap();
    let sm = StateMachineStore::open(&db, dir, sync).unwrap();
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 100,
        election_timeout_max: 200,
        ..Default::default()
    }
    .validate()
    .unwrap();
    let net = Network::new(None, Arc::new(Faults::default()), None, None);
    let raft = Raft::new(9, Arc::new(config), net, log.clone(), sm)
        .await
        .unwrap();
    (raft, log)
}

/// Candidate `candidate` asks for node 9's vote in `term`, with a log as
/// long as anyone's could be (none).
async fn ask(raft: &Raft, term: u64, candidate: u64) -> bool {
    raft.vote(VoteRequest::new(Vote::new(term, candidate), None))
        .await
        .unwrap()
        .vote_granted
}

/// The child's side: grants one vote, says so, and waits to be killed
/// (for a minute at most). Does nothing in an ordinary test run.
#[tokio::test]
async fn vote_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let sync = std::env::var(CHILD_SYNC).as_deref() == Ok("1");
    let (raft, _log) = voter(Path::new(&dir), sync).await;
    assert!(
        ask(&raft, 5, 3).await,
        "a fresh voter grants the first vote"
    );
    println!("{GRANTED}");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Grants a vote in a child, cuts its power, and asks the restarted voter
/// for a second vote in the same term. Returns whether it granted it.
/// `None` when FUSE is missing outside CI.
fn second_vote_after_power_cut(sync: bool) -> Option<bool> {
    let (fs, _mnt) = mount(Mode::Honest)?;
    let dir = fs.path().join("voter");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vote::vote_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, &dir)
        .env(CHILD_SYNC, if sync { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(GRANTED) {
                let _ = tx.send(());
                return;
            }
        }
    });
    let granted = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    granted.expect("the child grants the first vote");
    let dropped = fs.crash(&dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let second = rt.block_on(async {
        let (raft, mut log) = voter(&dir, true).await;
        let kept = openraft::storage::RaftLogStorage::read_vote(&mut log)
            .await
            .unwrap();
        let second = ask(&raft, 5, 2).await;
        let _ = raft.shutdown().await;
        eprintln!(
            "voter with syncs {sync}: power cut dropped {} bytes; vote kept {kept:?}; vote for (5, 2) granted: {second}",
            dropped.bytes_dropped
        );
        second
    });
    Some(second)
}

#[test]
fn a_voter_that_loses_power_after_voting_cannot_vote_twice_in_that_term() {
    if let Some(second) = second_vote_after_power_cut(true) {
        assert!(!second, "the restarted voter granted (5, 2) after (5, 3)");
    }
}

/// Control: without the syncs the vote is lost and the voter votes twice.
/// sled's own flusher fsyncs once a second, so a cut right after it could
/// keep the vote: up to three tries.
#[test]
fn control_without_fsync_a_voter_votes_twice_in_one_term() {
    for attempt in 1..=3 {
        match second_vote_after_power_cut(false) {
            None | Some(true) => return,
            Some(false) => eprintln!("attempt {attempt}: the vote survived this time"),
        }
    }
    panic!("the vote survived three power cuts without fsync: the test does not bite");
}
