//! Tests of the storage engine as a whole: commits, conflicts, collections,
//! restart and crash recovery, restore mode, replication by records.

use std::fs;
use std::path::Path;

use proptest::prelude::*;
use rmpv::Value;

use super::object::{encode_value, references_in, COLLECTION_CLASS, TEMP_REF_EXT};
use super::*;
use crate::types::Epoch;

fn s(v: &str) -> Vec<u8> {
    encode_value(&Value::from(v))
}

fn new_repo(dir: &Path) -> Repository {
    Repository::create(&dir.join("repo"), 7, "127.0.0.1:1").unwrap()
}

/// Create a root holding a collection; returns (root oid, collection oid).
fn setup_root_with_collection(repo: &mut Repository) -> (u64, u64) {
    let root_value = Value::Map(vec![(
        Value::from("items"),
        Value::Ext(TEMP_REF_EXT, 2u64.to_be_bytes().to_vec()),
    )]);
    let c = repo
        .commit(CommitRequest {
            news: vec![
                NewRequest {
                    temp_id: 1,
                    class: "Root".into(),
                    value: encode_value(&root_value),
                },
                NewRequest {
                    temp_id: 2,
                    class: COLLECTION_CLASS.into(),
                    value: vec![],
                },
            ],
            set_root: Some(ObjRef::New(1)),
            ..Default::default()
        })
        .unwrap();
    let oid = |t| c.new_oids.iter().find(|(x, _)| *x == t).unwrap().1;
    (oid(1), oid(2))
}

fn append(repo: &mut Repository, coll: u64, v: &str) -> Committed {
    repo.commit(CommitRequest {
        appends: vec![AppendRequest {
            coll: ObjRef::Oid(coll),
            value: s(v),
        }],
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn a_checkpoint_cut_short_before_its_header_is_undone_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut repo = Repository::create(&path, 1, "a:1").unwrap();
    repo.checkpoint().unwrap();
    // Changes the anchor (root and meta are read, modified and written
    // back at replay) and appends past the last checkpoint.
    let (_, coll) = setup_root_with_collection(&mut repo);
    append(&mut repo, coll, "a");
    repo.commit(CommitRequest {
        meta: vec![("k".into(), Some(s("v")))],
        ..Default::default()
    })
    .unwrap();
    let before = repo.digest().unwrap();
    repo.crash_before_header = true;
    assert!(repo.checkpoint().is_err());
    repo.sync().unwrap();
    drop(repo);
    assert!(path.join(super::index_map::UNDO_FILE).exists());

    let mut repo = Repository::open(&path).unwrap();
    assert_eq!(repo.digest().unwrap(), before);
    assert!(!path.join(super::index_map::UNDO_FILE).exists());
    // And the next checkpoint completes and leaves nothing to undo.
    append(&mut repo, coll, "b");
    repo.checkpoint().unwrap();
    assert!(!path.join(super::index_map::UNDO_FILE).exists());
    let after = repo.digest().unwrap();
    drop(repo);
    assert_eq!(Repository::open(&path).unwrap().digest().unwrap(), after);
}

/// After a checkpoint cut short, the repository takes nothing more until
/// it is reopened: a commit, a record from a primary, a read and above all
/// a second checkpoint (which would overwrite the undo file with entries
/// the first one already changed) are refused; the reopened repository is
/// the one before the failure.
#[test]
fn a_failed_checkpoint_stops_the_repository_until_it_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut repo = Repository::create(&path, 1, "a:1").unwrap();
    repo.checkpoint().unwrap();
    let (root, coll) = setup_root_with_collection(&mut repo);
    append(&mut repo, coll, "a");
    let before = repo.digest().unwrap();
    let records = repo.read_records(1, 100, 1 << 20).unwrap();
    repo.crash_before_header = true;
    assert!(repo.checkpoint().is_err());
    repo.crash_before_header = false;
    let undo = path.join(super::index_map::UNDO_FILE);
    let undo_bytes = fs::read(&undo).unwrap();

    let stopped = |r: Result<(), StorageError>| match r {
        Err(e @ StorageError::Stopped(_)) => assert!(e.is_fatal(), "{e}"),
        other => panic!("expected stopped, got {other:?}"),
    };
    stopped(
        repo.commit(CommitRequest {
            meta: vec![("k".into(), Some(s("v")))],
            ..Default::default()
        })
        .map(|_| ()),
    );
    stopped(repo.checkpoint());
    stopped(repo.get(root).map(|_| ()));
    stopped(repo.collection_len(coll).map(|_| ()));
    stopped(repo.apply_records(&records).map(|_| ()));
    assert_eq!(
        fs::read(&undo).unwrap(),
        undo_bytes,
        "the undo file was rewritten"
    );
    drop(repo);

    let mut repo = Repository::open(&path).unwrap();
    assert_eq!(repo.digest().unwrap(), before);
    append(&mut repo, coll, "b");
    repo.checkpoint().unwrap();
}

#[test]
fn appends_to_more_collections_than_stay_open_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut repo = Repository::create(&path, 1, "a:1").unwrap();
    // Far more collections than the store keeps open (256), appended to
    // round robin, so files are closed and reopened under buffered data.
    let made = repo
        .commit(CommitRequest {
            news: (1..=600)
                .map(|t| NewRequest {
                    temp_id: t,
                    class: COLLECTION_CLASS.into(),
                    value: encode_value(&Value::Nil),
                })
                .collect(),
            ..Default::default()
        })
        .unwrap();
    let colls: Vec<u64> = made.new_oids.iter().map(|(_, o)| *o).collect();
    for round in 0..2 {
        for (i, c) in colls.iter().enumerate() {
            append(&mut repo, *c, &format!("{i}-{round}"));
        }
    }
    repo.checkpoint().unwrap();
    drop(repo);
    let mut repo = Repository::open(&path).unwrap();
    for (i, c) in colls.iter().enumerate() {
        assert_eq!(
            repo.collection_range(*c, 0, 10).unwrap(),
            vec![s(&format!("{i}-0")), s(&format!("{i}-1"))],
            "collection {i}"
        );
    }
}

