//! Tests of the supervisor's exchanges with a real peer (an in-process
//! server on loopback).

use std::time::Duration;

use super::*;
use crate::server::{spawn, Config};
use crate::storage::{NewRequest, ObjRef, Repository};

/// A repository holding one commit, behind its storage actor.
fn storage_with_one_commit(dir: &std::path::Path) -> Addr<StorageActor> {
    let mut repo = Repository::create(&dir.join("ours"), 7, "127.0.0.1:1").unwrap();
    repo.commit(CommitRequest {
        news: vec![NewRequest {
            temp_id: 1,
            class: "Root".into(),
            value: rmp_serde::to_vec(&"ours").unwrap(),
        }],
        set_root: Some(ObjRef::New(1)),
        ..Default::default()
    })
    .unwrap();
    let identity = crate::actors::storage::Identity::of(&mut repo).unwrap();
    StorageActor::start(repo, watch::channel(0).0, watch::channel(identity).0)
}

#[actix_rt::test]
async fn a_peer_that_goes_away_is_an_error_never_a_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = storage_with_one_commit(tmp.path());
    let peer = spawn(Config {
        dir: tmp.path().join("peer"),
        listen: "127.0.0.1:0".into(),
        ..Config::default()
    })
    .unwrap();
    let mut link = PeerLink::connect(&peer.local_addr().to_string(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(same_record(&storage, &mut link, 0).await, Ok(true));
    // The peer holds no record 1: a definite "different".
    assert_eq!(same_record(&storage, &mut link, 1).await, Ok(false));

    // A peer that stops (or a link that breaks) says nothing about the
    // logs: the rejoin must retry, not set our commits aside as divergent.
    peer.shutdown(true).unwrap();
    let e = same_record(&storage, &mut link, 1).await.unwrap_err();
    assert!(e.contains("record_hash 1"), "{e}");
}
