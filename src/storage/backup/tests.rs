//! Backups on disk: chunked copies that verify, every kind of damage that
//! `verify` must name, resumed receiving, and the target refusals.

use std::fs;
use std::path::Path;

use rmpv::Value;

use super::*;
use crate::storage::object::{encode_value, COLLECTION_CLASS};
use crate::storage::{AppendRequest, CommitRequest, NewRequest, ObjRef, Repository};

/// A repository with a collection of `n` elements and one large object;
/// returns it with the collection's oid.
fn populated(dir: &Path, n: usize) -> (Repository, u64) {
    let mut repo = Repository::create(&dir.join("live"), 7, "127.0.0.1:1").unwrap();
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
                    class: "Blob".into(),
                    value: encode_value(&Value::from("x".repeat(300_000))),
                },
            ],
            set_root: Some(ObjRef::New(1)),
            ..Default::default()
        })
        .unwrap();
    let coll = c.new_oids[0].1;
    for i in 0..n {
        repo.commit(CommitRequest {
            appends: vec![AppendRequest {
                coll: ObjRef::Oid(coll),
                value: encode_value(&Value::from(format!("element-{i}"))),
            }],
            ..Default::default()
        })
        .unwrap();
    }
    (repo, coll)
}

fn problems(dir: &Path) -> Vec<String> {
    verify(dir)
        .expect_err("the backup should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn a_stepped_copy_is_a_valid_backup_at_the_snapshot_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut repo, coll) = populated(tmp.path(), 100);
    let snap = repo.snapshot(&tmp.path().join("scratch")).unwrap();
    let target = tmp.path().join("b1");
    prepare_target(&tmp.path().join("live"), &target).unwrap();
    assert!(target.join(INCOMPLETE_FILE).exists());
    let mut copy = SnapshotCopy::new(snap.clone(), &target, "test");
    let total = copy.bytes_total();
    // Commits go on between steps; the copy holds the snapshot only.
    let mut done = 0;
    let mut steps = 0;
    loop {
        let step = copy.step(64 * 1024).unwrap();
        done += step.bytes;
        steps += 1;
        repo.commit(CommitRequest {
            appends: vec![AppendRequest {
                coll: ObjRef::Oid(coll),
                value: encode_value(&Value::from("later")),
            }],
            ..Default::default()
        })
        .unwrap();
        if step.complete {
            break;
        }
        assert!(
            !target.join(MANIFEST_FILE).exists(),
            "manifest before the end"
        );
    }
    assert_eq!(done, total);
    assert!(steps > 5, "64 KiB steps over {total} bytes took {steps}");
    assert!(!target.join(INCOMPLETE_FILE).exists());
    let v = verify(&target).unwrap();
    assert_eq!(v.snapshot_commit, snap.commit);
    assert_eq!(v.repository_id, snap.repository_id.to_string());
    let manifest = Manifest::read(&target).unwrap();
    assert_eq!(manifest.files.last().unwrap().path, "header");
    let copy = Repository::open(&target).unwrap();
    assert!(copy.info().restore_mode);
    assert_eq!(copy.info().last_commit, snap.commit);
    assert_eq!(copy.collection_len(coll).unwrap(), 100);
}

#[test]
fn verify_names_each_kind_of_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut repo, _) = populated(tmp.path(), 10);
    let snap = repo.snapshot(&tmp.path().join("scratch")).unwrap();
    let good = tmp.path().join("good");
    snap.copy_to(&good).unwrap();
    verify(&good).unwrap();
    let copy_of = |name: &str| {
        let to = tmp.path().join(name);
        fs::create_dir_all(to.join("coll")).unwrap();
        fs::create_dir_all(to.join("log")).unwrap();
        for entry in walk(&good) {
            fs::copy(good.join(&entry), to.join(&entry)).unwrap();
        }
        to
    };

    let d = copy_of("flipped");
    let mut bytes = fs::read(d.join("objects.dat")).unwrap();
    bytes[100] ^= 1;
    fs::write(d.join("objects.dat"), bytes).unwrap();
    let p = problems(&d);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("objects.dat: BLAKE3 "), "{p:?}");

    let d = copy_of("short");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(d.join("index.map"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1).unwrap();
    assert_eq!(
        problems(&d),
        [format!(
            "index.map: size {} bytes, manifest says {len}",
            len - 1
        )]
    );

    let d = copy_of("missing");
    let coll_file = walk(&d)
        .into_iter()
        .find(|p| p.starts_with("coll/"))
        .unwrap();
    fs::remove_file(d.join(&coll_file)).unwrap();
    assert_eq!(problems(&d), [format!("{coll_file}: missing")]);

    let d = copy_of("extra");
    fs::write(d.join("log/1.log"), b"records").unwrap();
    assert_eq!(problems(&d), ["log/1.log: not listed in the manifest"]);

    let d = copy_of("opened");
    drop(Repository::open(&d).unwrap());
    let p = problems(&d);
    assert!(
        p.iter().any(|x| x.contains("server id")),
        "a copy a server opened is no longer pristine: {p:?}"
    );

    let d = copy_of("garbled-manifest");
    fs::write(d.join(MANIFEST_FILE), b"{not json").unwrap();
    let p = problems(&d);
    assert!(p[0].starts_with("bad manifest: "), "{p:?}");
}