#[test]
fn commit_read_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (root, coll) = {
        let mut repo = new_repo(dir.path());
        let ids = setup_root_with_collection(&mut repo);
        append(&mut repo, ids.1, "a");
        append(&mut repo, ids.1, "b");
        repo.sync().unwrap();
        ids
    };
    let mut repo = Repository::open(&dir.path().join("repo")).unwrap();
    let anchor = repo.anchor().unwrap();
    assert_eq!(anchor.root, Some(root));
    assert_eq!(anchor.node.primary().unwrap().addr, "127.0.0.1:1");
    let obj = repo.get(root).unwrap().unwrap();
    assert_eq!(obj.class, "Root");
    assert_eq!(references_in(&obj.value).unwrap(), vec![coll]);
    assert_eq!(repo.collection_len(coll).unwrap(), 2);
    assert_eq!(
        repo.collection_range(coll, 0, 10).unwrap(),
        vec![s("a"), s("b")]
    );
    assert_eq!(repo.info().last_commit, 4);
}

#[test]
fn a_reference_of_the_wrong_size_is_refused_at_commit_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let (root, coll) = setup_root_with_collection(&mut repo);
    let before = repo.info().last_commit;
    // A 4-byte type-1 extension (marker d6): before the full check at
    // commit it was stored, and every later digest and deep read failed.
    let short_ref = encode_value(&Value::Map(vec![(
        Value::from("r"),
        Value::Ext(super::object::REF_EXT, vec![0, 0, 0, 42]),
    )]));
    let short_temp = encode_value(&Value::Ext(TEMP_REF_EXT, vec![0, 0, 0, 1]));
    for value in [short_ref, short_temp] {
        let err = repo
            .commit(CommitRequest {
                news: vec![NewRequest {
                    temp_id: 1,
                    class: "D".into(),
                    value: value.clone(),
                }],
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(err, StorageError::Invalid(_)), "{err}");
        let err = repo
            .commit(CommitRequest {
                appends: vec![AppendRequest {
                    coll: ObjRef::Oid(coll),
                    value,
                }],
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(err, StorageError::Invalid(_)), "{err}");
    }
    assert_eq!(repo.info().last_commit, before);
    repo.digest().unwrap();
    assert_eq!(
        references_in(&repo.get(root).unwrap().unwrap().value).unwrap(),
        vec![coll]
    );
}

#[test]
fn stale_versions_reject_the_whole_commit_naming_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let c = repo
        .commit(CommitRequest {
            news: (1..=3)
                .map(|t| NewRequest {
                    temp_id: t,
                    class: "P".into(),
                    value: s("v0"),
                })
                .collect(),
            ..Default::default()
        })
        .unwrap();
    let oids: Vec<u64> = c.new_oids.iter().map(|(_, o)| *o).collect();
    let v1 = c.number;
    let put = |oid, expected| PutRequest {
        oid,
        expected_version: expected,
        class: "P".into(),
        value: s("v1"),
    };
    // Someone else rewrites objects 0 and 2.
    repo.commit(CommitRequest {
        puts: vec![put(oids[0], v1), put(oids[2], v1)],
        ..Default::default()
    })
    .unwrap();
    let before = repo.info().last_commit;
    let err = repo
        .commit(CommitRequest {
            puts: vec![put(oids[0], v1), put(oids[1], v1), put(oids[2], v1)],
            ..Default::default()
        })
        .unwrap_err();
    match err {
        StorageError::Conflict { oids: bad } => assert_eq!(bad, vec![oids[0], oids[2]]),
        other => panic!("expected a conflict, got {other}"),
    }
    assert_eq!(
        repo.info().last_commit,
        before,
        "nothing of a rejected commit applies"
    );
    assert_eq!(repo.get(oids[1]).unwrap().unwrap().version, v1);
    assert!(matches!(
        repo.commit(CommitRequest {
            puts: vec![put(9999, 1)],
            ..Default::default()
        }),
        Err(StorageError::UnknownObject(9999))
    ));
}

#[test]
fn invalid_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let (root, coll) = setup_root_with_collection(&mut repo);
    let bad_value = repo.commit(CommitRequest {
        news: vec![NewRequest {
            temp_id: 1,
            class: "X".into(),
            value: vec![0x92, 0x01],
        }],
        ..Default::default()
    });
    assert!(matches!(bad_value, Err(StorageError::Invalid(_))));
    let not_coll = repo.commit(CommitRequest {
        appends: vec![AppendRequest {
            coll: ObjRef::Oid(root),
            value: s("x"),
        }],
        ..Default::default()
    });
    assert!(matches!(not_coll, Err(StorageError::NotACollection(_))));
    let put_coll = repo.commit(CommitRequest {
        puts: vec![PutRequest {
            oid: coll,
            expected_version: 2,
            class: "X".into(),
            value: s("x"),
        }],
        ..Default::default()
    });
    assert!(matches!(put_coll, Err(StorageError::Invalid(_))));
    assert!(matches!(
        repo.commit(CommitRequest::default()),
        Err(StorageError::Invalid(_))
    ));
}

