//! Offline compaction: [`compact`] copies a backup into a new directory,
//! keeping only what is reachable from the root anchor (oid 0), each
//! object at its latest version (the seed's garbage collection; DESIGN.md,
//! "Replication and the node", item 8).
//!
//! The traversal follows references in object values and in the elements
//! of large collections, breadth first, exactly like `Repository::digest`,
//! so the copy has the digest of its source. Every kept object keeps its
//! oid, version, class and value; a kept large collection keeps all its
//! elements. The header is the source's (commit number, chain hash, epoch,
//! repository id, next oid, restore-mode bit, server id 0) with the new
//! length of `objects.dat` and the tombstones bit, so a server started on the copy catches up from
//! the primary from `checkpoint + 1`, as on any backup. The copy is written
//! in the documented formats through the same types a repository uses
//! (`ObjectFile`, `IndexMap`, `Collections`) and sealed like a backup
//! (`storage::backup::seal`: header, then `MANIFEST` last), so `magma
//! verify-backup` accepts it.
//!
//! The target's `index.map` is mapped without a lock file (a backup has
//! none): the directory is new, created by us, and holds no header until
//! the end, so no server can open it meanwhile.
//!
//! Every object of the source that is not kept leaves a tombstone in the
//! copy's `index.map` (the source's own tombstones are kept too), so that a
//! later commit that uses it again is caught (`Repository::dropped_use`)
//! instead of leaving a reference that dangles on this copy only.
//!
//! This module must never write into the source (it opens nothing there for
//! writing, creates no lock file and never opens it as a `Repository`,
//! which would give it a server id), never accept a live repository or one
//! that is not a pristine backup, never write into a path that already
//! exists, and never hold a whole large collection in memory: elements are
//! copied in bounded ranges. Memory is one bit per oid of the source index
//! plus the traversal queue, and a manifest entry (a few hundred bytes) per
//! kept non-empty large collection.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::storage::backup::{
    hash_file, incomplete_text, prepare_target, read_marker, seal, write_marker, Manifest,
    ManifestFile, Problem, TargetRefusal, MANIFEST_FILE,
};
use crate::storage::commit_log::LOG_DIR;
use crate::storage::error::StorageError;
use crate::storage::header::Header;
use crate::storage::index_map::{IndexEntry, IndexMap, IndexReader, INDEX_FILE};
use crate::storage::object::references_in;
use crate::storage::object_store::{
    dat_path, idx_path, CollectionReader, Collections, ObjectFile, COLL_DIR, OBJECTS_FILE,
};
use crate::storage::repository::lock_existing;
use crate::types::{CommitNumber, Oid, RepositoryId, ROOT_ANCHOR};

/// Elements read from the source at once, at most ...
const RANGE_ELEMENTS: u64 = 4096;
/// ... and about this many bytes of element data.
const RANGE_BYTES: u64 = 4 * 1024 * 1024;
/// Objects between two progress reports.
const PROGRESS_EVERY: u64 = 1024;

/// Why a compaction was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(
        "{0} is locked by a running server: compaction reads a backup, never a live \
         repository; take one with `magma backup` and compact that"
    )]
    Live(PathBuf),
    #[error(
        "{0} is not a backup (its restore-mode bit is clear): compaction works on a backup so \
         that the node never stops; take one with `magma backup --server ADDR --to DIR` and \
         compact that"
    )]
    NotABackup(PathBuf),
    #[error("{dir} is not a pristine backup: {why}")]
    NotPristine { dir: PathBuf, why: String },
    #[error("target {0} already exists (compaction writes a new directory)")]
    TargetExists(PathBuf),
    #[error("{0}")]
    Target(String),
    #[error(
        "{0} changed while it was compacted (did a server open it?); the copy is marked \
         incomplete: compact a backup that no server uses"
    )]
    SourceChanged(PathBuf),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Where a compaction is; reported every few objects and collection ranges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactProgress {
    /// Reachable objects copied so far.
    pub objects_scanned: u64,
    /// Objects in the source (reachable or not): the most there can be.
    pub objects_total: u64,
    /// Bytes written to the copy's data files so far.
    pub bytes_written: u64,
}

/// What a finished compaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactReport {
    pub repository_id: RepositoryId,
    /// The commit both directories hold (the header's checkpoint).
    pub commit: CommitNumber,
    /// Objects in the source's index.
    pub objects_before: u64,
    /// Objects reachable from the root anchor, copied.
    pub objects_kept: u64,
    /// Large collections copied, and their elements.
    pub collections_kept: u64,
    pub elements_kept: u64,
    /// Bytes of every file of each directory (data, header, manifest).
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub elapsed: Duration,
}

impl CompactReport {
    /// Objects of the source that were not reachable (superseded versions
    /// are not counted: they were never objects of their own).
    pub fn objects_dropped(&self) -> u64 {
        self.objects_before - self.objects_kept
    }

    /// Size after over size before (1.0: nothing saved).
    pub fn ratio(&self) -> f64 {
        if self.bytes_before == 0 {
            1.0
        } else {
            self.bytes_after as f64 / self.bytes_before as f64
        }
    }
}

