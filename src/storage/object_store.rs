//! Object data: `objects.dat` (append-only object versions) and the
//! large-collection files `coll/<oid>.idx` + `coll/<oid>.dat`.
//!
//! `objects.dat` records are `u32 len | u32 crc32(body) | body` with body
//! `oid u64 | version u64 | class_len u16 | class | value` (MessagePack).
//! A collection's `.idx` holds one u64 per element: the end offset of that
//! element in `.dat`; `.dat` holds per element `crc32(value) u32 | value`.
//! Elements are written at explicit positions, so replaying an append is
//! idempotent. Nothing here is synced except by `sync`, called at
//! checkpoints; the commit log is what makes a commit durable.
//! `ObjectFile::open_read_only` and [`CollectionReader`] read a backup's
//! files for offline tools without ever opening them for writing.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::storage::error::{Result, StorageError};
use crate::storage::index_map::IndexEntry;
use crate::storage::object::StoredObject;
use crate::storage::sync::SyncTarget;
use crate::types::Oid;

/// Longest class name an object record holds (its length is a u16).
pub const MAX_CLASS_LEN: usize = u16::MAX as usize;

pub const OBJECTS_FILE: &str = "objects.dat";
pub const COLL_DIR: &str = "coll";
const MAX_OPEN_COLLECTIONS: usize = 256;

fn io_at(path: &Path, what: &str, e: std::io::Error) -> StorageError {
    StorageError::io(format!("{what} {}", path.display()), e)
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_at(path, "opening", e))
}

/// One decoded object record.
pub struct ObjectRecord {
    pub oid: Oid,
    pub version: u64,
    pub class: String,
    pub value: Vec<u8>,
}

pub struct ObjectFile {
    path: PathBuf,
    file: File,
    /// Bytes on disk; `pending` follows them.
    flushed: u64,
    pending: Vec<u8>,
}

impl ObjectFile {
    /// Open `objects.dat` and cut it to `valid_len` (the checkpoint's
    /// length: anything after it is replayed from the log).
    pub fn open(dir: &Path, valid_len: u64) -> Result<ObjectFile> {
        let path = dir.join(OBJECTS_FILE);
        if valid_len > 0 && !path.exists() {
            // Created afresh it would be reported as cut short: say what
            // is wrong instead.
            return Err(StorageError::Corrupted(format!(
                "{} is missing, but the header's checkpoint says it holds {valid_len} bytes",
                path.display()
            )));
        }
        let file = open_rw(&path)?;
        if Self::checked_len(&file, &path, valid_len)? > valid_len {
            file.set_len(valid_len)
                .map_err(|e| io_at(&path, "cutting", e))?;
        }
        Ok(Self::with(path, file, valid_len))
    }

    /// Open `objects.dat` of a backup for reading only: it must hold at
    /// least `valid_len` bytes, and nothing past them is ever read.
    pub fn open_read_only(dir: &Path, valid_len: u64) -> Result<ObjectFile> {
        let path = dir.join(OBJECTS_FILE);
        let file = File::open(&path).map_err(|e| io_at(&path, "opening", e))?;
        Self::checked_len(&file, &path, valid_len)?;
        Ok(Self::with(path, file, valid_len))
    }

    /// The file's length, at least `valid_len`.
    fn checked_len(file: &File, path: &Path, valid_len: u64) -> Result<u64> {
        let len = file
            .metadata()
            .map_err(|e| io_at(path, "inspecting", e))?
            .len();
        if len < valid_len {
            return Err(StorageError::Corrupted(format!(
                "{} is {len} bytes but the header's checkpoint says {valid_len}",
                path.display()
            )));
        }
        Ok(len)
    }

    fn with(path: PathBuf, file: File, valid_len: u64) -> ObjectFile {
        ObjectFile {
            path,
            file,
            flushed: valid_len,
            pending: Vec::new(),
        }
    }

    pub fn len(&self) -> u64 {
        self.flushed + self.pending.len() as u64
    }

    /// Write buffered records to the file.
    pub fn write_pending(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.file
                .write_all_at(&self.pending, self.flushed)
                .map_err(|e| io_at(&self.path, "appending to", e))?;
            self.flushed += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(())
    }