#[test]
fn appends_to_one_collection_never_conflict_and_get_dense_positions() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let (_, coll) = setup_root_with_collection(&mut repo);
    let c = repo
        .commit(CommitRequest {
            appends: (0..3)
                .map(|i| AppendRequest {
                    coll: ObjRef::Oid(coll),
                    value: s(&format!("x{i}")),
                })
                .collect(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(c.positions, vec![0, 1, 2]);
    assert_eq!(append(&mut repo, coll, "y").positions, vec![3]);
}

#[test]
fn large_collection_survives_checkpoint_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let n = 100_000u64;
    let coll = {
        let mut repo = new_repo(dir.path());
        let (_, coll) = setup_root_with_collection(&mut repo);
        for chunk in 0..(n / 1000) {
            repo.commit(CommitRequest {
                appends: (0..1000)
                    .map(|i| AppendRequest {
                        coll: ObjRef::Oid(coll),
                        value: s(&format!("e{:09}", chunk * 1000 + i)),
                    })
                    .collect(),
                ..Default::default()
            })
            .unwrap();
            if chunk == 50 {
                repo.checkpoint().unwrap();
            }
        }
        repo.sync().unwrap();
        coll
    };
    let mut repo = Repository::open(&path).unwrap();
    assert_eq!(repo.collection_len(coll).unwrap(), n);
    let tail = repo.collection_range(coll, n - 2, 10).unwrap();
    assert_eq!(tail, vec![s("e000099998"), s("e000099999")]);
    let mid = repo.collection_range(coll, 50_500, 1).unwrap();
    assert_eq!(mid, vec![s("e000050500")]);
}

/// The file of the repository at `repo` whose name is `name`, anywhere
/// below it.
fn file_named(repo: &Path, name: &str) -> std::path::PathBuf {
    let mut dirs = vec![repo.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().unwrap() == name {
                return p;
            }
        }
    }
    panic!("no {name} under {}", repo.display())
}

#[test]
fn a_damaged_index_or_collection_file_is_refused_and_no_element_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let coll = {
        let mut repo = new_repo(dir.path());
        let (_, coll) = setup_root_with_collection(&mut repo);
        for i in 0..20 {
            append(&mut repo, coll, &format!("e{i}"));
        }
        repo.checkpoint().unwrap();
        coll
    };
    let index = path.join(index_map::INDEX_FILE);
    let idx = file_named(&path, &format!("{coll}.idx"));
    let dat = file_named(&path, &format!("{coll}.dat"));
    let (index_bytes, idx_bytes, dat_bytes) = (
        fs::read(&index).unwrap(),
        fs::read(&idx).unwrap(),
        fs::read(&dat).unwrap(),
    );
    let refused = |what: &str, expect: &str| {
        match Repository::open(&path) {
            Err(e @ StorageError::Corrupted(_)) => {
                assert!(e.to_string().contains(expect), "{what}: {e}")
            }
            Err(other) => panic!("{what}: unexpected {other}"),
            Ok(_) => panic!("{what}: opened"),
        }
        assert_eq!(
            fs::read(&dat).unwrap(),
            dat_bytes,
            "{what}: elements were cut"
        );
    };

    fs::write(&idx, &idx_bytes[..idx_bytes.len() - 5 * 8]).unwrap();
    refused(
        "a shortened .idx",
        "holds 15 elements, but the index says 20",
    );
    fs::write(&idx, &idx_bytes).unwrap();

    let mut zeroed = index_bytes.clone();
    let at = (index_map::HEAD_LEN + coll * index_map::ENTRY_LEN) as usize;
    zeroed[at..at + index_map::ENTRY_LEN as usize].fill(0);
    fs::write(&index, &zeroed).unwrap();
    refused("the collection's entry zeroed", "has files but no entry");

    fs::write(&index, vec![0u8; index_bytes.len()]).unwrap();
    refused("index.map zeroed", "is all zeros");
    fs::remove_file(&index).unwrap();
    refused("index.map missing", "is missing");
    assert!(!index.exists(), "no empty index was made in its place");

    fs::write(&index, &index_bytes).unwrap();
    let repo = Repository::open(&path).unwrap();
    assert_eq!(repo.collection_len(coll).unwrap(), 20);
}

#[test]
fn a_creation_cut_short_before_the_first_commit_is_refused_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    fs::create_dir_all(&path).unwrap();
    // What a kill -9 right after creation wrote its header leaves.
    header::Header {
        repository_id: crate::types::RepositoryId::random(),
        server_id: 7,
        restore_mode: false,
        tombstones: false,
        epoch: Epoch::initial(7),
        checkpoint: 0,
        checkpoint_hash: record::GENESIS_HASH,
        objects_len: 0,
        next_oid: 1,
        log_segment: 0,
    }
    .write(&path)
    .unwrap();
    let err = Repository::open(&path).err().expect("refused").to_string();
    assert!(err.contains("creation was cut short"), "{err}");
    // A repository that got its first commit opens.
    let other = dir.path().join("other");
    drop(Repository::create(&other, 7, "127.0.0.1:1").unwrap());
    Repository::open(&other).unwrap();
}

#[test]
fn second_open_is_refused_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _repo = new_repo(dir.path());
    assert!(matches!(
        Repository::open(&dir.path().join("repo")),
        Err(StorageError::Locked(_))
    ));
    assert!(matches!(
        Repository::open(&dir.path().join("absent")),
        Err(StorageError::NotARepository(_))
    ));
}