/// Copy the backup in `from` into the new directory `to`, keeping only what
/// is reachable (see the module doc). `progress` is called every few
/// objects. On failure after `to` was created, `to` is kept with a
/// `BACKUP-INCOMPLETE` marker saying why, and has no manifest.
pub fn compact(
    from: &Path,
    to: &Path,
    progress: &mut dyn FnMut(&CompactProgress),
) -> Result<CompactReport, CompactError> {
    let started = Instant::now();
    let source = Source::open(from)?;
    let target = absolute(to);
    prepare_target(from, &target).map_err(|refusal| match refusal {
        TargetRefusal::Exists(p) => CompactError::TargetExists(p),
        TargetRefusal::LiveRepository { target, live } => CompactError::Target(format!(
            "target {} lies inside the source {}",
            target.display(),
            live.display()
        )),
        other => CompactError::Target(other.to_string()),
    })?;
    let result = Copier::new(&source, &target)
        .and_then(|copier| copier.run(progress))
        .and_then(|(kept, collections, elements)| {
            source.check_unchanged()?;
            seal(
                &target,
                &kept.header.encode(),
                kept.files,
                kept.header.repository_id,
                kept.header.checkpoint,
                &source.dir.display().to_string(),
            )?;
            Ok(CompactReport {
                repository_id: source.header.repository_id,
                commit: source.header.checkpoint,
                objects_before: source.objects_total,
                objects_kept: kept.objects,
                collections_kept: collections,
                elements_kept: elements,
                bytes_before: dir_bytes(&source.dir),
                bytes_after: dir_bytes(&target),
                elapsed: started.elapsed(),
            })
        });
    // A server that opened the source meanwhile rewrites what is being
    // read, which then looks damaged: say what really happened.
    let result = result.map_err(|e| match (&e, source.check_unchanged()) {
        (CompactError::SourceChanged(_), _) => e,
        (_, Err(changed @ CompactError::SourceChanged(_))) => changed,
        _ => e,
    });
    if let Err(e) = &result {
        let text = incomplete_text(
            "failed",
            &format!("compaction failed: {e}"),
            Some(source.header.checkpoint),
        );
        if let Err(marker) = write_marker(&target, &text) {
            log::warn!("cannot mark {} incomplete: {marker}", target.display());
        }
    }
    result
}

/// `to` made absolute, its existing parent resolved (so `../x` works).
fn absolute(to: &Path) -> PathBuf {
    if to.is_absolute() {
        return to.to_path_buf();
    }
    if let (Some(parent), Some(name)) = (to.parent(), to.file_name()) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(real) = parent.canonicalize() {
            return real.join(name);
        }
    }
    std::path::absolute(to).unwrap_or_else(|_| to.to_path_buf())
}

/// Bytes of the regular files of a repository or backup directory (top
/// level, `coll/`, `log/`).
fn dir_bytes(dir: &Path) -> u64 {
    [dir.to_path_buf(), dir.join(COLL_DIR), dir.join(LOG_DIR)]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// The backup being read, checked to be one.
struct Source {
    dir: PathBuf,
    /// Held when the backup has a lock file, so no server starts on it
    /// meanwhile; without one, `check_unchanged` looks again at the end.
    lock: Option<File>,
    header: Header,
    index: IndexReader,
    objects: ObjectFile,
    objects_total: u64,
}

impl Source {
    fn open(dir: &Path) -> Result<Source, CompactError> {
        let lock = match lock_existing(dir) {
            Err(StorageError::Locked(_)) => return Err(CompactError::Live(dir.to_path_buf())),
            other => other?,
        };
        let header = Header::read(dir)?;
        if !header.restore_mode {
            return Err(CompactError::NotABackup(dir.to_path_buf()));
        }
        let not_pristine = |why: String| CompactError::NotPristine {
            dir: dir.to_path_buf(),
            why,
        };
        if header.server_id != 0 {
            return Err(not_pristine(format!(
                "a server has opened it (server id {:x}), so its files may hold state past \
                 their checkpoint; compact a fresh backup instead",
                header.server_id
            )));
        }
        let manifest = match Manifest::read(dir) {
            Ok(m) => m,
            Err(_) if !dir.join(MANIFEST_FILE).exists() => {
                let incomplete = Problem::Incomplete {
                    marker: read_marker(dir),
                };
                return Err(not_pristine(incomplete.to_string()));
            }
            Err(why) => return Err(not_pristine(why)),
        };
        if manifest.snapshot_commit != header.checkpoint
            || manifest.repository_id != header.repository_id.to_string()
        {
            return Err(not_pristine(format!(
                "its MANIFEST (repository {}, commit {}) does not match its header \
                 (repository {}, commit {})",
                manifest.repository_id,
                manifest.snapshot_commit,
                header.repository_id,
                header.checkpoint
            )));
        }
        let index = IndexReader::open(dir)?;
        let objects = ObjectFile::open_read_only(dir, header.objects_len)?;
        Ok(Source {
            dir: dir.to_path_buf(),
            lock,
            objects_total: index.count(),
            header,
            index,
            objects,
        })
    }

    /// Without the lock, make sure no server opened the backup while it
    /// was read: it would have created a lock file and rewritten the header.
    fn check_unchanged(&self) -> Result<(), CompactError> {
        if self.lock.is_some() {
            return Ok(());
        }
        let changed = match lock_existing(&self.dir) {
            Ok(Some(_)) | Err(StorageError::Locked(_)) => true,
            Ok(None) => Header::read(&self.dir)? != self.header,
            Err(e) => return Err(e.into()),
        };
        if changed {
            return Err(CompactError::SourceChanged(self.dir.clone()));
        }
        Ok(())
    }
}

/// What the copy holds once its data files are durable.
struct Kept {
    header: Header,
    /// The data files with sizes and checksums, for the manifest.
    files: Vec<ManifestFile>,
    objects: u64,
}

/// The traversal and the target's files.
struct Copier<'a> {
    src: &'a Source,
    dir: PathBuf,
    objects: ObjectFile,
    index: IndexMap,
    colls: Collections,
    /// One bit per oid below the source index's capacity: queued already.
    seen: Vec<u64>,
    queue: VecDeque<Oid>,
    /// Collections with at least one element (they have files).
    collections: BTreeSet<Oid>,
    collections_kept: u64,
    elements: u64,
    coll_bytes: u64,
    progress: CompactProgress,
}