    /// Append a record; returns its offset.
    pub fn append(&mut self, oid: Oid, version: u64, class: &str, value: &[u8]) -> Result<u64> {
        if class.len() > MAX_CLASS_LEN {
            return Err(StorageError::Invalid(format!(
                "class name of {} bytes is too long",
                class.len()
            )));
        }
        let body_len = 8 + 8 + 2 + class.len() + value.len();
        let at = self.len();
        let start = self.pending.len();
        let buf = &mut self.pending;
        buf.extend_from_slice(&(body_len as u32).to_le_bytes());
        buf.extend_from_slice(&[0u8; 4]);
        buf.extend_from_slice(&oid.to_le_bytes());
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&(class.len() as u16).to_le_bytes());
        buf.extend_from_slice(class.as_bytes());
        buf.extend_from_slice(value);
        let crc = crc32fast::hash(&buf[start + 8..]);
        buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        if self.pending.len() >= 1 << 20 {
            self.write_pending()?;
        }
        Ok(at)
    }

    /// `oid`'s object at its index entry `e`, checked against the record
    /// the entry points at.
    pub fn stored(&self, oid: Oid, e: &IndexEntry) -> Result<StoredObject> {
        let rec = self.read(e.loc - 1)?;
        if rec.oid != oid || rec.version != e.version {
            return Err(StorageError::Corrupted(format!(
                "index entry of oid {oid} (version {}) points at a record of oid {} version {}",
                e.version, rec.oid, rec.version
            )));
        }
        Ok(StoredObject {
            oid,
            version: rec.version,
            class: rec.class,
            value: rec.value,
            collection_len: e.is_collection().then_some(e.coll_len),
        })
    }

    pub fn read(&self, offset: u64) -> Result<ObjectRecord> {
        let bad = |reason: String| {
            StorageError::Corrupted(format!(
                "{} at offset {offset}: {reason}",
                self.path.display()
            ))
        };
        if offset + 8 > self.len() {
            return Err(bad("record beyond the end of the file".into()));
        }
        let mut prefix = [0u8; 8];
        self.read_at(&mut prefix, offset)?;
        let len = u32::from_le_bytes(prefix[0..4].try_into().unwrap()) as u64;
        let crc = u32::from_le_bytes(prefix[4..8].try_into().unwrap());
        if len < 18 || offset + 8 + len > self.len() {
            return Err(bad(format!("impossible record length {len}")));
        }
        let mut body = vec![0u8; len as usize];
        self.read_at(&mut body, offset + 8)?;
        if crc32fast::hash(&body) != crc {
            return Err(bad("checksum mismatch".into()));
        }
        let oid = u64::from_le_bytes(body[0..8].try_into().unwrap());
        let version = u64::from_le_bytes(body[8..16].try_into().unwrap());
        let class_len = u16::from_le_bytes(body[16..18].try_into().unwrap()) as usize;
        if 18 + class_len > body.len() {
            return Err(bad("class name overruns the record".into()));
        }
        let class = String::from_utf8(body[18..18 + class_len].to_vec())
            .map_err(|_| bad("class name is not UTF-8".into()))?;
        let value = body[18 + class_len..].to_vec();
        Ok(ObjectRecord {
            oid,
            version,
            class,
            value,
        })
    }

    /// Records are never split between the file and the buffer, because
    /// the whole buffer is written at once.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset >= self.flushed {
            let at = (offset - self.flushed) as usize;
            buf.copy_from_slice(&self.pending[at..at + buf.len()]);
            Ok(())
        } else {
            self.file
                .read_exact_at(buf, offset)
                .map_err(|e| io_at(&self.path, "reading", e))
        }
    }

    pub fn sync(&mut self) -> Result<()> {
        self.write_pending()?;
        self.file
            .sync_data()
            .map_err(|e| io_at(&self.path, "syncing", e))
    }

    /// Write what is buffered and hand out the file for a parallel sync.
    pub fn sync_target(&mut self) -> Result<SyncTarget> {
        self.write_pending()?;
        SyncTarget::of(&self.file, self.path.clone())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct CollFiles {
    idx: File,
    dat: File,
    /// Elements in the files plus the buffers.
    len: u64,
    /// End offset in `.dat` of the last element (files plus buffers).
    end: u64,
    /// Buffered appends: `.dat` bytes ending at `end`, `.idx` entries
    /// ending at `len`.
    pending_dat: Vec<u8>,
    pending_idx: Vec<u8>,
}

/// The large-collection files, opened on demand. Appends at the end are
/// buffered per collection and written at the next read, sync or when the
/// buffer grows; anything else is written in place at once.
pub struct Collections {
    dir: PathBuf,
    open: HashMap<Oid, CollFiles>,
    dirty: HashSet<Oid>,
    /// Files were created in `coll/` since its last sync (`sync_new_names`).
    created: bool,
}

/// The length of an open element file, for checking offsets read from
/// its `.idx` against it.
fn file_len(file: &File, path: &Path) -> Result<u64> {
    Ok(file
        .metadata()
        .map_err(|e| io_at(path, "inspecting", e))?
        .len())
}

pub fn idx_path(dir: &Path, coll: Oid) -> PathBuf {
    dir.join(format!("{coll}.idx"))
}

pub fn dat_path(dir: &Path, coll: Oid) -> PathBuf {
    dir.join(format!("{coll}.dat"))
}

const COLL_BUFFER: usize = 64 * 1024;

impl CollFiles {
    fn open(dir: &Path, coll: Oid) -> Result<CollFiles> {
        let ip = idx_path(dir, coll);
        let idx = open_rw(&ip)?;
        let dat = open_rw(&dat_path(dir, coll))?;
        let idx_len = idx
            .metadata()
            .map_err(|e| io_at(&ip, "inspecting", e))?
            .len();
        let len = idx_len / 8;
        let mut files = CollFiles {
            idx,
            dat,
            len,
            end: 0,
            pending_dat: Vec::new(),
            pending_idx: Vec::new(),
        };
        if len > 0 {
            files.end = files.end_on_disk(dir, coll, len - 1)?;
        }
        Ok(files)
    }

    fn end_on_disk(&self, dir: &Path, coll: Oid, index: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.idx.read_exact_at(&mut b, index * 8).map_err(|e| {
            io_at(
                &idx_path(dir, coll),
                &format!("reading element {index} of"),
                e,
            )
        })?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_pending(&mut self, dir: &Path, coll: Oid) -> Result<()> {
        if self.pending_idx.is_empty() {
            return Ok(());
        }
        let dat_at = self.end - self.pending_dat.len() as u64;
        let idx_at = self.len * 8 - self.pending_idx.len() as u64;
        self.dat
            .write_all_at(&self.pending_dat, dat_at)
            .map_err(|e| io_at(&dat_path(dir, coll), "writing", e))?;
        self.idx
            .write_all_at(&self.pending_idx, idx_at)
            .map_err(|e| io_at(&idx_path(dir, coll), "writing", e))?;
        self.pending_dat.clear();
        self.pending_idx.clear();
        Ok(())
    }
}

/// A collection's two files, borrowed for reading elements.
struct ElementFiles<'a> {
    /// The `coll/` directory, for messages.
    dir: &'a Path,
    coll: Oid,
    idx: &'a File,
    dat: &'a File,
}

impl ElementFiles<'_> {
    /// Elements `[start, start + count)` of a collection of length `len`,
    /// CRC-checked; past the first element, cut where the data would exceed
    /// `max_bytes`.
    fn range(&self, len: u64, start: u64, count: u64, max_bytes: u64) -> Result<Vec<Vec<u8>>> {
        if start >= len || count == 0 {
            return Ok(Vec::new());
        }
        let (dir, coll) = (self.dir, self.coll);
        let end = len.min(start.saturating_add(count));
        let first_idx = start.saturating_sub(1);
        let n = (end - first_idx) as usize;
        let mut raw = vec![0u8; n * 8];
        self.idx
            .read_exact_at(&mut raw, first_idx * 8)
            .map_err(|e| io_at(&idx_path(dir, coll), "reading", e))?;
        let ends: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (mut pos, ends) = if start == 0 {
            (0, &ends[..])
        } else {
            (ends[0], &ends[1..])
        };
        let span_start = pos;
        // Keep at least one element; then stay within `max_bytes`.
        let keep = 1 + ends[1..]
            .iter()
            .take_while(|&&e| e.saturating_sub(span_start) <= max_bytes)
            .count();
        let ends = &ends[..keep];
        let span_end = *ends.last().expect("at least one element");
        if span_end < span_start {
            return Err(StorageError::Corrupted(format!(
                "{}: element offsets go backwards",
                idx_path(dir, coll).display()
            )));
        }
        // A damaged offset must be an error naming the file, not an
        // allocation of whatever size it claims.
        let dat_len = file_len(self.dat, &dat_path(dir, coll))?;
        if span_end > dat_len {
            return Err(StorageError::Corrupted(format!(
                "{}: element {} ends at offset {span_end}, past the end of {} ({dat_len} bytes)",
                idx_path(dir, coll).display(),
                start + ends.len() as u64 - 1,
                dat_path(dir, coll).display()
            )));
        }
        let mut data = vec![0u8; (span_end - span_start) as usize];
        self.dat
            .read_exact_at(&mut data, span_start)
            .map_err(|e| io_at(&dat_path(dir, coll), "reading", e))?;
        let mut out = Vec::with_capacity(ends.len());
        for (i, &e) in ends.iter().enumerate() {
            let bad = || {
                StorageError::Corrupted(format!(
                    "{}: element {} is damaged",
                    dat_path(dir, coll).display(),
                    start + i as u64
                ))
            };
            if e < pos + 4 || e > span_end {
                return Err(bad());
            }
            let rec = &data[(pos - span_start) as usize..(e - span_start) as usize];
            let crc = u32::from_le_bytes(rec[0..4].try_into().unwrap());
            if crc32fast::hash(&rec[4..]) != crc {
                return Err(bad());
            }
            out.push(rec[4..].to_vec());
            pos = e;
        }
        Ok(out)
    }
}