#[test]
fn idempotency_tokens_are_remembered_across_restart_of_the_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let number = {
        let mut repo = new_repo(dir.path());
        let (_, coll) = setup_root_with_collection(&mut repo);
        let c = repo
            .commit(CommitRequest {
                token: Some(b"tok-1".to_vec()),
                appends: vec![AppendRequest {
                    coll: ObjRef::Oid(coll),
                    value: s("x"),
                }],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(repo.token_commit(b"tok-1"), Some(c.number));
        repo.sync().unwrap();
        c.number
    };
    let repo = Repository::open(&path).unwrap();
    assert_eq!(repo.token_commit(b"tok-1"), Some(number));
    assert_eq!(repo.token_commit(b"other"), None);
}

/// A copy made from a snapshot, in restore mode, that then applies the
/// primary's records, holds exactly the primary's content.
#[test]
fn replica_from_snapshot_applies_records_to_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = new_repo(dir.path());
    let (_, coll) = setup_root_with_collection(&mut primary);
    append(&mut primary, coll, "before");
    let snap = primary.snapshot(&dir.path().join("scratch")).unwrap();
    // Commits go on after the snapshot; the snapshot does not change.
    for i in 0..50 {
        append(&mut primary, coll, &format!("after{i}"));
    }
    let replica_dir = dir.path().join("replica");
    snap.copy_to(&replica_dir).unwrap();
    let mut replica = Repository::open(&replica_dir).unwrap();
    let info = replica.info();
    assert!(info.restore_mode);
    assert_eq!(info.last_commit, snap.commit);
    assert_ne!(info.server_id, primary.info().server_id);
    assert_eq!(replica.collection_len(coll).unwrap(), 1);
    assert!(matches!(
        replica.commit(CommitRequest {
            appends: vec![AppendRequest {
                coll: ObjRef::Oid(coll),
                value: s("local"),
            }],
            ..Default::default()
        }),
        Err(StorageError::RestoreMode)
    ));
    let records = primary
        .read_records(snap.commit + 1, 1000, usize::MAX)
        .unwrap();
    assert_eq!(records.len(), 50);
    // Out of sequence: names the number to resend from.
    match replica.apply_record(&records[1]) {
        Err(StorageError::OutOfSequence { expected, got }) => {
            assert_eq!((expected, got), (snap.commit + 1, snap.commit + 2))
        }
        other => panic!("expected out of sequence, got {other:?}"),
    }
    for r in &records {
        replica.apply_record(r).unwrap();
    }
    assert_eq!(replica.digest().unwrap(), primary.digest().unwrap());
    assert_eq!(replica.info().last_hash, primary.info().last_hash);
}

#[test]
fn records_off_the_chain_or_from_old_epochs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = new_repo(dir.path());
    let snap = primary.snapshot(&dir.path().join("scratch")).unwrap();
    snap.copy_to(&dir.path().join("replica")).unwrap();
    let mut replica = Repository::open(&dir.path().join("replica")).unwrap();
    let base = replica.info();
    let forged = CommitRecord {
        number: base.last_commit + 1,
        epoch: base.epoch,
        prev_hash: [9; 32],
        payload: Payload {
            token: None,
            ops: vec![Op::SetMeta {
                key: "k".into(),
                value: None,
            }],
        },
    };
    assert!(matches!(
        replica.apply_record(&forged.encode()),
        Err(StorageError::ChainMismatch { .. })
    ));
    let old = CommitRecord {
        prev_hash: base.last_hash,
        epoch: Epoch { term: 0, server: 0 },
        ..forged.clone()
    };
    assert!(matches!(
        replica.apply_record(&old.encode()),
        Err(StorageError::StaleEpoch { .. })
    ));
    // A newer epoch opened by the primary is followed.
    let newer = primary
        .commit(CommitRequest {
            new_epoch: Some(base.epoch.next(5)),
            meta: vec![("k".into(), Some(s("v")))],
            ..Default::default()
        })
        .unwrap();
    replica.apply_record(&newer.body).unwrap();
    assert_eq!(replica.info().epoch, base.epoch.next(5));
}

fn tokened(repo: &mut Repository, coll: u64, token: &str) -> Result<Committed, StorageError> {
    repo.commit(CommitRequest {
        token: Some(token.as_bytes().to_vec()),
        appends: vec![AppendRequest {
            coll: ObjRef::Oid(coll),
            value: s(token),
        }],
        ..Default::default()
    })
}

#[test]
fn tokens_of_checkpointed_commits_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    // Small segments: the checkpoint trims the log, yet keeps the records
    // of the last `max_tokens` commits.
    let opts = RepoOptions {
        segment_bytes: 1024,
        max_tokens: 40,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&path, 1, "a:1", opts.clone()).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    let mut numbers = Vec::new();
    for i in 0..100 {
        numbers.push(
            tokened(&mut repo, coll, &format!("t{i:03}"))
                .unwrap()
                .number,
        );
    }
    // No secondary needs anything (as a server says once its secondaries
    // hold everything).
    repo.retain_from(u64::MAX).unwrap();
    repo.checkpoint().unwrap();
    assert!(repo.info().log_start > 1, "the checkpoint trimmed the log");
    let after = tokened(&mut repo, coll, "after").unwrap().number;
    // A kill: no checkpoint at close, only what the log holds.
    repo.sync().unwrap();
    drop(repo);

    let repo = Repository::open_with(&path, opts).unwrap();
    for (i, number) in numbers.iter().enumerate().skip(61) {
        assert_eq!(
            repo.token_commit(format!("t{i:03}").as_bytes()),
            Some(*number),
            "token t{i:03}, covered by the checkpoint"
        );
    }
    assert_eq!(repo.token_commit(b"after"), Some(after));
    assert_eq!(repo.token_commit(b"t000"), None, "beyond the 40 remembered");
    // The storage actor answers a resent token from `token_commit`
    // (`CommitReply::Duplicate`) instead of applying it again.
}