impl<'a> Copier<'a> {
    fn new(src: &'a Source, target: &Path) -> Result<Copier<'a>, CompactError> {
        let words = src.index.capacity().div_ceil(64) as usize;
        Ok(Copier {
            src,
            dir: target.to_path_buf(),
            objects: ObjectFile::open(target, 0)?,
            // A new index in the empty target (no checkpoint there yet).
            index: IndexMap::open(target, 0)?,
            colls: Collections::open(target)?,
            seen: vec![0; words],
            queue: VecDeque::new(),
            collections: BTreeSet::new(),
            collections_kept: 0,
            elements: 0,
            coll_bytes: 0,
            progress: CompactProgress {
                objects_total: src.objects_total,
                ..CompactProgress::default()
            },
        })
    }

    /// Queue `oid` unless it was queued before. An oid beyond the index
    /// has no object: a dangling reference stays dangling.
    fn enqueue(&mut self, oid: Oid) {
        let (word, bit) = ((oid / 64) as usize, 1u64 << (oid % 64));
        if let Some(w) = self.seen.get_mut(word) {
            if *w & bit == 0 {
                *w |= bit;
                self.queue.push_back(oid);
            }
        }
    }

    fn enqueue_refs(&mut self, value: &[u8]) -> Result<(), CompactError> {
        for r in references_in(value)? {
            self.enqueue(r);
        }
        Ok(())
    }

    /// Copy everything reachable; returns what was kept, the number of
    /// large collections and of their elements.
    fn run(
        mut self,
        report: &mut dyn FnMut(&CompactProgress),
    ) -> Result<(Kept, u64, u64), CompactError> {
        self.enqueue(ROOT_ANCHOR);
        while let Some(oid) = self.queue.pop_front() {
            if self.copy_object(oid, report)?
                && self.progress.objects_scanned.is_multiple_of(PROGRESS_EVERY)
            {
                self.report(report);
            }
        }
        self.report(report);
        let (collections, elements) = (self.collections_kept, self.elements);
        Ok((self.finish()?, collections, elements))
    }

    fn report(&mut self, report: &mut dyn FnMut(&CompactProgress)) {
        self.progress.bytes_written = self.objects.len() + self.coll_bytes;
        report(&self.progress);
    }

    /// Copy one object (and a collection's elements); false if it is absent.
    fn copy_object(
        &mut self,
        oid: Oid,
        report: &mut dyn FnMut(&CompactProgress),
    ) -> Result<bool, CompactError> {
        let Some(entry) = self.src.index.get(oid)? else {
            return Ok(false);
        };
        let bad = |what: String| {
            CompactError::Storage(StorageError::Corrupted(format!(
                "{}: index entry of oid {oid} {what}",
                self.src.dir.display()
            )))
        };
        if entry.loc == 0 || entry.loc > self.src.header.objects_len {
            return Err(bad(format!(
                "points past the checkpointed objects.dat ({} bytes)",
                self.src.header.objects_len
            )));
        }
        let rec = self.src.objects.read(entry.loc - 1)?;
        if rec.oid != oid || rec.version != entry.version {
            return Err(bad(format!(
                "(version {}) names a record of oid {} version {}",
                entry.version, rec.oid, rec.version
            )));
        }
        self.enqueue_refs(&rec.value)?;
        let at = self
            .objects
            .append(oid, rec.version, &rec.class, &rec.value)?;
        if entry.is_collection() {
            self.copy_elements(oid, entry.coll_len, report)?;
        }
        self.index.set(
            oid,
            &IndexEntry {
                loc: at + 1,
                ..entry
            },
        )?;
        self.progress.objects_scanned += 1;
        Ok(true)
    }

    /// Leave a tombstone for every object of the source that was not
    /// copied, and keep the source's own (a copy of a compacted copy): a
    /// later commit that uses one of them is then refused or stops the
    /// server, instead of leaving a reference dangling on this copy only
    /// (`Repository::dropped_use`). Returns how many there are.
    fn write_tombstones(&mut self) -> Result<u64, CompactError> {
        let mut count = 0;
        for oid in 0..self.src.index.capacity() {
            let queued = self.seen[(oid / 64) as usize] & (1u64 << (oid % 64)) != 0;
            let uncopied = !queued && self.src.index.get(oid)?.is_some();
            if uncopied || self.src.index.dropped(oid)? {
                self.index.set(oid, &IndexEntry::tombstone())?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Copy elements `[0, len)` of a collection in bounded ranges.
    fn copy_elements(
        &mut self,
        coll: Oid,
        len: u64,
        report: &mut dyn FnMut(&CompactProgress),
    ) -> Result<(), CompactError> {
        self.collections_kept += 1;
        if len == 0 {
            return Ok(());
        }
        let reader = CollectionReader::open(&self.src.dir, coll)?;
        let mut at = 0;
        while at < len {
            let range = reader.range(len, at, RANGE_ELEMENTS, RANGE_BYTES)?;
            for value in &range {
                self.enqueue_refs(value)?;
                self.colls.write(coll, at, value)?;
                self.coll_bytes += 8 + 4 + value.len() as u64;
                at += 1;
            }
            self.report(report);
        }
        self.elements += len;
        self.collections.insert(coll);
        Ok(())
    }

    /// Make the data files durable and describe them for the manifest.
    fn finish(mut self) -> Result<Kept, CompactError> {
        let tombstones = self.write_tombstones()?;
        self.objects.sync()?;
        self.colls.sync_dirty()?;
        self.index.flush()?;
        let header = Header {
            objects_len: self.objects.len(),
            tombstones: tombstones > 0,
            // A copy holds no log (its source, a backup, has none either).
            log_segment: 0,
            ..self.src.header.clone()
        };
        let coll_dir = Path::new(COLL_DIR);
        let mut relative = vec![PathBuf::from(OBJECTS_FILE), PathBuf::from(INDEX_FILE)];
        for &coll in &self.collections {
            relative.push(idx_path(coll_dir, coll));
            relative.push(dat_path(coll_dir, coll));
        }
        let mut files = Vec::with_capacity(relative.len());
        for rel in relative {
            let path = self.dir.join(&rel);
            let describe = |e| StorageError::backup_io(format!("reading {}", path.display()), e);
            let size = fs::metadata(&path).map_err(describe)?.len();
            let blake3 = hash_file(&path).map_err(describe)?;
            files.push(ManifestFile {
                path: rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/"),
                size,
                blake3,
            });
        }
        Ok(Kept {
            header,
            files,
            objects: self.progress.objects_scanned,
        })
    }
}

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use super::*;
    use crate::storage::backup::verify;
    use crate::storage::object::{encode_value, ref_value, COLLECTION_CLASS, TEMP_REF_EXT};
    use crate::storage::{
        AppendRequest, CommitRequest, NewRequest, ObjRef, PutRequest, Repository,
    };

    fn temp(t: u64) -> Value {
        Value::Ext(TEMP_REF_EXT, t.to_be_bytes().to_vec())
    }

    fn new(temp_id: u64, class: &str, value: Value) -> NewRequest {
        NewRequest {
            temp_id,
            class: class.into(),
            value: encode_value(&value),
        }
    }

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    fn appends(coll: Oid, values: impl IntoIterator<Item = Value>) -> CommitRequest {
        CommitRequest {
            appends: values
                .into_iter()
                .map(|v| AppendRequest {
                    coll: ObjRef::Oid(coll),
                    value: encode_value(&v),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The oids of the objects `Fixture::build` makes.
    struct Fixture {
        repo: Repository,
        root: Oid,
        person: Oid,
        log: Oid,
        inner: Oid,
        only_in_element: Oid,
        deep: Oid,
        garbage: Vec<Oid>,
    }

    impl Fixture {
        /// A repository with garbage (an unreachable blob and collection),
        /// superseded versions, objects reachable only through collection
        /// elements, and a dangling reference.
        fn build(dir: &Path) -> Fixture {
            let mut repo = Repository::create(&dir.join("live"), 7, "127.0.0.1:1").unwrap();
            let c = repo
                .commit(CommitRequest {
                    news: vec![
                        new(1, "Person", map(vec![("name", "ada".into())])),
                        new(2, "Blob", Value::from("x".repeat(50_000))),
                        new(3, COLLECTION_CLASS, Value::Nil),
                        new(4, COLLECTION_CLASS, Value::Nil),
                        new(5, "Note", Value::from("reachable only from an element")),
                        new(
                            6,
                            "Deep",
                            Value::from("in an element of a collection in an element"),
                        ),
                        new(7, COLLECTION_CLASS, Value::Nil),
                        new(
                            8,
                            "Domain",
                            map(vec![
                                ("person", temp(1)),
                                ("junk", Value::Array(vec![temp(2), temp(7)])),
                                ("log", temp(3)),
                                ("dangling", ref_value(999_999)),
                            ]),
                        ),
                    ],
                    set_root: Some(ObjRef::New(8)),
                    ..Default::default()
                })
                .unwrap();
            let oid = |t: u64| c.new_oids.iter().find(|(x, _)| *x == t).unwrap().1;
            let (person, blob, log, inner, note, deep, junk_coll, root) = (
                oid(1),
                oid(2),
                oid(3),
                oid(4),
                oid(5),
                oid(6),
                oid(7),
                oid(8),
            );
            repo.commit(appends(log, [ref_value(note), ref_value(inner)]))
                .unwrap();
            repo.commit(appends(inner, [ref_value(deep)])).unwrap();
            repo.commit(appends(junk_coll, (0..100).map(Value::from)))
                .unwrap();
            for i in 0..3u64 {
                repo.commit(appends(
                    log,
                    (0..1000).map(|j| Value::from(format!("e{i}-{j}"))),
                ))
                .unwrap();
            }
            let mut version = c.number;
            for age in [37, 38, 39] {
                version = repo
                    .commit(CommitRequest {
                        puts: vec![PutRequest {
                            oid: person,
                            expected_version: version,
                            class: "Person".into(),
                            value: encode_value(&map(vec![
                                ("name", "ada".into()),
                                ("age", age.into()),
                            ])),
                        }],
                        ..Default::default()
                    })
                    .unwrap()
                    .number;
            }
            // Re-point the root past the junk: the blob and its collection
            // become garbage.
            repo.commit(CommitRequest {
                puts: vec![PutRequest {
                    oid: root,
                    expected_version: c.number,
                    class: "Domain".into(),
                    value: encode_value(&map(vec![
                        ("person", ref_value(person)),
                        ("log", ref_value(log)),
                        ("dangling", ref_value(999_999)),
                    ])),
                }],
                ..Default::default()
            })
            .unwrap();
            Fixture {
                repo,
                root,
                person,
                log,
                inner,
                only_in_element: note,
                deep,
                garbage: vec![blob, junk_coll],
            }
        }

        /// The fixture, compacted from a backup into `dir/compacted`, and
        /// the source's last commit (the copy's checkpoint).
        fn compacted(dir: &Path) -> (Fixture, PathBuf, CommitNumber) {
            let mut fx = Fixture::build(dir);
            let backup = fx.backup(dir);
            let out = dir.join("compacted");
            compact(&backup, &out, &mut no_progress()).unwrap();
            let checkpoint = fx.repo.info().last_commit;
            (fx, out, checkpoint)
        }

        fn backup(&mut self, dir: &Path) -> PathBuf {
            let target = dir.join("backup");
            let snap = self.repo.snapshot(&dir.join("scratch")).unwrap();
            snap.copy_to(&target).unwrap();
            target
        }
    }

    /// Regular files of a backup, relative: the top level and `coll/`.
    fn files_of(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in [PathBuf::new(), PathBuf::from(COLL_DIR)] {
            for e in fs::read_dir(dir.join(&sub)).unwrap().flatten() {
                if e.file_type().unwrap().is_file() {
                    out.push(sub.join(e.file_name()));
                }
            }
        }
        out
    }

    fn no_progress() -> impl FnMut(&CompactProgress) {
        |_| {}
    }

    /// Every record of an `objects.dat`, as (oid, version).
    fn records(dir: &Path) -> Vec<(Oid, u64)> {
        let len = fs::metadata(dir.join(OBJECTS_FILE)).unwrap().len();
        let f = ObjectFile::open_read_only(dir, len).unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        while at < len {
            let r = f.read(at).unwrap();
            at += 8 + 18 + (r.class.len() + r.value.len()) as u64;
            out.push((r.oid, r.version));
        }
        out
    }

    #[test]
    fn keeps_reachable_latest_versions_and_drops_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let mut fx = Fixture::build(tmp.path());
        let backup = fx.backup(tmp.path());
        let out = tmp.path().join("compacted");
        let mut reports = Vec::new();
        let report = compact(&backup, &out, &mut |p| reports.push(*p)).unwrap();

        // Everything but the garbage: anchor, root, person, log, inner,
        // note, deep.
        assert_eq!(report.objects_before, 9);
        assert_eq!(report.objects_kept, 7);
        assert_eq!(report.objects_dropped(), 2);
        assert_eq!((report.collections_kept, report.elements_kept), (2, 3003));
        assert!(report.bytes_after < report.bytes_before, "{report:?}");
        let last = reports.last().unwrap();
        assert_eq!(last.objects_scanned, 7);
        assert_eq!(last.objects_total, 9);
        assert!(reports
            .windows(2)
            .all(|w| w[0].bytes_written <= w[1].bytes_written));

        // One record per kept object: no garbage, no superseded version.
        let mut recs = records(&out);
        recs.sort_unstable();
        let mut oids: Vec<Oid> = recs.iter().map(|r| r.0).collect();
        oids.dedup();
        assert_eq!(oids.len(), recs.len(), "an oid has two records: {recs:?}");
        let mut want = vec![
            ROOT_ANCHOR,
            fx.root,
            fx.person,
            fx.log,
            fx.inner,
            fx.only_in_element,
            fx.deep,
        ];
        want.sort_unstable();
        assert_eq!(oids, want);
        assert!(!out
            .join(COLL_DIR)
            .join(format!("{}.idx", fx.garbage[1]))
            .exists());

        // A valid backup; the source is untouched and still one.
        let v = verify(&out).unwrap();
        assert_eq!(v.snapshot_commit, report.commit);
        verify(&backup).unwrap();
        assert!(!backup.join("LOCK").exists());
    }

    #[test]
    fn the_copy_keeps_the_header_and_the_digest_and_catches_up() {
        let tmp = tempfile::tempdir().unwrap();
        let mut fx = Fixture::build(tmp.path());
        let backup = fx.backup(tmp.path());
        let out = tmp.path().join("compacted");
        compact(&backup, &out, &mut no_progress()).unwrap();

        let before = Header::read(&backup).unwrap();
        let after = Header::read(&out).unwrap();
        assert_eq!(
            after,
            Header {
                objects_len: fs::metadata(out.join(OBJECTS_FILE)).unwrap().len(),
                tombstones: true,
                ..before.clone()
            }
        );
        assert!(!before.tombstones);
        assert!(after.restore_mode && after.server_id == 0);
        assert!(after.objects_len < before.objects_len);

        let source_digest = fx.repo.digest().unwrap();
        let mut copy = Repository::open(&out).unwrap();
        assert_eq!(copy.digest().unwrap(), source_digest);
        let info = copy.info();
        assert_eq!(info.last_hash, fx.repo.info().last_hash);
        assert_eq!(info.epoch, fx.repo.info().epoch);
        assert_eq!(info.next_oid, fx.repo.info().next_oid);
        assert_eq!(copy.anchor().unwrap(), fx.repo.anchor().unwrap());
        for g in &fx.garbage {
            assert_eq!(copy.get(*g).unwrap(), None);
        }
        let person = copy.get(fx.person).unwrap().unwrap();
        assert_eq!(person, fx.repo.get(fx.person).unwrap().unwrap());
        assert_eq!(
            copy.collection_range(fx.inner, 0, 10).unwrap(),
            vec![encode_value(&ref_value(fx.deep))]
        );

        // Commits after the backup apply on the copy as on any backup.
        let checkpoint = info.last_commit;
        fx.repo
            .commit(appends(fx.log, [Value::from("after")]))
            .unwrap();
        let records = fx.repo.read_records(checkpoint + 1, 100, 1 << 20).unwrap();
        assert_eq!(records.len(), 1);
        copy.apply_records(&records).unwrap();
        assert_eq!(copy.digest().unwrap(), fx.repo.digest().unwrap());
    }

    /// A commit on `repo` (the source or a copy) that writes the root so
    /// that it links `extra`.
    fn link_from_root(fx: &Fixture, repo: &Repository, extra: Oid) -> CommitRequest {
        let root = repo.get(fx.root).unwrap().unwrap();
        CommitRequest {
            puts: vec![PutRequest {
                oid: fx.root,
                expected_version: root.version,
                class: "Domain".into(),
                value: encode_value(&map(vec![
                    ("person", ref_value(fx.person)),
                    ("log", ref_value(fx.log)),
                    ("extra", ref_value(extra)),
                ])),
            }],
            ..Default::default()
        }
    }

    /// The compactions of `backup` named, then each opened; the last is a
    /// compaction of the first, before it was opened.
    fn compacted_copies(tmp: &Path, backup: &Path, names: &[&str]) -> Vec<PathBuf> {
        let outs: Vec<PathBuf> = names.iter().map(|n| tmp.join(n)).collect();
        for out in &outs[..outs.len() - 1] {
            compact(backup, out, &mut no_progress()).unwrap();
        }
        compact(&outs[0], &outs[outs.len() - 1], &mut no_progress()).unwrap();
        outs
    }

    #[test]
    fn a_record_using_a_dropped_object_stops_the_copy_instead_of_dangling() {
        let tmp = tempfile::tempdir().unwrap();
        let mut fx = Fixture::build(tmp.path());
        let backup = fx.backup(tmp.path());
        let blob = fx.garbage[0];
        let outs = compacted_copies(tmp.path(), &backup, &["a", "of-a"]);
        let checkpoint = fx.repo.info().last_commit;

        // The application links the blob again; the source still has it.
        let relink = fx
            .repo
            .commit(link_from_root(&fx, &fx.repo, blob))
            .unwrap()
            .number;
        let records = fx.repo.read_records(checkpoint + 1, 100, 1 << 20).unwrap();
        // A copy of a copy keeps the tombstones: it stops the same way.
        for out in &outs {
            assert!(Header::read(out).unwrap().tombstones);
            let mut copy = Repository::open(out).unwrap();
            let err = copy.apply_records(&records).unwrap_err();
            assert!(
                matches!(err, StorageError::DroppedNeeded { number, oid }
                    if number == relink && oid == blob),
                "{err}"
            );
            assert!(
                err.is_fatal() && err.to_string().contains("plain backup"),
                "{err}"
            );
            assert_eq!(copy.info().last_commit, checkpoint);
            drop(copy);
            // Refused before it was logged: a restart finds the copy as it
            // was, and stops at the same record again.
            let mut copy = Repository::open(out).unwrap();
            assert_eq!(copy.info().last_commit, checkpoint);
            assert!(matches!(
                copy.apply_records(&records),
                Err(StorageError::DroppedNeeded { .. })
            ));
        }
    }

    #[test]
    fn an_append_to_a_dropped_collection_stops_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut fx, out, checkpoint) = Fixture::compacted(tmp.path());
        let junk_coll = fx.garbage[1];
        fx.repo
            .commit(appends(fx.log, [Value::from("fine")]))
            .unwrap();
        fx.repo
            .commit(appends(junk_coll, [Value::from("again")]))
            .unwrap();
        let records = fx.repo.read_records(checkpoint + 1, 100, 1 << 20).unwrap();
        let mut copy = Repository::open(&out).unwrap();
        let err = copy.apply_records(&records).unwrap_err();
        assert!(
            matches!(err, StorageError::DroppedNeeded { number, oid }
                if number == checkpoint + 2 && oid == junk_coll),
            "{err}"
        );
        // The record before it stays applied.
        assert_eq!(copy.info().last_commit, checkpoint + 1);
    }

    #[test]
    fn a_dropped_object_written_back_in_full_is_whole_again_on_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut fx, out, checkpoint) = Fixture::compacted(tmp.path());
        let blob = fx.garbage[0];

        // One record writes the blob in full and links it.
        let old = fx.repo.get(blob).unwrap().unwrap();
        let mut both = link_from_root(&fx, &fx.repo, blob);
        both.puts.push(PutRequest {
            oid: blob,
            expected_version: old.version,
            class: "Blob".into(),
            value: encode_value(&Value::from("rewritten")),
        });
        fx.repo.commit(both).unwrap();
        let records = fx.repo.read_records(checkpoint + 1, 100, 1 << 20).unwrap();
        let mut copy = Repository::open(&out).unwrap();
        copy.apply_records(&records).unwrap();
        assert_eq!(copy.get(blob).unwrap(), fx.repo.get(blob).unwrap());
        assert_eq!(copy.digest().unwrap(), fx.repo.digest().unwrap());
        // Checkpointed, the live entry has replaced the tombstone.
        copy.checkpoint().unwrap();
        drop(copy);
        assert!(!IndexReader::open(&out).unwrap().dropped(blob).unwrap());
        let copy = Repository::open(&out).unwrap();
        assert_eq!(copy.get(blob).unwrap(), fx.repo.get(blob).unwrap());
    }

    #[test]
    fn a_record_making_a_dropped_object_the_root_stops_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut fx, out, checkpoint) = Fixture::compacted(tmp.path());
        let blob = fx.garbage[0];
        fx.repo
            .commit(CommitRequest {
                set_root: Some(ObjRef::Oid(blob)),
                ..Default::default()
            })
            .unwrap();
        let records = fx.repo.read_records(checkpoint + 1, 100, 1 << 20).unwrap();
        let mut copy = Repository::open(&out).unwrap();
        assert!(matches!(
            copy.apply_records(&records),
            Err(StorageError::DroppedNeeded { oid, .. }) if oid == blob
        ));
    }

