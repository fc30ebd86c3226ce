//! openraft's own conformance suite, run against our sled log store and
//! state machine.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;
use vertice_register::raft::{
    open_db, DiskSync, LogStore, StateMachineStore, StorageError, TypeConfig,
};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(dir.path()).expect("sled opens");
        // The real syncs, as a node runs them.
        let sync = DiskSync::open(dir.path(), None).expect("sled's files sync");
        let log = LogStore::open(&db, sync.clone()).expect("log store opens");
        let sm = StateMachineStore::open(&db, dir.path(), sync)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(SledBuilder).unwrap();
}