#[test]
fn the_log_a_backup_needs_to_catch_up_is_kept_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RepoOptions {
        segment_bytes: 2048,
        max_log_bytes: 64 * 1024,
        max_tokens: 10,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&dir.path().join("r"), 1, "a:1", opts).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    let snap = repo.snapshot(&dir.path().join("scratch")).unwrap();
    // Commits go on while the backup is copied; the secondaries hold them
    // all, so they alone would let every checkpointed record go.
    for i in 0..300 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.retain_from(u64::MAX).unwrap();
    repo.checkpoint().unwrap();
    let got = repo.read_records(snap.commit + 1, 10, 1 << 20).unwrap();
    assert_eq!(got.len(), 10, "a server started from the backup catches up");

    // The bound still wins: a backup never makes the log grow without end.
    for i in 0..3000 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.checkpoint().unwrap();
    assert!(repo.log_disk_bytes() <= 64 * 1024 + 2048);
    assert!(matches!(
        repo.read_records(snap.commit + 1, 10, 1 << 20),
        Err(StorageError::LogTruncated { .. })
    ));
}

/// A backup that failed or was aborted does not move the log kept for
/// the last completed one: that is the backup the operator holds.
#[test]
fn a_failed_backup_keeps_the_log_the_last_completed_one_needs() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RepoOptions {
        segment_bytes: 2048,
        max_tokens: 10,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&dir.path().join("r"), 1, "a:1", opts).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    let done = repo.snapshot(&dir.path().join("scratch")).unwrap().commit;
    repo.backup_ended(Some(done), true);
    // Secondaries hold everything: they alone would let every
    // checkpointed record go.
    repo.retain_from(u64::MAX).unwrap();
    for i in 0..300 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    let failed = repo.snapshot(&dir.path().join("scratch2")).unwrap().commit;
    for i in 0..300 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.backup_ended(Some(failed), false);
    repo.checkpoint().unwrap();
    let got = repo.read_records(done + 1, 10, 1 << 20).unwrap();
    assert_eq!(
        got.len(),
        10,
        "a server started from the completed backup catches up"
    );

    // A completed backup moves it on: the earlier one is no longer kept.
    let newer = repo.snapshot(&dir.path().join("scratch3")).unwrap().commit;
    repo.backup_ended(Some(newer), true);
    for i in 0..300 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.checkpoint().unwrap();
    assert!(
        repo.info().log_start > done + 1,
        "the log is kept from {newer} only"
    );
    assert!(repo.read_records(newer + 1, 10, 1 << 20).is_ok());
}

#[test]
fn a_commit_refused_for_a_long_class_name_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let mut repo = new_repo(dir.path());
    let before = repo.info();
    let long = "C".repeat(70_000);
    let e = repo
        .commit(CommitRequest {
            news: vec![
                NewRequest {
                    temp_id: 1,
                    class: "A".into(),
                    value: s("kept?"),
                },
                NewRequest {
                    temp_id: 2,
                    class: long,
                    value: s("too long a class"),
                },
            ],
            token: Some(b"tok".to_vec()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, StorageError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("class name"), "{e}");
    // Not logged, not half applied: object "A" would have been next_oid.
    let after = repo.info();
    assert_eq!(after.last_commit, before.last_commit);
    assert_eq!(after.next_oid, before.next_oid);
    assert!(repo.get(before.next_oid).unwrap().is_none());
    assert_eq!(repo.token_commit(b"tok"), None);
    // ... and the repository still opens after a crash.
    repo.sync().unwrap();
    drop(repo);
    let repo = Repository::open(&path).unwrap();
    assert_eq!(repo.info().last_commit, before.last_commit);
}

#[test]
fn catch_up_reads_report_a_truncated_log() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RepoOptions {
        segment_bytes: 2048,
        max_log_bytes: 8192,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&dir.path().join("r"), 1, "a:1", opts).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    for i in 0..500 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.checkpoint().unwrap();
    assert!(repo.log_disk_bytes() <= 8192 + 2048);
    let oldest = repo.info().log_start;
    assert!(oldest > 1);
    match repo.read_records(1, 10, 1 << 20) {
        Err(StorageError::LogTruncated {
            requested,
            oldest: o,
        }) => {
            assert_eq!((requested, o), (1, oldest))
        }
        other => panic!("expected truncation, got {other:?}"),
    }
    let got = repo.read_records(oldest, 10, 1 << 20).unwrap();
    assert_eq!(got.len(), 10);
}

#[test]
fn corrupt_middle_record_is_an_error_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let end = {
        let mut repo = new_repo(dir.path());
        let (_, coll) = setup_root_with_collection(&mut repo);
        repo.checkpoint().unwrap();
        // Past the collection's write buffer: its files grow beyond the
        // checkpoint before any new checkpoint.
        for i in 0..20 {
            append(&mut repo, coll, &format!("v{i}-{}", "x".repeat(100_000)));
        }
        repo.sync().unwrap();
        repo.log_end_offset() as usize
    };
    let seg = fs::read_dir(path.join("log"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = fs::read(&seg).unwrap();
    let at = end / 2;
    bytes[at] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();
    let sizes = |p: &std::path::Path| -> Vec<(std::path::PathBuf, u64)> {
        let mut out: Vec<_> = [p.join("objects.dat")]
            .into_iter()
            .chain(
                fs::read_dir(p.join("coll"))
                    .unwrap()
                    .map(|e| e.unwrap().path()),
            )
            .map(|f| {
                let len = fs::metadata(&f).unwrap().len();
                (f, len)
            })
            .collect();
        out.sort();
        out
    };
    let before = sizes(&path);
    let err = Repository::open(&path).err().expect("must refuse");
    let text = err.to_string();
    assert!(
        matches!(err, StorageError::CorruptRecord { .. }) && text.contains("log"),
        "{text}"
    );
    // Refused before anything was cut: the data files still hold what the
    // records after the checkpoint did (the other copy of the damaged one).
    assert_eq!(sizes(&path), before);
}

// ---- crash recovery, as a property ----

#[derive(Clone, Debug)]
enum Action {
    Append(u8, String),
    NewObject(String),
    Rewrite(u8, String),
    Sync,
    Checkpoint,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u8..3, "[a-z]{0,12}").prop_map(|(c, v)| Action::Append(c, v)),
        2 => "[a-z]{0,40}".prop_map(Action::NewObject),
        2 => (any::<u8>(), "[a-z]{0,40}").prop_map(|(i, v)| Action::Rewrite(i, v)),
        1 => Just(Action::Sync),
        1 => Just(Action::Checkpoint),
    ]
}