    #[test]
    fn tombstones_survive_checkpoints_and_backups_of_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut fx, out, checkpoint) = Fixture::compacted(tmp.path());
        let (blob, junk_coll) = (fx.garbage[0], fx.garbage[1]);
        fx.repo
            .commit(appends(fx.log, [Value::from("after")]))
            .unwrap();
        let records = fx.repo.read_records(checkpoint + 1, 100, 1 << 20).unwrap();
        let mut copy = Repository::open(&out).unwrap();
        copy.apply_records(&records).unwrap();
        copy.checkpoint().unwrap();
        let again = tmp.path().join("backup-of-copy");
        copy.snapshot(&tmp.path().join("scratch2"))
            .unwrap()
            .copy_to(&again)
            .unwrap();
        drop(copy);
        for dir in [&out, &again] {
            assert!(Header::read(dir).unwrap().tombstones, "{}", dir.display());
            let index = IndexReader::open(dir).unwrap();
            assert!(index.dropped(blob).unwrap() && index.dropped(junk_coll).unwrap());
        }
        verify(&again).unwrap();
    }

    #[test]
    fn a_compacted_primary_refuses_commits_that_use_a_dropped_object() {
        let tmp = tempfile::tempdir().unwrap();
        let (fx, out, _) = Fixture::compacted(tmp.path());
        let (blob, junk_coll) = (fx.garbage[0], fx.garbage[1]);
        let mut copy = Repository::open(&out).unwrap();
        copy.set_restore_mode(false).unwrap();
        let last = copy.info().last_commit;

        let refused = |r: Result<_, StorageError>| match r {
            Err(e @ StorageError::DroppedObject(oid)) => {
                assert!(!e.is_fatal());
                oid
            }
            other => panic!("expected a refusal of a dropped object, got {other:?}"),
        };
        assert_eq!(refused(copy.commit(link_from_root(&fx, &copy, blob))), blob);
        assert_eq!(
            refused(copy.commit(appends(fx.log, [ref_value(blob)]))),
            blob
        );
        assert_eq!(
            refused(copy.commit(CommitRequest {
                meta: vec![("k".into(), Some(encode_value(&ref_value(blob))))],
                ..Default::default()
            })),
            blob
        );
        // Naming a dropped object directly was refused before tombstones
        // too: it does not exist here.
        assert!(matches!(
            copy.commit(appends(junk_coll, [Value::from(1)])),
            Err(StorageError::UnknownObject(oid)) if oid == junk_coll
        ));
        assert_eq!(
            copy.info().last_commit,
            last,
            "a refused commit is not logged"
        );
        // What never existed may still dangle, as on any repository, and
        // live objects link as before.
        copy.commit(link_from_root(&fx, &copy, 999_998)).unwrap();
        copy.commit(link_from_root(&fx, &copy, fx.inner)).unwrap();
    }

    /// A live repository in `dir/live` whose root is a large collection of
    /// 30 elements of 300 kB; the collection's oid.
    fn with_big_elements(dir: &Path) -> (Repository, Oid) {
        let mut repo = Repository::create(&dir.join("live"), 7, "127.0.0.1:1").unwrap();
        let c = repo
            .commit(CommitRequest {
                news: vec![new(1, COLLECTION_CLASS, Value::Nil)],
                set_root: Some(ObjRef::New(1)),
                ..Default::default()
            })
            .unwrap();
        let coll = c.new_oids[0].1;
        let big = "b".repeat(300_000);
        repo.commit(appends(
            coll,
            (0..30).map(|i| Value::from(format!("{i}{big}"))),
        ))
        .unwrap();
        (repo, coll)
    }

    #[test]
    fn large_collections_are_copied_in_bounded_ranges() {
        let tmp = tempfile::tempdir().unwrap();
        // Big elements force byte-bounded ranges; many small ones, several
        // element-bounded ranges.
        let (mut repo, coll) = with_big_elements(tmp.path());
        for k in 0..3 {
            repo.commit(appends(
                coll,
                (0..4000).map(|i| Value::from(format!("{k}-{i}"))),
            ))
            .unwrap();
        }
        let snap = repo.snapshot(&tmp.path().join("scratch")).unwrap();
        let backup = tmp.path().join("backup");
        snap.copy_to(&backup).unwrap();
        let out = tmp.path().join("compacted");
        let mut ranges = 0;
        let report = compact(&backup, &out, &mut |_| ranges += 1).unwrap();
        assert_eq!(report.elements_kept, 12_030);
        assert!(ranges >= 6, "only {ranges} progress reports");
        let mut copy = Repository::open(&out).unwrap();
        assert_eq!(copy.digest().unwrap(), repo.digest().unwrap());
        assert_eq!(copy.collection_len(coll).unwrap(), 12_030);
    }

    #[test]
    fn refuses_live_repositories_non_backups_and_existing_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let mut fx = Fixture::build(tmp.path());
        let backup = fx.backup(tmp.path());
        let live = tmp.path().join("live");
        let out = tmp.path().join("out");

        let e = compact(&live, &out, &mut no_progress()).unwrap_err();
        assert!(matches!(e, CompactError::Live(_)), "{e}");
        assert!(e.to_string().contains("locked by a running server"), "{e}");
        drop(fx);
        let e = compact(&live, &out, &mut no_progress()).unwrap_err();
        assert!(matches!(e, CompactError::NotABackup(_)), "{e}");
        assert!(e.to_string().contains("works on a backup"), "{e}");
        assert!(!out.exists(), "a refused compaction created its target");

        fs::create_dir(&out).unwrap();
        fs::write(out.join("keep"), b"mine").unwrap();
        let e = compact(&backup, &out, &mut no_progress()).unwrap_err();
        assert!(matches!(e, CompactError::TargetExists(_)), "{e}");
        assert_eq!(fs::read(out.join("keep")).unwrap(), b"mine");
        let e = compact(&backup, &backup.join("inside"), &mut no_progress()).unwrap_err();
        assert!(matches!(e, CompactError::Target(_)), "{e}");
        let e = compact(&tmp.path().join("nothing"), &out, &mut no_progress()).unwrap_err();
        assert!(
            matches!(e, CompactError::Storage(StorageError::NotARepository(_))),
            "{e}"
        );

        // A backup a server has opened, and one without a manifest.
        let opened = tmp.path().join("opened");
        let copy = |to: &Path| {
            fs::create_dir_all(to.join(COLL_DIR)).unwrap();
            for rel in files_of(&backup) {
                fs::copy(backup.join(&rel), to.join(&rel)).unwrap();
            }
        };
        copy(&opened);
        drop(Repository::open(&opened).unwrap());
        let e = compact(&opened, &tmp.path().join("o1"), &mut no_progress()).unwrap_err();
        assert!(matches!(e, CompactError::NotPristine { .. }), "{e}");
        assert!(e.to_string().contains("a server has opened it"), "{e}");
        let unsealed = tmp.path().join("unsealed");
        copy(&unsealed);
        fs::remove_file(unsealed.join(MANIFEST_FILE)).unwrap();
        let e = compact(&unsealed, &tmp.path().join("o2"), &mut no_progress()).unwrap_err();
        assert!(e.to_string().contains("incomplete backup"), "{e}");
    }

    #[test]
    fn a_source_changed_during_a_failed_copy_is_reported_as_changed_not_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut repo, coll) = with_big_elements(tmp.path());
        let snap = repo.snapshot(&tmp.path().join("scratch")).unwrap();
        let backup = tmp.path().join("backup");
        snap.copy_to(&backup).unwrap();
        // The last element is damaged, so the copy fails at its end...
        let dat = backup.join(COLL_DIR).join(format!("{coll}.dat"));
        let mut bytes = fs::read(&dat).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xff;
        fs::write(&dat, &bytes).unwrap();
        // ... after a server opened the source and checkpointed it.
        let mut touched = false;
        let e = compact(&backup, &tmp.path().join("out"), &mut |_| {
            if !touched {
                let mut h = Header::read(&backup).unwrap();
                h.checkpoint += 1;
                h.write(&backup).unwrap();
                touched = true;
            }
        })
        .unwrap_err();
        assert!(touched);
        assert!(matches!(e, CompactError::SourceChanged(_)), "{e}");
    }

    #[test]
    fn a_failed_compaction_leaves_an_incomplete_target() {
        let tmp = tempfile::tempdir().unwrap();
        let mut fx = Fixture::build(tmp.path());
        let backup = fx.backup(tmp.path());
        // Damage an element of the reachable collection.
        let dat = backup.join(COLL_DIR).join(format!("{}.dat", fx.log));
        let mut bytes = fs::read(&dat).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xff;
        fs::write(&dat, &bytes).unwrap();
        let out = tmp.path().join("out");
        let e = compact(&backup, &out, &mut no_progress()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!out.join(MANIFEST_FILE).exists());
        let marker = read_marker(&out).unwrap();
        assert!(marker.contains("state: failed"), "{marker}");
        assert!(verify(&out).is_err());
    }
}