/// Read-only access to one collection of a backup (offline tools): opens
/// nothing for writing and never buffers.
pub struct CollectionReader {
    dir: PathBuf,
    coll: Oid,
    idx: File,
    dat: File,
}

impl CollectionReader {
    /// Open `coll/<coll>.idx` and `.dat` of the repository in `repo_dir`.
    pub fn open(repo_dir: &Path, coll: Oid) -> Result<CollectionReader> {
        let dir = repo_dir.join(COLL_DIR);
        let open = |p: PathBuf| File::open(&p).map_err(|e| io_at(&p, "opening", e));
        Ok(CollectionReader {
            idx: open(idx_path(&dir, coll))?,
            dat: open(dat_path(&dir, coll))?,
            dir,
            coll,
        })
    }

    /// As [`Collections::range`], and after the first element at most
    /// about `max_bytes` of element data, so a range of huge elements stays
    /// small in memory.
    pub fn range(&self, len: u64, start: u64, count: u64, max_bytes: u64) -> Result<Vec<Vec<u8>>> {
        ElementFiles {
            dir: &self.dir,
            coll: self.coll,
            idx: &self.idx,
            dat: &self.dat,
        }
        .range(len, start, count, max_bytes)
    }
}

impl Collections {
    pub fn open(repo_dir: &Path) -> Result<Collections> {
        let dir = repo_dir.join(COLL_DIR);
        fs::create_dir_all(&dir).map_err(|e| io_at(&dir, "creating", e))?;
        Ok(Collections {
            dir,
            open: HashMap::new(),
            dirty: HashSet::new(),
            created: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every collection that has files, in oid order.
    pub fn existing(&self) -> Result<Vec<Oid>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io_at(&self.dir, "listing", e))? {
            let entry = entry.map_err(|e| io_at(&self.dir, "listing", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".idx") {
                if let Ok(oid) = stem.parse::<u64>() {
                    out.push(oid);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The collection's files with nothing buffered (see `files`).
    fn files_written(&mut self, coll: Oid, holds: u64) -> Result<&mut CollFiles> {
        let dir = self.dir.clone();
        let f = self.files(coll, holds)?;
        f.write_pending(&dir, coll)?;
        Ok(f)
    }

    /// The collection's open files; `holds` is how many elements the
    /// caller knows it has. Files are created for a collection that may
    /// be new (`holds` 0), never in place of the files of one that holds
    /// elements: that is an error naming the missing file (a missing
    /// collection is found at its first use, not at open: finding it
    /// there would mean reading the whole index).
    fn files(&mut self, coll: Oid, holds: u64) -> Result<&mut CollFiles> {
        if !self.open.contains_key(&coll) {
            let missing: Vec<String> = [idx_path(&self.dir, coll), dat_path(&self.dir, coll)]
                .into_iter()
                .filter(|p| !p.exists())
                .map(|p| p.display().to_string())
                .collect();
            if holds > 0 && !missing.is_empty() {
                return Err(StorageError::Corrupted(format!(
                    "collection {coll} holds {holds} element(s), but {} is missing \
                     (deleted, moved or lost); nothing was created in its place",
                    missing.join(" and ")
                )));
            }
            if self.open.len() >= MAX_OPEN_COLLECTIONS {
                // Closing files drops their buffers: everything buffered
                // is written and synced first (every collection with
                // buffered elements is dirty, see `write`).
                self.sync_dirty()?;
                self.open.clear();
            }
            if !missing.is_empty() {
                self.created = true;
            }
            let files = CollFiles::open(&self.dir, coll)?;
            self.open.insert(coll, files);
        }
        Ok(self.open.get_mut(&coll).expect("just opened"))
    }

    /// Write element `index` (the caller guarantees `index` ≤ current
    /// length, so elements are dense).
    pub fn write(&mut self, coll: Oid, index: u64, value: &[u8]) -> Result<()> {
        let crc = crc32fast::hash(value).to_le_bytes();
        // Opened first: opening may close (and sync) the others, which
        // takes their dirty marks; this one's must outlive that, or its
        // buffered element would be neither written at the checkpoint nor
        // kept when its files are closed.
        self.files(coll, index)?;
        self.dirty.insert(coll);
        let f = self.files(coll, index)?;
        if index == f.len {
            f.end += (4 + value.len()) as u64;
            f.len += 1;
            f.pending_dat.extend_from_slice(&crc);
            f.pending_dat.extend_from_slice(value);
            f.pending_idx.extend_from_slice(&f.end.to_le_bytes());
            if f.pending_dat.len() >= COLL_BUFFER {
                let dir = self.dir.clone();
                self.open
                    .get_mut(&coll)
                    .expect("open")
                    .write_pending(&dir, coll)?;
            }
            return Ok(());
        }
        if index > f.len {
            return Err(StorageError::Corrupted(format!(
                "collection {coll}: element {index} written past its length {}",
                f.len
            )));
        }
        // Rewriting an existing element (replay after a crash): in place.
        let dir = self.dir.clone();
        let f = self.files_written(coll, index)?;
        let start = if index == 0 {
            0
        } else {
            f.end_on_disk(&dir, coll, index - 1)?
        };
        let mut buf = Vec::with_capacity(4 + value.len());
        buf.extend_from_slice(&crc);
        buf.extend_from_slice(value);
        f.dat
            .write_all_at(&buf, start)
            .map_err(|e| io_at(&dat_path(&dir, coll), "writing", e))?;
        let end = start + buf.len() as u64;
        f.idx
            .write_all_at(&end.to_le_bytes(), index * 8)
            .map_err(|e| io_at(&idx_path(&dir, coll), "writing", e))?;
        if index + 1 == f.len {
            f.end = end;
        }
        Ok(())
    }

    /// Elements `[start, start + count)` of a collection of length `len`;
    /// past the first element, cut where the data would exceed `max_bytes`.
    pub fn range(
        &mut self,
        coll: Oid,
        len: u64,
        start: u64,
        count: u64,
        max_bytes: u64,
    ) -> Result<Vec<Vec<u8>>> {
        if start >= len || count == 0 {
            return Ok(Vec::new());
        }
        let dir = self.dir.clone();
        let files = self.files_written(coll, len)?;
        ElementFiles {
            dir: &dir,
            coll,
            idx: &files.idx,
            dat: &files.dat,
        }
        .range(len, start, count, max_bytes)
    }

    /// Cut a collection's files to `len` elements (recovery).
    pub fn truncate(&mut self, coll: Oid, len: u64) -> Result<()> {
        let dir = self.dir.clone();
        let f = self.files_written(coll, len)?;
        if f.len < len {
            // Fewer elements than checkpointed: cutting .dat to match would
            // destroy elements still there.
            return Err(StorageError::Corrupted(format!(
                "{} holds {} elements, but the index says {len}",
                idx_path(&dir, coll).display(),
                f.len
            )));
        }
        let dat_len = if len == 0 {
            0
        } else {
            f.end_on_disk(&dir, coll, len - 1)?
        };
        let on_disk = file_len(&f.dat, &dat_path(&dir, coll))?;
        if dat_len > on_disk {
            // Cutting "to" a damaged offset would grow the file instead.
            return Err(StorageError::Corrupted(format!(
                "{}: element {} ends at offset {dat_len}, past the end of {} ({on_disk} bytes)",
                idx_path(&dir, coll).display(),
                len - 1,
                dat_path(&dir, coll).display()
            )));
        }
        if len > 0 && (on_disk > dat_len || f.len > len) {
            // Something is to be cut. An offset damaged to a smaller value
            // would cut elements still there, for good: the last element
            // kept must read back whole (its checksum) first.
            ElementFiles {
                dir: &dir,
                coll,
                idx: &f.idx,
                dat: &f.dat,
            }
            .range(len, len - 1, 1, u64::MAX)
            .map_err(|e| {
                StorageError::Corrupted(format!(
                    "{}: element {} does not read back whole, so its offset or its data \
                     is damaged; nothing was cut ({e})",
                    idx_path(&dir, coll).display(),
                    len - 1
                ))
            })?;
        }
        f.idx
            .set_len(len * 8)
            .map_err(|e| io_at(&idx_path(&dir, coll), "cutting", e))?;
        f.dat
            .set_len(dat_len)
            .map_err(|e| io_at(&dat_path(&dir, coll), "cutting", e))?;
        f.len = len;
        f.end = dat_len;
        Ok(())
    }

    /// Byte lengths of `(.idx, .dat)` holding `len` elements.
    pub fn lengths(&mut self, coll: Oid, len: u64) -> Result<(u64, u64)> {
        if len == 0 {
            return Ok((0, 0));
        }
        let dir = self.dir.clone();
        let f = self.files_written(coll, len)?;
        Ok((len * 8, f.end_on_disk(&dir, coll, len - 1)?))
    }

    /// Write every collection changed since the last call and hand out
    /// its two files for a parallel sync.
    pub fn dirty_sync_targets(&mut self) -> Result<Vec<SyncTarget>> {
        let dirty: Vec<Oid> = self.dirty.drain().collect();
        let mut targets = Vec::with_capacity(dirty.len() * 2);
        for coll in dirty {
            let dir = self.dir.clone();
            if let Some(f) = self.open.get_mut(&coll) {
                f.write_pending(&dir, coll)?;
                targets.push(SyncTarget::of(&f.idx, idx_path(&dir, coll))?);
                targets.push(SyncTarget::of(&f.dat, dat_path(&dir, coll))?);
            }
        }
        Ok(targets)
    }

    /// Sync `coll/` itself if files were created in it since the last call:
    /// a synced file whose name is not durable can vanish with a power
    /// loss (the checkpoint that covers it must not rely on the file
    /// system committing the name with the data).
    pub fn sync_new_names(&mut self) -> Result<()> {
        if std::mem::take(&mut self.created) {
            crate::storage::header::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Write and sync every collection changed since the last call.
    pub fn sync_dirty(&mut self) -> Result<()> {
        crate::storage::sync::sync_all(&self.dirty_sync_targets()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_records_round_trip_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = ObjectFile::open(dir.path(), 0).unwrap();
        let a = f.append(3, 9, "Person", &[0x91, 0x01]).unwrap();
        let b = f.append(4, 9, "", &[0xc0]).unwrap();
        // Readable while buffered and after being written.
        assert_eq!(f.read(b).unwrap().oid, 4);
        f.sync().unwrap();
        let r = f.read(a).unwrap();
        assert_eq!((r.oid, r.version, r.class.as_str()), (3, 9, "Person"));
        assert_eq!(r.value, vec![0x91, 0x01]);
        assert_eq!(f.read(b).unwrap().oid, 4);
        let len = f.len();
        drop(f);
        let path = dir.path().join(OBJECTS_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(a + 12) as usize] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let f = ObjectFile::open(dir.path(), len).unwrap();
        assert!(matches!(f.read(a), Err(StorageError::Corrupted(_))));
    }

    #[test]
    fn collections_write_range_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Collections::open(dir.path()).unwrap();
        for i in 0..100u64 {
            c.write(7, i, format!("v{i}").as_bytes()).unwrap();
        }
        let got = c.range(7, 100, 10, 5, u64::MAX).unwrap();
        assert_eq!(
            got,
            (10..15)
                .map(|i| format!("v{i}").into_bytes())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            c.range(7, 100, 0, 1, u64::MAX).unwrap(),
            vec![b"v0".to_vec()]
        );
        assert_eq!(c.range(7, 100, 98, 50, u64::MAX).unwrap().len(), 2);
        assert!(c.range(7, 100, 100, 5, u64::MAX).unwrap().is_empty());
        // Idempotent rewrite of an element at its position.
        c.write(7, 99, b"v99").unwrap();
        c.truncate(7, 50).unwrap();
        assert_eq!(c.lengths(7, 50).unwrap().0, 400);
        c.write(7, 50, b"new").unwrap();
        assert_eq!(
            c.range(7, 51, 49, 2, u64::MAX).unwrap(),
            vec![b"v49".to_vec(), b"new".to_vec()]
        );
        assert_eq!(c.existing().unwrap(), vec![7]);
    }

    #[test]
    fn a_damaged_element_offset_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Collections::open(dir.path()).unwrap();
        for i in 0..3u64 {
            c.write(7, i, b"v").unwrap();
        }
        c.sync_dirty().unwrap();
        drop(c);
        let idx = idx_path(&dir.path().join(COLL_DIR), 7);
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes[0..8].copy_from_slice(&0x0000_4000_0000_0000u64.to_le_bytes());
        std::fs::write(&idx, &bytes).unwrap();
        let mut c = Collections::open(dir.path()).unwrap();
        for err in [
            c.range(7, 3, 0, 1, u64::MAX).unwrap_err(),
            c.truncate(7, 1).unwrap_err(),
        ] {
            assert!(matches!(err, StorageError::Corrupted(_)), "{err}");
            assert!(err.to_string().contains("7.idx"), "{err}");
        }
    }

    #[test]
    fn a_missing_object_file_is_named_missing_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let err = ObjectFile::open(dir.path(), 465).err().unwrap();
        assert!(matches!(err, StorageError::Corrupted(_)), "{err}");
        assert!(err.to_string().contains("is missing"), "{err}");
        assert!(!dir.path().join(OBJECTS_FILE).exists());
        // A new repository's is created.
        ObjectFile::open(dir.path(), 0).unwrap();
        assert!(dir.path().join(OBJECTS_FILE).exists());
    }

    /// An offset damaged to a smaller value would make recovery cut the
    /// elements after it out of `.dat` for good: refused, nothing cut.
    #[test]
    fn recovery_never_cuts_at_an_offset_damaged_to_a_smaller_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Collections::open(dir.path()).unwrap();
        for i in 0..4u64 {
            c.write(7, i, format!("value {i}").as_bytes()).unwrap();
        }
        c.sync_dirty().unwrap();
        drop(c);
        let coll = dir.path().join(COLL_DIR);
        let dat_before = std::fs::read(dat_path(&coll, 7)).unwrap();
        let idx = idx_path(&coll, 7);
        let mut bytes = std::fs::read(&idx).unwrap();
        // Element 2 "ends" 3 bytes early.
        let end2 = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        bytes[16..24].copy_from_slice(&(end2 - 3).to_le_bytes());
        std::fs::write(&idx, &bytes).unwrap();
        let mut c = Collections::open(dir.path()).unwrap();
        let err = c.truncate(7, 3).unwrap_err();
        assert!(matches!(err, StorageError::Corrupted(_)), "{err}");
        assert!(err.to_string().contains("7.idx: element 2"), "{err}");
        assert!(err.to_string().contains("nothing was cut"), "{err}");
        drop(c);
        assert_eq!(std::fs::read(dat_path(&coll, 7)).unwrap(), dat_before);
        assert_eq!(std::fs::read(&idx).unwrap(), bytes);
    }
}