#[derive(Clone, Debug)]
enum Damage {
    /// Cut the log at this fraction of its unsynced tail.
    CutLog(f64),
    /// Append garbage after the log's end.
    GarbageLog(Vec<u8>),
    /// Cut a data file somewhere after its checkpointed length.
    CutData(f64),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::CutLog),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Damage::GarbageLog),
        (0.0..1.0f64).prop_map(Damage::CutData),
    ]
}

fn last_segment(repo_dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = fs::read_dir(repo_dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

fn run_crash_case(actions: Vec<Action>, damages: Vec<Damage>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let mut repo = new_repo(dir.path());
    let (_, c0) = setup_root_with_collection(&mut repo);
    let mut colls = vec![c0];
    for _ in 0..2 {
        let c = repo
            .commit(CommitRequest {
                news: vec![NewRequest {
                    temp_id: 1,
                    class: COLLECTION_CLASS.into(),
                    value: vec![],
                }],
                ..Default::default()
            })
            .unwrap();
        colls.push(c.new_oids[0].1);
    }
    repo.sync().unwrap();
    let mut objects: Vec<(u64, u64)> = Vec::new();
    // digests[n] = content after commit n.
    let mut digests = std::collections::HashMap::new();
    digests.insert(repo.info().last_commit, repo.digest().unwrap());
    let mut durable = repo.info().last_commit;
    let mut synced_log_len = repo.log_end_offset();
    for a in actions {
        let req = match a {
            Action::Append(c, v) => CommitRequest {
                appends: vec![AppendRequest {
                    coll: ObjRef::Oid(colls[c as usize]),
                    value: s(&v),
                }],
                ..Default::default()
            },
            Action::NewObject(v) => CommitRequest {
                news: vec![NewRequest {
                    temp_id: 1,
                    class: "O".into(),
                    value: s(&v),
                }],
                // Keep new objects reachable so the digest covers them.
                appends: vec![AppendRequest {
                    coll: ObjRef::Oid(colls[0]),
                    value: encode_value(&Value::Ext(TEMP_REF_EXT, 1u64.to_be_bytes().to_vec())),
                }],
                ..Default::default()
            },
            Action::Rewrite(i, v) if !objects.is_empty() => {
                let k = i as usize % objects.len();
                let (oid, version) = objects[k];
                CommitRequest {
                    puts: vec![PutRequest {
                        oid,
                        expected_version: version,
                        class: "O".into(),
                        value: s(&v),
                    }],
                    ..Default::default()
                }
            }
            Action::Rewrite(..) => continue,
            Action::Sync | Action::Checkpoint => {
                if matches!(a, Action::Sync) {
                    repo.sync().unwrap();
                } else {
                    repo.checkpoint().unwrap();
                }
                durable = repo.info().last_commit;
                synced_log_len = repo.log_end_offset();
                continue;
            }
        };
        let c = repo.commit(req).unwrap();
        for (_, oid) in &c.new_oids {
            objects.push((*oid, c.number));
        }
        // Track versions of rewritten objects.
        let number = c.number;
        for o in objects.iter_mut() {
            if repo.get(o.0).unwrap().unwrap().version == number {
                o.1 = number;
            }
        }
        digests.insert(number, repo.digest().unwrap());
    }
    let log_end = repo.log_end_offset();
    let checkpoint_objects_len = {
        let h = super::header::Header::read(&path).unwrap();
        h.objects_len
    };
    drop(repo); // the crash: nothing more reaches the disk
    for d in damages {
        match d {
            Damage::CutLog(f) => {
                // Everything after the cut never reached the disk: zeros
                // (preallocated) or a shorter file.
                let seg = last_segment(&path);
                if log_end > synced_log_len {
                    let cut = synced_log_len + ((log_end - synced_log_len) as f64 * f) as u64;
                    let mut bytes = fs::read(&seg).unwrap();
                    let cut = (cut as usize).min(bytes.len());
                    for b in &mut bytes[cut..] {
                        *b = 0;
                    }
                    if f < 0.5 {
                        bytes.truncate(cut);
                    }
                    fs::write(&seg, &bytes).unwrap();
                }
            }
            Damage::GarbageLog(bytes) => {
                // Garbage where the next record would have gone.
                use std::os::unix::fs::FileExt;
                let seg = last_segment(&path);
                let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
                let len = f.metadata().unwrap().len();
                let at = log_end.min(len);
                f.write_all_at(&bytes, at).unwrap();
            }
            Damage::CutData(f) => {
                let p = path.join("objects.dat");
                let len = fs::metadata(&p).unwrap().len();
                if len > checkpoint_objects_len {
                    let cut =
                        checkpoint_objects_len + ((len - checkpoint_objects_len) as f64 * f) as u64;
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .unwrap()
                        .set_len(cut)
                        .unwrap();
                }
            }
        }
    }
    let mut repo = Repository::open(&path).expect("recovery must succeed after a crash");
    let last = repo.info().last_commit;
    assert!(last >= durable, "lost durable commit: {last} < {durable}");
    let expected = digests
        .get(&last)
        .expect("recovered to a commit that existed");
    assert_eq!(
        &repo.digest().unwrap(),
        expected,
        "content after recovery at {last}"
    );
    // The recovered repository keeps working.
    append(&mut repo, colls[1], "after-recovery");
    repo.checkpoint().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn crash_at_any_point_recovers_a_prefix_holding_every_flushed_commit(
        actions in proptest::collection::vec(action(), 1..40),
        damages in proptest::collection::vec(damage(), 0..3),
    ) {
        run_crash_case(actions, damages);
    }
}

/// Meta attributes live in the root anchor, rewritten whole by each change:
/// a commit that would take it past MAX_ANCHOR_BYTES is refused before
/// anything is logged.
#[test]
fn meta_attributes_are_bounded_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = Repository::create(&dir.path().join("r"), 1, "a:1").unwrap();
    let last = repo.info().last_commit;
    let big = crate::storage::object::encode_value(&rmpv::Value::Binary(vec![
        7u8;
        super::repository::MAX_ANCHOR_BYTES
            / 2
    ]));
    let err = repo
        .commit(CommitRequest {
            meta: vec![
                ("a".into(), Some(big.clone())),
                ("b".into(), Some(big.clone())),
            ],
            ..Default::default()
        })
        .map(|c| c.number)
        .expect_err("refused");
    assert!(
        matches!(&err, StorageError::Invalid(why) if why.contains("at most 67108864")),
        "{err}"
    );
    assert_eq!(repo.info().last_commit, last);
    repo.commit(CommitRequest {
        meta: vec![("a".into(), Some(big))],
        ..Default::default()
    })
    .unwrap();
}

/// After a restart, segments not read yet count toward the log's size on
/// disk (and so toward `max_log_bytes`) by their files' lengths.
#[test]
fn the_log_on_disk_is_counted_whole_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    // Few tokens: the open reads back only the last segments for them.
    let opts = || RepoOptions {
        segment_bytes: 2048,
        max_tokens: 10,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&path, 1, "a:1", opts()).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    repo.retain_from(1).unwrap();
    for i in 0..200 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.checkpoint().unwrap();
    let before = repo.log_disk_bytes();
    drop(repo);
    let on_disk: u64 = fs::read_dir(path.join("log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let repo = Repository::open_with(&path, opts()).unwrap();
    assert!(before > 4 * 2048, "several segments: {before}");
    // The current segment is preallocated beyond its records; every other
    // one is counted in full.
    assert!(
        repo.log_disk_bytes() >= before && repo.log_disk_bytes() <= on_disk,
        "{} counted; {before} before the restart, {on_disk} on disk",
        repo.log_disk_bytes()
    );
}

/// The log never deletes its current segment, and the header names the
/// one current at the checkpoint: a `log/` deleted or cut by hand is
/// refused at open, never taken for the empty log of a fresh backup
/// (which would drop every commit after the checkpoint without a word).
#[test]
fn a_deleted_log_is_refused_not_taken_for_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let opts = || RepoOptions {
        segment_bytes: 2048,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&path, 1, "a:1", opts()).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    for i in 0..100 {
        append(&mut repo, coll, &format!("{i:040}"));
    }
    repo.checkpoint().unwrap();
    let snap = repo.snapshot(&dir.path().join("scratch")).unwrap();
    // Commits after the checkpoint live only in the log, over a roll.
    for i in 0..40 {
        append(&mut repo, coll, &format!("after the checkpoint {i:040}"));
    }
    repo.sync().unwrap();
    let last = repo.info().last_commit;
    drop(repo);

    let header = header::Header::read(&path).unwrap();
    assert!(header.log_segment > 1, "several segments: {header:?}");
    let named = path
        .join(commit_log::LOG_DIR)
        .join(commit_log::segment_name(header.log_segment));
    assert_ne!(named, last_segment(&path), "a segment rolled since");
    // A backup holds no log and names none.
    let copy = header::Header::decode(&snap.header, &path).unwrap();
    assert_eq!(copy.log_segment, 0);

    let refused = |what: &str| {
        let err = Repository::open_with(&path, opts())
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"))
            .to_string();
        assert!(
            err.contains(&named.display().to_string()) && err.contains("is missing"),
            "{what}: {err}"
        );
    };
    // The segment the header names, moved away.
    let aside = dir.path().join("aside.log");
    fs::rename(&named, &aside).unwrap();
    refused("the named segment moved away");
    fs::rename(&aside, &named).unwrap();
    let repo = Repository::open_with(&path, opts()).unwrap();
    assert_eq!(repo.info().last_commit, last, "put back, nothing is lost");
    drop(repo);
    // The newest segment, which no header names, moved away: the one
    // before it is marked finished, so the log is known to go on.
    let newest = last_segment(&path);
    fs::rename(&newest, &aside).unwrap();
    let err = Repository::open_with(&path, opts())
        .err()
        .expect("opened without its newest segment")
        .to_string();
    assert!(
        err.contains(&newest.display().to_string()) && err.contains("is missing"),
        "{err}"
    );
    fs::rename(&aside, &newest).unwrap();
    // The whole log directory. The refused open leaves no empty `log/`
    // in the way of the one the operator puts back.
    let log_dir = path.join(commit_log::LOG_DIR);
    fs::rename(&log_dir, dir.path().join("log-aside")).unwrap();
    refused("log/ moved away");
    assert!(!log_dir.exists(), "a refused open created log/");
    // The operator may accept the loss: the copy starts at its checkpoint.
    let accept = RepoOptions {
        accept_missing_log: true,
        ..opts()
    };
    let repo = Repository::open_with(&path, accept).unwrap();
    assert_eq!(repo.info().last_commit, header.checkpoint);
    assert!(header.checkpoint < last);
    drop(repo);
    // Accepted once, the loss is not asked about again, though no
    // checkpoint was taken since.
    Repository::open_with(&path, opts()).unwrap();
    fs::remove_dir_all(&log_dir).unwrap();
    fs::rename(dir.path().join("log-aside"), &log_dir).unwrap();
    let repo = Repository::open_with(&path, opts()).unwrap();
    assert_eq!(repo.info().last_commit, last, "nothing was cut meanwhile");
}

/// The other direction: the log's own deletions (old segments past the
/// bound, after checkpoints that named newer ones) never make a good
/// directory look cut, whether it was closed after a checkpoint or not.
#[test]
fn a_log_trimmed_by_checkpoints_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let opts = || RepoOptions {
        segment_bytes: 2048,
        max_log_bytes: 8 * 1024,
        max_tokens: 10,
        ..Default::default()
    };
    let mut repo = Repository::create_with(&path, 1, "a:1", opts()).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    repo.retain_from(u64::MAX).unwrap();
    for round in 0..5 {
        for i in 0..60 {
            append(&mut repo, coll, &format!("{round} {i:040}"));
        }
        repo.checkpoint().unwrap();
        drop(repo);
        repo = Repository::open_with(&path, opts()).unwrap();
    }
    assert!(repo.info().log_start > 100, "old segments went");
    // Commits after the last checkpoint, over a roll, then a crash.
    for i in 0..40 {
        append(&mut repo, coll, &format!("tail {i:040}"));
    }
    repo.sync().unwrap();
    let last = repo.info().last_commit;
    drop(repo);
    let repo = Repository::open_with(&path, opts()).unwrap();
    assert_eq!(repo.info().last_commit, last);
}

