//! The content digest of a repository, and [`DigestView`]: a consistent,
//! read-only view of a live repository that computes it on another thread.
//!
//! [`digest_graph`] is the one definition of the digest: breadth first from
//! the root anchor (oid 0) over references in object values and in the
//! elements of large collections, hashing each object's oid, version,
//! class and value, a collection's length and elements, and a dangling
//! reference as "absent". `Repository::digest` runs it on the repository
//! itself; a server runs it on a [`DigestView`] instead, so a digest of a
//! large repository never holds up commits and reads: the storage thread
//! only checkpoints and pins `index.map` (`index_copy`); the view copies
//! it on its own thread (a sequential write of 32 bytes per oid) before it
//! traverses, and reads files that later commits never rewrite
//! (`objects.dat` and the collection files below the checkpointed lengths)
//! through their own file handles.
//!
//! The index copy is an unnamed file in the repository directory
//! (`O_TMPFILE`, or a name removed at once where the file system has no
//! such files): nothing is left behind, even by a crash. This module must
//! never write to the repository's own files.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::Path;

use crate::storage::error::{Result, StorageError};
use crate::storage::index_copy::IndexCopy;
use crate::storage::index_map::IndexReader;
use crate::storage::object::{references_in, StoredObject};
use crate::storage::object_store::{CollectionReader, ObjectFile};
use crate::types::{CommitNumber, Hash, Oid, ROOT_ANCHOR};

/// Elements read at once while hashing a collection, at most ...
pub(crate) const PAGE_ELEMENTS: u64 = 4096;
/// ... and about this many bytes (a digest of huge elements stays small).
pub(crate) const PAGE_BYTES: u64 = 8 << 20;

/// What the digest traversal reads.
pub(crate) trait GraphSource {
    fn object(&mut self, oid: Oid) -> Result<Option<StoredObject>>;
    /// Elements from `at` on (a page) of the collection `coll` of `len`.
    fn elements(&mut self, coll: Oid, len: u64, at: u64) -> Result<Vec<Vec<u8>>>;
}

/// The digest of everything reachable from the root anchor (module doc).
pub(crate) fn digest_graph(src: &mut impl GraphSource) -> Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut seen = HashSet::from([ROOT_ANCHOR]);
    let mut queue = VecDeque::from([ROOT_ANCHOR]);
    let mut push_refs = |bytes: &[u8], queue: &mut VecDeque<Oid>| -> Result<()> {
        for r in references_in(bytes)? {
            if seen.insert(r) {
                queue.push_back(r);
            }
        }
        Ok(())
    };
    while let Some(oid) = queue.pop_front() {
        let Some(obj) = src.object(oid)? else {
            // A dangling reference: part of the content as "absent".
            hasher.update(&oid.to_le_bytes());
            hasher.update(b"absent");
            continue;
        };
        hasher.update(&oid.to_le_bytes());
        hasher.update(&obj.version.to_le_bytes());
        hasher.update(&(obj.class.len() as u64).to_le_bytes());
        hasher.update(obj.class.as_bytes());
        hasher.update(&(obj.value.len() as u64).to_le_bytes());
        hasher.update(&obj.value);
        push_refs(&obj.value, &mut queue)?;
        if let Some(len) = obj.collection_len {
            hasher.update(&len.to_le_bytes());
            let mut at = 0;
            while at < len {
                let page = src.elements(oid, len, at)?;
                if page.is_empty() {
                    return Err(StorageError::Corrupted(format!(
                        "collection {oid} of length {len} has no element {at}"
                    )));
                }
                for v in page {
                    hasher.update(&(v.len() as u64).to_le_bytes());
                    hasher.update(&v);
                    push_refs(&v, &mut queue)?;
                    at += 1;
                }
            }
        }
    }
    Ok(*hasher.finalize().as_bytes())
}

/// A repository as of one checkpointed commit, read through its own file
/// handles (module doc). Made by `Repository::digest_view`; `Send`, so the
/// digest runs on any thread while the repository goes on.
pub struct DigestView {
    commit: CommitNumber,
    dir: std::path::PathBuf,
    /// The live index, pinned as of `commit`: copied first by `digest`.
    index: IndexCopy,
    objects: ObjectFile,
}

/// What a [`DigestView`] reads once its index is copied.
struct ViewReader {
    dir: std::path::PathBuf,
    index: IndexReader,
    objects: ObjectFile,
    colls: HashMap<Oid, CollectionReader>,
}

impl DigestView {
    /// `index` is the live index, pinned as checkpointed at `commit`;
    /// `objects` reads `objects.dat` up to its checkpointed length.
    pub(crate) fn new(
        dir: &Path,
        commit: CommitNumber,
        index: IndexCopy,
        objects: ObjectFile,
    ) -> DigestView {
        DigestView {
            commit,
            dir: dir.to_path_buf(),
            index,
            objects,
        }
    }

    /// The commit the view shows.
    pub fn commit(&self) -> CommitNumber {
        self.commit
    }

