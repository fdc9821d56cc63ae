//! Storage-engine benchmark: prints the figures quoted in the storage issue.
//!
//! `cargo bench --bench storage` (add `-- quick` for a smaller run). Each
//! figure is the median of several runs where it is cheap to repeat.

use std::time::{Duration, Instant};

use magma::storage::object::{encode_value, COLLECTION_CLASS};
use magma::storage::{AppendRequest, CommitRequest, NewRequest, ObjRef, Repository};
use rmpv::Value;

mod common;
use common::median;

fn new_collection(repo: &mut Repository) -> u64 {
    let c = repo
        .commit(CommitRequest {
            news: vec![NewRequest {
                temp_id: 1,
                class: COLLECTION_CLASS.into(),
                value: vec![],
            }],
            set_root: Some(ObjRef::New(1)),
            ..Default::default()
        })
        .unwrap();
    c.new_oids[0].1
}

fn append_req(coll: u64, v: &str) -> CommitRequest {
    CommitRequest {
        appends: vec![AppendRequest {
            coll: ObjRef::Oid(coll),
            value: encode_value(&Value::from(v)),
        }],
        ..Default::default()
    }
}

/// One append per commit; `sync_every` commits share one fsync (1 = every
/// commit waits for its own fsync, as a lone client under group commit).
fn commits_per_sec(n: u64, sync_every: u64, interval: Option<Duration>) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = Repository::create(&dir.path().join("r"), 1, "127.0.0.1:1").unwrap();
    let coll = new_collection(&mut repo);
    let mut last_sync = Instant::now();
    let start = Instant::now();
    for i in 0..n {
        let c = repo.commit(append_req(coll, &format!("{i:016}"))).unwrap();
        match interval {
            Some(iv) => {
                if last_sync.elapsed() >= iv {
                    c.sync.sync().unwrap();
                    last_sync = Instant::now();
                }
            }
            None => {
                if (i + 1) % sync_every == 0 {
                    c.sync.sync().unwrap();
                }
            }
        }
        repo.maybe_checkpoint().unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn apply_rate(n: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Repository::create(&dir.path().join("p"), 1, "127.0.0.1:1").unwrap();
    let coll = new_collection(&mut primary);
    let snap = primary.snapshot(&dir.path().join("scratch")).unwrap();
    for i in 0..n {
        primary
            .commit(append_req(coll, &format!("{i:016}")))
            .unwrap();
    }
    let records = primary
        .read_records(snap.commit + 1, usize::MAX, usize::MAX)
        .unwrap();
    snap.copy_to(&dir.path().join("s")).unwrap();
    let mut replica = Repository::open(&dir.path().join("s")).unwrap();
    let start = Instant::now();
    for r in &records {
        replica.apply_record(r).unwrap();
        replica.maybe_checkpoint().unwrap();
    }
    replica.sync().unwrap();
    let rate = records.len() as f64 / start.elapsed().as_secs_f64();
    assert_eq!(replica.digest().unwrap(), primary.digest().unwrap());
    rate
}

/// A repository at `path` holding `n` small objects, checkpointed.
fn with_objects(path: &std::path::Path, n: u64) -> Repository {
    let mut repo = Repository::create(path, 1, "127.0.0.1:1").unwrap();
    let batch = 1000;
    for b in 0..(n / batch) {
        repo.commit(CommitRequest {
            news: (0..batch)
                .map(|i| NewRequest {
                    temp_id: i,
                    class: "Item".into(),
                    value: encode_value(&Value::from(format!("object {}", b * batch + i))),
                })
                .collect(),
            ..Default::default()
        })
        .unwrap();
        repo.maybe_checkpoint().unwrap();
    }
    repo.checkpoint().unwrap();
    repo
}

/// Build a repository of `n` objects, then time opening it: once after a
/// clean checkpoint, once with the last `replay` commits to replay.
fn open_times(n: u64, replay: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    drop(with_objects(&path, n));
    let t = Instant::now();
    let repo = Repository::open(&path).unwrap();
    let clean = t.elapsed().as_secs_f64();
    assert!(repo.info().next_oid > n);
    drop(repo);
    {
        let mut repo = Repository::open(&path).unwrap();
        let coll = new_collection(&mut repo);
        for i in 0..replay {
            repo.commit(append_req(coll, &format!("{i:016}"))).unwrap();
        }
        repo.sync().unwrap();
        // Dropped without a checkpoint: the next open replays.
    }
    let t = Instant::now();
    let repo = Repository::open(&path).unwrap();
    let with_replay = t.elapsed().as_secs_f64();
    assert!(repo.info().last_commit >= replay);
    (clean, with_replay)
}

fn bytes_per_append(n: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut repo = Repository::create(&path, 1, "127.0.0.1:1").unwrap();
    let coll = new_collection(&mut repo);
    // Data: objects.dat and the collection files; the log is counted by
    // its records (its preallocated zeros are not data).
    let data = |p: &std::path::Path| walk(&p.join("coll")) + walk_file(&p.join("objects.dat"));
    repo.checkpoint().unwrap();
    let data_before = data(&path);
    let log_before = repo.log_disk_bytes();
    for i in 0..n {
        // 16-byte strings, one append per commit.
        repo.commit(append_req(coll, &format!("{i:016}"))).unwrap();
        repo.maybe_checkpoint().unwrap();
    }
    repo.checkpoint().unwrap();
    let log = repo.log_disk_bytes() - log_before;
    let data = data(&path) - data_before;
    (data as f64 / n as f64, log as f64 / n as f64)
}

fn walk_file(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn walk(p: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            total += walk(&e.path());
        } else {
            total += m.len();
        }
    }
    total
}