/// A snapshot only pins the index: the copy is made on another thread,
/// the next checkpoint due is put off meanwhile, a required one waits for
/// the copy, and the copy holds the index as of the snapshot, not the
/// entries the later checkpoint wrote.
#[test]
fn a_snapshot_copies_its_index_apart_and_checkpoints_wait_for_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RepoOptions {
        checkpoint_interval: std::time::Duration::ZERO,
        ..Default::default()
    };
    let path = dir.path().join("r");
    let mut repo = Repository::create_with(&path, 1, "a:1", opts).unwrap();
    let (_, coll) = setup_root_with_collection(&mut repo);
    append(&mut repo, coll, "before");
    let scratch = dir.path().join("scratch");
    let pending = repo.snapshot_deferred(&scratch).unwrap();
    let pinned = fs::read(path.join(index_map::INDEX_FILE)).unwrap();
    assert!(
        !scratch.join(index_map::INDEX_FILE).exists(),
        "the storage thread made no copy"
    );

    // New objects: the next checkpoint writes their entries.
    let (_, other) = setup_root_with_collection(&mut repo);
    append(&mut repo, other, "after");
    assert!(
        !repo.maybe_checkpoint().unwrap(),
        "a checkpoint due is put off while the copy is pending"
    );
    let started = std::time::Instant::now();
    let copier = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        pending.complete()
    });
    repo.checkpoint().unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "a required checkpoint waited for the copy"
    );
    let snapshot = copier.join().unwrap().unwrap();
    let copy = fs::read(scratch.join(index_map::INDEX_FILE)).unwrap();
    assert_eq!(copy, pinned, "the copy is the index as of the snapshot");
    assert_ne!(
        fs::read(path.join(index_map::INDEX_FILE)).unwrap(),
        pinned,
        "the later checkpoint wrote new entries"
    );
    assert_eq!(snapshot.files[1].len, pinned.len() as u64);
    // With the copy made, checkpoints go on as due.
    append(&mut repo, other, "later");
    assert!(repo.maybe_checkpoint().unwrap());
}

