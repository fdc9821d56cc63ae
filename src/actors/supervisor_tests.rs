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
    StorageActor::start(
        repo,
        watch::channel(0).0,
        watch::channel(identity).0,
        Duration::ZERO,
    )
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
    assert_eq!(same_record(&storage, &mut link, 0).await, Ok(Same::Yes));
    // The peer holds no record 1: a definite "different".
    assert_eq!(same_record(&storage, &mut link, 1).await, Ok(Same::No));

    // A peer that stops (or a link that breaks) says nothing about the
    // logs: the rejoin must retry, not set our commits aside as divergent.
    peer.shutdown(true).unwrap();
    let e = same_record(&storage, &mut link, 1).await.unwrap_err();
    assert!(e.contains("record_hash 1"), "{e}");
}

/// A peer whose log was trimmed past the record asked for tells nothing:
/// not a divergence (a rejoin would otherwise set our commits aside as
/// divergent when they may all be on the new primary).
#[actix_rt::test]
async fn a_record_the_peer_trimmed_is_unknown_not_different() {
    use crate::client::{ConnectOptions, Connection};
    use crate::protocol::{CommitBody, SessionRole};

    let tmp = tempfile::tempdir().unwrap();
    let storage = storage_with_one_commit(tmp.path());
    let peer = spawn(Config {
        dir: tmp.path().join("peer"),
        listen: "127.0.0.1:0".into(),
        max_log_bytes: 64 * 1024,
        log_segment_bytes: 16 * 1024,
        checkpoint_interval: Duration::from_millis(50),
        ..Config::default()
    })
    .unwrap();
    let addr = peer.local_addr().to_string();
    // Enough commits to roll several segments past the bound, from a
    // thread of its own (the client is blocking).
    let to = addr.clone();
    std::thread::spawn(move || {
        let mut c =
            Connection::connect(&to, SessionRole::Application, &ConnectOptions::default()).unwrap();
        for i in 0..400u32 {
            c.call(RequestBody::Commit(CommitBody {
                meta: vec![(
                    "k".into(),
                    Some(rmp_serde::to_vec(&format!("{i:0400}")).unwrap().into()),
                )],
                ..Default::default()
            }))
            .unwrap();
        }
    })
    .join()
    .unwrap();
    let mut link = PeerLink::connect(&addr, Duration::from_secs(5))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match same_record(&storage, &mut link, 1).await {
            Ok(Same::Trimmed { oldest }) => {
                assert!(oldest > 1);
                break;
            }
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the peer never trimmed record 1: {other:?}"
                );
                actix_rt::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    peer.shutdown(true).unwrap();
}

/// A catching-up copy whose primary is gone follows only a primary of its
/// repository, in its epoch or a newer one, not behind it; the newest.
#[test]
fn a_copy_follows_only_a_primary_it_could_follow_and_the_newest() {
    use crate::actors::peer_link::PeerHello;
    use crate::protocol::ServerRole;
    use crate::types::Epoch;

    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::create(&tmp.path().join("r"), 1, "127.0.0.1:1").unwrap();
    let info = repo.info();
    let epoch = |term| Epoch { term, server: 5 };
    let hello = |role, term, repository: &str, commit| PeerHello {
        server_id: 5,
        repository_id: repository.to_string(),
        role,
        node: Default::default(),
        epoch: epoch(term),
        commit,
    };
    let ours = info.repository_id.to_string();
    let (now, last) = (info.epoch.term, info.last_commit);
    let peer = |name: &str, h| (name.to_string(), h);
    let pick = |peers| leader_for(&info, peers).map(|(a, _)| a);

    // Each one refused for one reason.
    let refused = vec![
        peer(
            "secondary",
            hello(ServerRole::Secondary, now + 1, &ours, last),
        ),
        peer(
            "older",
            hello(ServerRole::Primary, now - 1, &ours, last + 5),
        ),
        peer(
            "other",
            hello(ServerRole::Primary, now + 1, "elsewhere", last),
        ),
        peer(
            "behind",
            hello(ServerRole::Primary, now + 1, &ours, last - 1),
        ),
    ];
    // The one of an older epoch is what the operator is told about.
    assert_eq!(
        older_leader(&info, &refused),
        Some(("older".to_string(), epoch(now - 1)))
    );
    assert_eq!(pick(refused), None);
    let elsewhere = [peer(
        "other",
        hello(ServerRole::Primary, now - 1, "elsewhere", last),
    )];
    assert_eq!(older_leader(&info, &elsewhere), None);
    // The newest of those that qualify.
    assert_eq!(
        pick(vec![
            peer("same", hello(ServerRole::Primary, now, &ours, last)),
            peer(
                "newer",
                hello(ServerRole::Primary, now + 2, &ours, last + 1)
            ),
            peer(
                "behind",
                hello(ServerRole::Primary, now + 3, &ours, last - 1)
            ),
        ]),
        Some("newer".to_string())
    );
}