#[test]
fn a_header_without_the_restore_bit_is_rejected_even_with_a_matching_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut repo, _) = populated(tmp.path(), 3);
    let snap = repo.snapshot(&tmp.path().join("scratch")).unwrap();
    let d = tmp.path().join("b");
    snap.copy_to(&d).unwrap();
    let mut header = crate::storage::Header::read(&d).unwrap();
    header.restore_mode = false;
    fs::write(d.join("header"), header.encode()).unwrap();
    // Re-seal the manifest over the altered header so only the bit is wrong.
    let mut m = Manifest::read(&d).unwrap();
    let h = m.files.iter_mut().find(|f| f.path == "header").unwrap();
    h.blake3 = crate::types::hex(blake3::hash(&header.encode()).as_bytes());
    m.write(&d).unwrap();
    assert_eq!(
        problems(&d),
        ["header: the restore-mode bit is clear, expected set"]
    );
}

#[test]
fn an_interrupted_copy_is_incomplete_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut repo, _) = populated(tmp.path(), 10);
    let snap = repo.snapshot(&tmp.path().join("scratch")).unwrap();
    let target = tmp.path().join("b");
    prepare_target(&tmp.path().join("live"), &target).unwrap();
    let mut copy = SnapshotCopy::new(snap, &target, "test");
    copy.step(1000).unwrap();
    copy.mark_incomplete("aborted", "aborted by an operator")
        .unwrap();
    let p = problems(&target);
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("incomplete backup: no MANIFEST"), "{p:?}");
    assert!(p[0].contains("aborted by an operator"), "{p:?}");
}

#[test]
fn a_receiver_resumes_from_what_is_on_disk_with_the_same_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut r = Receiver::open(tmp.path(), "coll/5.dat", data.len() as u64).unwrap();
    r.write(&data[..1_234_567]).unwrap();
    drop(r);
    // A second run: the prefix is kept and hashed, the rest appended.
    let mut r = Receiver::open(tmp.path(), "coll/5.dat", data.len() as u64).unwrap();
    assert_eq!(r.received(), 1_234_567);
    r.write(&data[1_234_567..]).unwrap();
    assert!(r.write(b"one too many").is_err());
    let entry = r.finish().unwrap();
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(
        entry.blake3,
        crate::types::hex(blake3::hash(&data).as_bytes())
    );
    assert_eq!(fs::read(tmp.path().join("coll/5.dat")).unwrap(), data);
    assert!(Receiver::open(tmp.path(), "../escape", 1).is_err());
    assert!(Receiver::open(tmp.path(), "/etc/passwd", 1).is_err());
}

#[test]
fn targets_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    fs::create_dir_all(&live).unwrap();
    let refuse = |t: &Path| prepare_target(&live, t).unwrap_err().to_string();
    assert!(refuse(Path::new("relative/dir")).contains("absolute"));
    assert!(refuse(&live).contains("live repository"));
    assert!(refuse(&live.join("sub/deeper")).contains("live repository"));
    assert!(refuse(&tmp.path().join("x/../live/y")).contains(".."));
    let existing = tmp.path().join("existing");
    fs::create_dir(&existing).unwrap();
    assert!(refuse(&existing).contains("already exists"));
    let file = tmp.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    assert!(refuse(&file.join("sub")).contains("cannot create"));
    let ok = tmp.path().join("new/nested/target");
    prepare_target(&live, &ok).unwrap();
    assert!(ok.join(INCOMPLETE_FILE).exists());
}

/// Every file under `dir`, relative.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["", "coll", "log"] {
        let at = dir.join(sub);
        for e in fs::read_dir(&at).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                out.push(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    out
}