/// A checkpointed collection whose files are gone is an error naming the
/// missing file, at open when the other file is still there (recovery
/// cuts each collection with files), else at its first read or append;
/// empty files are never created in place of its elements.
#[test]
fn a_collection_whose_files_are_gone_is_named_never_recreated_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let mut repo = new_repo(dir.path());
    let (_, coll) = setup_root_with_collection(&mut repo);
    for i in 0..5 {
        append(&mut repo, coll, &format!("e{i}"));
    }
    repo.checkpoint().unwrap();
    drop(repo);
    let idx = path.join("coll").join(format!("{coll}.idx"));
    let dat = path.join("coll").join(format!("{coll}.dat"));

    // Only the data file gone: refused at open.
    fs::rename(&dat, dir.path().join("dat-aside")).unwrap();
    let err = Repository::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains(&dat.display().to_string()) && err.contains("is missing"),
        "{err}"
    );
    assert!(!dat.exists(), "created in its place");
    fs::rename(dir.path().join("dat-aside"), &dat).unwrap();

    // Both gone: found at the first read and at an append.
    fs::rename(&idx, dir.path().join("idx-aside")).unwrap();
    fs::rename(&dat, dir.path().join("dat-aside")).unwrap();
    let mut repo = Repository::open(&path).unwrap();
    let err = repo.collection_range(coll, 0, 5).unwrap_err().to_string();
    assert!(
        err.contains(&idx.display().to_string()) && err.contains("holds 5 element"),
        "{err}"
    );
    let err = repo
        .commit(CommitRequest {
            appends: vec![AppendRequest {
                coll: ObjRef::Oid(coll),
                value: s("more"),
            }],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("is missing"), "{err}");
    assert!(!idx.exists() && !dat.exists(), "created in their place");
    drop(repo);
    fs::rename(dir.path().join("idx-aside"), &idx).unwrap();
    fs::rename(dir.path().join("dat-aside"), &dat).unwrap();
    // The append was logged before its element could be written: put
    // back, the files get it at the replay.
    let mut repo = Repository::open(&path).unwrap();
    let got = repo.collection_range(coll, 0, 10).unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(got[5], s("more"));
}