/// Ten million short strings in one collection, a thousand per commit:
/// time, bytes, and a range read at the far end.
fn big_collection(n: u64) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut repo = Repository::create(&path, 1, "127.0.0.1:1").unwrap();
    let coll = new_collection(&mut repo);
    let start = Instant::now();
    let batch = 1000;
    for b in 0..(n / batch) {
        repo.commit(CommitRequest {
            appends: (0..batch)
                .map(|i| AppendRequest {
                    coll: ObjRef::Oid(coll),
                    value: encode_value(&Value::from(format!("{:016}", b * batch + i))),
                })
                .collect(),
            ..Default::default()
        })
        .unwrap();
        repo.maybe_checkpoint().unwrap();
    }
    repo.checkpoint().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let t = Instant::now();
    let tail = repo.collection_range(coll, n - 1000, 1000).unwrap();
    let read_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(tail.len(), 1000);
    let bytes = walk(&path.join("coll")) as f64 / n as f64;
    (secs, bytes, read_ms)
}

/// A backup's snapshot of `n` objects, `runs` times: the median ms the
/// repository's thread is held (checkpoint, pin of the index) and the
/// median ms of the index copy made apart (`PendingSnapshot::complete`).
fn snapshot_times(n: u64, runs: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = with_objects(&dir.path().join("r"), n);
    let (mut held, mut apart) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let pending = repo.snapshot_deferred(&dir.path().join("scratch")).unwrap();
        held.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        pending.complete().unwrap();
        apart.push(t.elapsed().as_secs_f64() * 1e3);
        repo.backup_ended(None, false);
    }
    (median(&held), median(&apart))
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let runs = if quick { 1 } else { 3 };
    let scale = if quick { 10 } else { 1 };
    println!(
        "magma storage benchmark ({} core(s))",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let group1: Vec<f64> = (0..runs)
        .map(|_| commits_per_sec(5_000 / scale, 1, None))
        .collect();
    println!(
        "commits/s, one append each, fsync per commit (group, 1 writer): median {:.0}",
        median(&group1)
    );
    let group8: Vec<f64> = (0..runs)
        .map(|_| commits_per_sec(40_000 / scale, 8, None))
        .collect();
    println!(
        "commits/s, one append each, 8 commits per fsync (group, 8 writers): median {:.0}",
        median(&group8)
    );
    let interval: Vec<f64> = (0..runs)
        .map(|_| commits_per_sec(300_000 / scale, 0, Some(Duration::from_millis(1000))))
        .collect();
    println!(
        "commits/s, one append each, interval:1000 flush: median {:.0}",
        median(&interval)
    );
    let apply: Vec<f64> = (0..runs).map(|_| apply_rate(300_000 / scale)).collect();
    println!(
        "records/s applied as a secondary (no fsync per record): median {:.0}",
        median(&apply)
    );
    let (clean, replay) = open_times(1_000_000 / scale, 50_000 / scale);
    println!(
        "open {} objects: {:.3} s after a checkpoint; {:.3} s replaying {} commits",
        1_000_000 / scale,
        clean,
        replay,
        50_000 / scale
    );
    let (held, apart) = snapshot_times(1_000_000 / scale, 5);
    println!(
        "backup snapshot of {} objects: the repository's thread held {held:.1} ms \
         (checkpoint, index pinned); the index copy made apart {apart:.1} ms (medians of 5)",
        1_000_000 / scale
    );
    let big = 10_000_000 / scale;
    let (secs, bytes, read_ms) = big_collection(big);
    println!(
        "{big} short strings into one collection (1000 per commit): {secs:.1} s, {bytes:.1} bytes each, last 1000 read in {read_ms:.2} ms"
    );
    let (data, log) = bytes_per_append(1_000_000 / scale);
    println!(
        "bytes on disk per appended 16-byte string: {data:.1} in the repository, {log:.1} in the commit log (bounded by retention)"
    );
}
