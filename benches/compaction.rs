//! Compaction benchmark: the figures quoted in issue 7's closing note.
//!
//! `cargo bench --bench compaction` (10^6 objects, half of them garbage;
//! `-- quick` for 10^5; `MAGMA_BENCH_DIR` chooses where the repositories
//! are built, default the system temp directory).
//!
//! 1. Builds a repository with the storage library: a domain root holding a
//!    large collection of pages; each batch commits 1000 items and a page
//!    referencing all of them, appends the page, then rewrites the page to
//!    reference only the even items. Half of the items become garbage, and
//!    every page leaves a superseded version behind.
//! 2. Snapshots it into a backup (`Repository::snapshot` + `copy_to`).
//! 3. Times `storage::compact::compact` on the backup and prints the sizes
//!    before and after (whole directory, then `objects.dat` and `index.map`:
//!    the index is an array by oid and oids are kept, so it cannot shrink),
//!    the ratio and the seconds; then checks that the copy's digest equals
//!    the source's (not timed).

use std::path::PathBuf;
use std::time::Instant;

use magma::storage::compact::compact;
use magma::storage::object::{encode_value, COLLECTION_CLASS, REF_EXT, TEMP_REF_EXT};
use magma::storage::{
    AppendRequest, CommitRequest, NewRequest, ObjRef, PutRequest, RepoOptions, Repository,
};
use rmpv::Value;

const BATCH: u64 = 1000;
const MIB: u64 = 1024 * 1024;

fn ext(tag: i8, id: u64) -> Value {
    Value::Ext(tag, id.to_be_bytes().to_vec())
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let objects: u64 = if quick { 100_000 } else { 1_000_000 };
    let base = std::env::var_os("MAGMA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("magma-compaction-bench-")
        .tempdir_in(base)
        .unwrap();
    let opts = RepoOptions {
        max_log_bytes: 64 * MIB,
        ..RepoOptions::default()
    };

    let started = Instant::now();
    let mut repo = Repository::create_with(&tmp.path().join("live"), 0, "127.0.0.1:1", opts)
        .expect("create the source repository");
    let c = repo
        .commit(CommitRequest {
            news: vec![
                NewRequest {
                    temp_id: 1,
                    class: COLLECTION_CLASS.into(),
                    value: vec![],
                },
                NewRequest {
                    temp_id: 2,
                    class: "Domain".into(),
                    value: encode_value(&Value::Map(vec![("pages".into(), ext(TEMP_REF_EXT, 1))])),
                },
            ],
            set_root: Some(ObjRef::New(2)),
            ..Default::default()
        })
        .unwrap();
    let pages = c.new_oids[0].1;
    let filler = "x".repeat(48);
    for batch in 0..objects / BATCH {
        let mut news: Vec<NewRequest> = (1..=BATCH)
            .map(|i| NewRequest {
                temp_id: i,
                class: "Item".into(),
                value: encode_value(&Value::Map(vec![
                    ("n".into(), Value::from(batch * BATCH + i)),
                    ("text".into(), Value::from(filler.as_str())),
                ])),
            })
            .collect();
        let all = (1..=BATCH).map(|i| ext(TEMP_REF_EXT, i)).collect();
        news.push(NewRequest {
            temp_id: BATCH + 1,
            class: "Page".into(),
            value: encode_value(&Value::Array(all)),
        });
        let made = repo
            .commit(CommitRequest {
                news,
                appends: vec![AppendRequest {
                    coll: ObjRef::Oid(pages),
                    value: encode_value(&ext(TEMP_REF_EXT, BATCH + 1)),
                }],
                ..Default::default()
            })
            .unwrap();
        let oid = |t: u64| made.new_oids[(t - 1) as usize].1;
        let even = (1..=BATCH)
            .filter(|i| i % 2 == 0)
            .map(|i| ext(REF_EXT, oid(i)))
            .collect();
        repo.commit(CommitRequest {
            puts: vec![PutRequest {
                oid: oid(BATCH + 1),
                expected_version: made.number,
                class: "Page".into(),
                value: encode_value(&Value::Array(even)),
            }],
            ..Default::default()
        })
        .unwrap();
        repo.maybe_checkpoint().unwrap();
    }
    let snapshot = repo.snapshot(&tmp.path().join("scratch")).unwrap();
    let backup = tmp.path().join("backup");
    snapshot.copy_to(&backup).unwrap();
    println!(
        "source: {objects} items ({} garbage) in {} pages, built and backed up in {:.1} s",
        objects / 2,
        objects / BATCH,
        started.elapsed().as_secs_f64()
    );

    let out = tmp.path().join("compacted");
    let r = compact(&backup, &out, &mut |_| {}).expect("compaction");
    let secs = r.elapsed.as_secs_f64();
    println!(
        "compaction: {} objects before, {} kept, {} dropped; {} elements in {} collections",
        r.objects_before,
        r.objects_kept,
        r.objects_dropped(),
        r.elements_kept,
        r.collections_kept
    );
    println!(
        "size: {} -> {} bytes ({:.1} -> {:.1} MiB), ratio {:.3} (after/before); {secs:.2} s, {:.0} objects scanned/s",
        r.bytes_before,
        r.bytes_after,
        r.bytes_before as f64 / MIB as f64,
        r.bytes_after as f64 / MIB as f64,
        r.ratio(),
        r.objects_kept as f64 / secs
    );

    let size = |dir: &std::path::Path, file: &str| std::fs::metadata(dir.join(file)).unwrap().len();
    for file in ["objects.dat", "index.map"] {
        let (b, a) = (size(&backup, file), size(&out, file));
        println!(
            "  {file}: {b} -> {a} bytes, ratio {:.3}",
            a as f64 / b as f64
        );
    }

    let t = Instant::now();
    let want = repo.digest().unwrap();
    let got = Repository::open(&out).unwrap().digest().unwrap();
    assert_eq!(got, want, "the compacted copy's digest differs");
    println!(
        "digest of the copy equals the source's (checked in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
}