    /// The repository's digest as of [`DigestView::commit`]: the same as
    /// `Repository::digest` then. Copies the index first (which releases
    /// the repository's next checkpoint), then traverses.
    pub fn digest(self) -> Result<(CommitNumber, Hash)> {
        let DigestView {
            commit,
            dir,
            index,
            objects,
        } = self;
        // A failure here harms nothing but the digest (not fatal).
        let mut copy = unnamed_file_in(&dir).map_err(|e| {
            StorageError::backup_io(format!("copying the index in {}", dir.display()), e)
        })?;
        index.write_into(&mut copy)?;
        // A copy that cannot be mapped harms nothing but the digest: never
        // an error the server would take for its own files'.
        let index =
            IndexReader::from_file(copy, &dir.join("(index copy for a digest)")).map_err(|e| {
                match e {
                    StorageError::Io { context, source } => {
                        StorageError::BackupIo { context, source }
                    }
                    StorageError::Corrupted(what) => StorageError::backup_io(
                        what,
                        std::io::Error::other("a bad copy of the index"),
                    ),
                    other => other,
                }
            })?;
        let mut reader = ViewReader {
            dir,
            index,
            objects,
            colls: HashMap::new(),
        };
        let hash = digest_graph(&mut reader)?;
        Ok((commit, hash))
    }
}

impl GraphSource for ViewReader {
    fn object(&mut self, oid: Oid) -> Result<Option<StoredObject>> {
        match self.index.get(oid)? {
            Some(e) => self.objects.stored(oid, &e).map(Some),
            None => Ok(None),
        }
    }

    fn elements(&mut self, coll: Oid, len: u64, at: u64) -> Result<Vec<Vec<u8>>> {
        let reader = match self.colls.entry(coll) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(CollectionReader::open(&self.dir, coll)?)
            }
        };
        reader.range(len, at, PAGE_ELEMENTS, PAGE_BYTES)
    }
}

/// A new file in `dir` that has no name: the kernel frees it when the last
/// handle closes.
fn unnamed_file_in(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(f) => Ok(f),
        // A file system without O_TMPFILE: a fresh name, removed at once.
        Err(_) => {
            let path = dir.join(format!(".digest-{:016x}", rand::random::<u64>()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use crate::storage::object::{encode_value, ref_value, COLLECTION_CLASS, TEMP_REF_EXT};
    use crate::storage::{
        AppendRequest, CommitRequest, NewRequest, ObjRef, PutRequest, Repository,
    };

    fn new(temp_id: u64, class: &str, value: Value) -> NewRequest {
        NewRequest {
            temp_id,
            class: class.into(),
            value: encode_value(&value),
        }
    }

    /// A view's digest is the repository's as of the view's commit, however
    /// the repository changes meanwhile (objects rewritten, collections
    /// grown, the index checkpointed over).
    #[test]
    fn a_view_digests_its_commit_while_the_repository_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut repo = Repository::create(&dir.path().join("r"), 7, "127.0.0.1:1").unwrap();
        let c = repo
            .commit(CommitRequest {
                news: vec![
                    new(1, "Note", Value::from("first")),
                    new(2, COLLECTION_CLASS, Value::Nil),
                    new(
                        3,
                        "Root",
                        Value::Array(vec![
                            Value::Ext(TEMP_REF_EXT, 1u64.to_be_bytes().to_vec()),
                            Value::Ext(TEMP_REF_EXT, 2u64.to_be_bytes().to_vec()),
                            ref_value(999_999),
                        ]),
                    ),
                ],
                set_root: Some(ObjRef::New(3)),
                ..Default::default()
            })
            .unwrap();
        let oid = |t: u64| c.new_oids.iter().find(|(x, _)| *x == t).unwrap().1;
        let (note, coll) = (oid(1), oid(2));
        let append = |repo: &mut Repository, n: u64| {
            repo.commit(CommitRequest {
                appends: (0..n)
                    .map(|i| AppendRequest {
                        coll: ObjRef::Oid(coll),
                        value: encode_value(&Value::from(format!("e{i}"))),
                    })
                    .collect(),
                ..Default::default()
            })
            .unwrap()
        };
        // More than a page of elements.
        append(&mut repo, 5000);
        let before = repo.digest().unwrap();
        let view = repo.digest_view().unwrap();
        assert_eq!(view.commit(), before.0);
        // The view copies the pinned index on its thread; the checkpoint
        // below waits for that copy, then the traversal and the repository
        // go on side by side.
        let on_another_thread = std::thread::spawn(move || view.digest());

        let version = repo.get(note).unwrap().unwrap().version;
        repo.commit(CommitRequest {
            puts: vec![PutRequest {
                oid: note,
                expected_version: version,
                class: "Note".into(),
                value: encode_value(&Value::from("second")),
            }],
            ..Default::default()
        })
        .unwrap();
        append(&mut repo, 10);
        repo.checkpoint().unwrap();
        let after = repo.digest().unwrap();
        assert_ne!(after, before);

        assert_eq!(on_another_thread.join().unwrap().unwrap(), before);
        // Nothing is left in the directory by the view's index copy.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("r"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("digest"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
