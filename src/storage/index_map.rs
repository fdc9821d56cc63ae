//! The oid → location index, a memory-mapped array (`DIR/index.map`).
//!
//! Owns the only `unsafe` code of the crate. Layout: a 64-byte head (magic,
//! entry capacity, CRC) then one 32-byte entry per oid at `64 + oid * 32`:
//! `loc u64 | version u64 | coll_len u64 | flags u32 | crc32 u32`, where
//! `loc` is 1 + the record's offset in `objects.dat` (0: no object) and the
//! CRC covers the first 28 bytes. An all-zero entry is an absent oid.
//! `flags`: [`FLAG_COLLECTION`] (a large collection) and [`FLAG_DROPPED`]: a
//! *tombstone* (`loc` 0) that compaction leaves for an object it dropped as
//! unreachable. A tombstone is an absent oid to every reader
//! ([`IndexMap::get`] answers `None`); only [`IndexMap::dropped`] tells it
//! apart, so that a later commit needing the object is caught instead of
//! leaving a reference dangling on this copy only (`Repository`).
//!
//! The file holds only checkpointed state: the repository writes entries
//! here at checkpoints and keeps newer ones in memory, so what the OS
//! writes back early can never describe a commit the log may lose.
//!
//! A checkpoint's entries land in the map before the header names the new
//! checkpoint, so a crash in between would leave entries the old header
//! does not describe (pointing past the objects file it keeps, or naming a
//! newer anchor than its replay starts from). [`IndexMap::set_checkpoint`]
//! first writes the entries it replaces to `DIR/index.undo` (synced), and
//! [`IndexMap::recover`] puts them back at open unless the header reached
//! that checkpoint: the map always matches the header.
//!
//! Soundness invariants of the mapping (checked by construction):
//! - the repository directory is held under an exclusive `flock`, so no
//!   other process maps or truncates this file;
//! - the file is only ever grown, never truncated, while mapped;
//! - remapping happens only in `grow`, which takes `&mut self`, so no
//!   reference into the old mapping can outlive it.
//!
//! [`IndexReader`] maps the index of a backup read-only, for offline tools
//! (compaction). Its caller holds the directory's lock if it has one, and
//! a backup that has none was never opened by a server; a server opening
//! it later only grows the file. Either way nothing truncates it while
//! mapped. It also maps a private copy of the live index for a digest
//! (`storage::digest`): an unnamed file nobody else can open.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

use crate::storage::error::{Result, StorageError};
use crate::types::{CommitNumber, Oid};

pub const INDEX_FILE: &str = "index.map";
/// The entries a checkpoint in progress replaces (see the module doc).
pub const UNDO_FILE: &str = "index.undo";
const UNDO_MAGIC: &[u8; 8] = b"MAGUNDO1";
const MAGIC: &[u8; 8] = b"MAGIDX01";
pub(crate) const HEAD_LEN: u64 = 64;
pub(crate) const ENTRY_LEN: u64 = 32;
const INITIAL_CAPACITY: u64 = 4096;
pub const FLAG_COLLECTION: u32 = 1;
/// A tombstone: the oid's object was dropped by compaction (module doc).
pub const FLAG_DROPPED: u32 = 2;

/// One oid's location and version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    /// 1 + offset of the object's latest record in `objects.dat`.
    pub loc: u64,
    pub version: u64,
    /// Length of a large collection (0 otherwise).
    pub coll_len: u64,
    pub flags: u32,
}

impl IndexEntry {
    pub fn is_collection(&self) -> bool {
        self.flags & FLAG_COLLECTION != 0
    }

    /// The tombstone of an object compaction dropped.
    pub fn tombstone() -> IndexEntry {
        IndexEntry {
            flags: FLAG_DROPPED,
            ..IndexEntry::default()
        }
    }

    pub fn is_dropped(&self) -> bool {
        self.flags & FLAG_DROPPED != 0
    }

    fn encode(&self) -> [u8; ENTRY_LEN as usize] {
        let mut b = [0u8; ENTRY_LEN as usize];
        b[0..8].copy_from_slice(&self.loc.to_le_bytes());
        b[8..16].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.coll_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

pub struct IndexMap {
    path: PathBuf,
    file: File,
    map: MmapMut,
    capacity: u64,
}

fn head_bytes(capacity: u64) -> [u8; HEAD_LEN as usize] {
    let mut h = [0u8; HEAD_LEN as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&capacity.to_le_bytes());
    let crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decode entry `oid` of a whole mapped index of `capacity` entries,
/// tombstones included.
fn entry_at(map: &[u8], capacity: u64, oid: Oid, path: &Path) -> Result<Option<IndexEntry>> {
    if oid >= capacity {
        return Ok(None);
    }
    let at = (HEAD_LEN + oid * ENTRY_LEN) as usize;
    let b = &map[at..at + ENTRY_LEN as usize];
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let flags = u32::from_le_bytes(b[24..28].try_into().unwrap());
    let crc = u32::from_le_bytes(b[28..32].try_into().unwrap());
    if crc != crc32fast::hash(&b[0..28]) {
        return Err(StorageError::Corrupted(format!(
            "{}: entry of oid {oid} fails its checksum",
            path.display()
        )));
    }
    Ok(Some(IndexEntry {
        loc: u(0),
        version: u(8),
        coll_len: u(16),
        flags,
    }))
}

impl IndexMap {
    /// Open `DIR/index.map` of a repository checkpointed at `checkpoint`,
    /// creating an empty index if absent before any checkpoint. Once a
    /// checkpoint was taken the index holds its entries: missing, or all
    /// zeros, it is damage, not a fresh start.
    pub fn open(dir: &Path, checkpoint: CommitNumber) -> Result<IndexMap> {
        let path = dir.join(INDEX_FILE);
        let ctx = |what: &str| format!("{what} {}", path.display());
        if checkpoint > 0 && !path.exists() {
            return Err(StorageError::Corrupted(format!(
                "{} is missing, but the repository was checkpointed at commit {checkpoint}",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(checkpoint == 0)
            .truncate(false)
            .open(&path)
            .map_err(|e| StorageError::io(ctx("opening"), e))?;
        let len = file
            .metadata()
            .map_err(|e| StorageError::io(ctx("inspecting"), e))?
            .len();
        if len == 0 {
            let size = HEAD_LEN + INITIAL_CAPACITY * ENTRY_LEN;
            file.set_len(size)
                .map_err(|e| StorageError::io(ctx("sizing"), e))?;
        } else if len < HEAD_LEN || !(len - HEAD_LEN).is_multiple_of(ENTRY_LEN) {
            return Err(StorageError::Corrupted(format!(
                "{} has impossible length {len}",
                path.display()
            )));
        }
        // SAFETY: the file is exclusively ours (repository flock), it is
        // never truncated while mapped, and the mapping lives in `self`,
        // which hands out no references that outlive a `&self` borrow.
        let mut map =
            unsafe { MmapMut::map_mut(&file) }.map_err(|e| StorageError::io(ctx("mapping"), e))?;
        // The head names the capacity. A file longer than that is a
        // growth cut short by a crash (`grow` sizes the file before it
        // writes the new head): the extra entries were never in use. An
        // all-zero file is a creation cut short the same way.
        let head = &map[0..HEAD_LEN as usize];
        let named = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let capacity = if head == head_bytes(named)
            && named
                .checked_mul(ENTRY_LEN)
                .and_then(|b| b.checked_add(HEAD_LEN))
                .is_some_and(|need| need <= map.len() as u64)
        {
            named
        } else if checkpoint == 0 && map.iter().all(|&b| b == 0) {
            let by_len = (map.len() as u64 - HEAD_LEN) / ENTRY_LEN;
            map[0..HEAD_LEN as usize].copy_from_slice(&head_bytes(by_len));
            by_len
        } else if map.iter().all(|&b| b == 0) {
            return Err(StorageError::Corrupted(format!(
                "{} is all zeros, but the repository was checkpointed at commit {checkpoint}",
                path.display()
            )));
        } else {
            return Err(StorageError::Corrupted(format!(
                "{} has a bad head (magic, capacity or checksum)",
                path.display()
            )));
        };
        Ok(IndexMap {
            path,
            file,
            map,
            capacity,
        })
    }

    #[cfg(test)]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `oid`'s entry; `None` if it has none or a tombstone.
    pub fn get(&self, oid: Oid) -> Result<Option<IndexEntry>> {
        Ok(entry_at(&self.map, self.capacity, oid, &self.path)?.filter(|e| !e.is_dropped()))
    }

    /// Whether `oid` has a tombstone: compaction dropped its object.
    pub fn dropped(&self, oid: Oid) -> Result<bool> {
        Ok(entry_at(&self.map, self.capacity, oid, &self.path)?.is_some_and(|e| e.is_dropped()))
    }

    pub fn set(&mut self, oid: Oid, entry: &IndexEntry) -> Result<()> {
        if oid >= self.capacity {
            self.grow(oid + 1)?;
        }
        let at = (HEAD_LEN + oid * ENTRY_LEN) as usize;
        self.map[at..at + ENTRY_LEN as usize].copy_from_slice(&entry.encode());
        Ok(())
    }

    fn grow(&mut self, min_capacity: u64) -> Result<()> {
        let ctx = |what: &str| format!("{what} {}", self.path.display());
        // The file may already be longer than the head says (a growth cut
        // short by a crash): never shrink it while it is mapped.
        let file_len = self
            .file
            .metadata()
            .map_err(|e| StorageError::io(ctx("inspecting"), e))?
            .len();
        let mut capacity = self.capacity.max(INITIAL_CAPACITY);
        while capacity < min_capacity || HEAD_LEN + capacity * ENTRY_LEN < file_len {
            capacity *= 2;
        }
        self.map
            .flush()
            .map_err(|e| StorageError::io(ctx("flushing"), e))?;
        self.file
            .set_len(HEAD_LEN + capacity * ENTRY_LEN)
            .map_err(|e| StorageError::io(ctx("growing"), e))?;
        // SAFETY: as in `open`; `&mut self` guarantees no borrow of the old
        // mapping is alive, and the file only grew.
        let mut map = unsafe { MmapMut::map_mut(&self.file) }
            .map_err(|e| StorageError::io(ctx("remapping"), e))?;
        map[0..HEAD_LEN as usize].copy_from_slice(&head_bytes(capacity));
        self.map = map;
        self.capacity = capacity;
        Ok(())
    }

    /// The raw bytes of `oid`'s entry (zeros when absent).
    fn raw(&self, oid: Oid) -> [u8; ENTRY_LEN as usize] {
        let mut b = [0u8; ENTRY_LEN as usize];
        if oid < self.capacity {
            let at = (HEAD_LEN + oid * ENTRY_LEN) as usize;
            b.copy_from_slice(&self.map[at..at + ENTRY_LEN as usize]);
        }
        b
    }

    fn set_raw(&mut self, oid: Oid, bytes: &[u8; ENTRY_LEN as usize]) -> Result<()> {
        if oid >= self.capacity {
            if bytes.iter().all(|&b| b == 0) {
                return Ok(());
            }
            self.grow(oid + 1)?;
        }
        let at = (HEAD_LEN + oid * ENTRY_LEN) as usize;
        self.map[at..at + ENTRY_LEN as usize].copy_from_slice(bytes);
        Ok(())
    }

    /// Write the entries of checkpoint `target` and flush them, having
    /// first saved the ones they replace (synced) for [`IndexMap::recover`].
    /// The caller writes the header, then calls [`IndexMap::checkpointed`].
    pub fn set_checkpoint(&mut self, target: u64, entries: &[(Oid, IndexEntry)]) -> Result<()> {
        let dir = self.path.parent().expect("index.map is in a directory");
        let undo = dir.join(UNDO_FILE);
        let ctx = |what: &str| format!("{what} {}", undo.display());
        let mut bytes = Vec::with_capacity(28 + entries.len() * (8 + ENTRY_LEN as usize));
        bytes.extend_from_slice(UNDO_MAGIC);
        bytes.extend_from_slice(&target.to_le_bytes());
        bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (oid, _) in entries {
            bytes.extend_from_slice(&oid.to_le_bytes());
            bytes.extend_from_slice(&self.raw(*oid));
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let mut f = File::create(&undo).map_err(|e| StorageError::io(ctx("creating"), e))?;
        std::io::Write::write_all(&mut f, &bytes)
            .map_err(|e| StorageError::io(ctx("writing"), e))?;
        f.sync_all()
            .map_err(|e| StorageError::io(ctx("syncing"), e))?;
        crate::storage::header::sync_dir(dir)?;
        for (oid, e) in entries {
            self.set(*oid, e)?;
        }
        self.flush()
    }

    /// The header names the checkpoint [`IndexMap::set_checkpoint`] wrote:
    /// its saved entries are no longer needed.
    pub fn checkpointed(&self) -> Result<()> {
        let dir = self.path.parent().expect("index.map is in a directory");
        let undo = dir.join(UNDO_FILE);
        match std::fs::remove_file(&undo) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(format!("removing {}", undo.display()), e)),
        }
    }

    /// At open: if a checkpoint was cut short (the header names an older
    /// one than the saved entries were replaced for), put them back.
    /// Returns how many entries were restored.
    pub fn recover(&mut self, checkpoint: u64) -> Result<usize> {
        let dir = self.path.parent().expect("index.map is in a directory");
        let undo = dir.join(UNDO_FILE);
        let bytes = match std::fs::read(&undo) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StorageError::io(format!("reading {}", undo.display()), e)),
        };
        let rec = 8 + ENTRY_LEN as usize;
        let body_len = bytes.len().saturating_sub(4);
        let whole = bytes.len() >= 28
            && &bytes[0..8] == UNDO_MAGIC
            && crc32fast::hash(&bytes[..body_len]).to_le_bytes()[..] == bytes[body_len..]
            && u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"))
                .checked_mul(rec as u64)
                .is_some_and(|n| n == (body_len - 24) as u64);
        // A torn save was never followed by a change to the map (it is
        // synced first): nothing to undo.
        let target = u64::from_le_bytes(
            bytes
                .get(8..16)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        );
        let mut restored = 0;
        if whole && checkpoint < target {
            for r in bytes[24..body_len].chunks_exact(rec) {
                let oid = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                let old: [u8; ENTRY_LEN as usize] = r[8..].try_into().expect("32 bytes");
                self.set_raw(oid, &old)?;
                restored += 1;
            }
            self.flush()?;
        }
        self.checkpointed()?;
        Ok(restored)
    }

    /// msync: make every `set` so far durable.
    pub fn flush(&self) -> Result<()> {
        self.map
            .flush()
            .map_err(|e| StorageError::io(format!("flushing {}", self.path.display()), e))
    }

    /// The file and its length, to pin for a copy made on another thread
    /// (`index_copy`).
    pub fn file(&self) -> (&Path, u64) {
        (&self.path, self.map.len() as u64)
    }

    /// Every oid below `limit` that has an entry, in order.
    #[cfg(test)]
    pub fn oids(&self, limit: Oid) -> impl Iterator<Item = Oid> + '_ {
        (0..limit.min(self.capacity)).filter(move |&oid| {
            let at = (HEAD_LEN + oid * ENTRY_LEN) as usize;
            self.map[at..at + ENTRY_LEN as usize]
                .iter()
                .any(|&x| x != 0)
        })
    }
}

/// A read-only view of a backup's `index.map` (see the module doc).
pub struct IndexReader {
    path: PathBuf,
    map: Mmap,
    capacity: u64,
}

impl IndexReader {
    /// Map `DIR/index.map` read-only; it must exist and have a valid head.
    pub fn open(dir: &Path) -> Result<IndexReader> {
        let path = dir.join(INDEX_FILE);
        let file = File::open(&path)
            .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
        Self::from_file(file, &path)
    }

    /// Map an index read-only from an open `file` (named `path` in errors):
    /// a copy nobody else writes, or a backup's (see [`IndexReader::open`]).
    pub fn from_file(file: File, path: &Path) -> Result<IndexReader> {
        let path = path.to_path_buf();
        let ctx = |what: &str| format!("{what} {}", path.display());
        let len = file
            .metadata()
            .map_err(|e| StorageError::io(ctx("inspecting"), e))?
            .len();
        if len < HEAD_LEN || !(len - HEAD_LEN).is_multiple_of(ENTRY_LEN) {
            return Err(StorageError::Corrupted(format!(
                "{} has impossible length {len}",
                path.display()
            )));
        }
        let capacity = (len - HEAD_LEN) / ENTRY_LEN;
        // SAFETY: a read-only mapping of a file nobody truncates while it is
        // mapped (module doc); the mapping lives in `self` and only `&self`
        // borrows of it are handed out.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StorageError::io(ctx("mapping"), e))?;
        if map[0..HEAD_LEN as usize] != head_bytes(capacity) {
            return Err(StorageError::Corrupted(format!(
                "{} has a bad head (magic, capacity or checksum)",
                path.display()
            )));
        }
        Ok(IndexReader {
            path,
            map,
            capacity,
        })
    }

    /// `oid`'s entry; `None` if it has none or a tombstone.
    pub fn get(&self, oid: Oid) -> Result<Option<IndexEntry>> {
        Ok(entry_at(&self.map, self.capacity, oid, &self.path)?.filter(|e| !e.is_dropped()))
    }

    /// Whether `oid` has a tombstone: compaction dropped its object.
    pub fn dropped(&self, oid: Oid) -> Result<bool> {
        Ok(entry_at(&self.map, self.capacity, oid, &self.path)?.is_some_and(|e| e.is_dropped()))
    }

    /// Entries the file has room for: every oid at or above it is absent.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How many oids have an entry (tombstones not counted).
    pub fn count(&self) -> u64 {
        self.map[HEAD_LEN as usize..]
            .chunks_exact(ENTRY_LEN as usize)
            .filter(|e| {
                let flags = u32::from_le_bytes(e[24..28].try_into().expect("4 bytes"));
                e.iter().any(|&x| x != 0) && flags & FLAG_DROPPED == 0
            })
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_persists_entries() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut idx = IndexMap::open(dir.path(), 0).unwrap();
            for oid in [0u64, 5, 10_000, 100_000] {
                idx.set(
                    oid,
                    &IndexEntry {
                        loc: oid + 1,
                        version: 7,
                        coll_len: oid * 2,
                        flags: 0,
                    },
                )
                .unwrap();
            }
            assert!(idx.capacity() > 100_000);
            idx.flush().unwrap();
        }
        let idx = IndexMap::open(dir.path(), 0).unwrap();
        assert_eq!(idx.get(10_000).unwrap().unwrap().coll_len, 20_000);
        assert_eq!(idx.get(1).unwrap(), None);
        assert_eq!(idx.get(u64::MAX / 64).unwrap(), None);
        assert_eq!(
            idx.oids(200_000).collect::<Vec<_>>(),
            vec![0, 5, 10_000, 100_000]
        );
        drop(idx);
        let ro = IndexReader::open(dir.path()).unwrap();
        assert_eq!(ro.get(10_000).unwrap().unwrap().coll_len, 20_000);
        assert_eq!(ro.get(1).unwrap(), None);
        assert_eq!(ro.get(u64::MAX / 64).unwrap(), None);
        assert_eq!(ro.count(), 4);
    }

    #[test]
    fn a_tombstone_is_absent_to_readers_but_known_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut idx = IndexMap::open(dir.path(), 0).unwrap();
            let live = IndexEntry {
                loc: 1,
                version: 3,
                coll_len: 0,
                flags: 0,
            };
            idx.set(4, &live).unwrap();
            idx.set(9, &IndexEntry::tombstone()).unwrap();
            assert_eq!(idx.get(9).unwrap(), None);
            assert!(idx.dropped(9).unwrap());
            assert!(!idx.dropped(4).unwrap() && !idx.dropped(5).unwrap());
            assert!(!idx.dropped(u64::MAX / 64).unwrap());
            // A live entry written over the tombstone (a commit that wrote
            // the object again) ends it.
            idx.set(9, &live).unwrap();
            assert!(!idx.dropped(9).unwrap());
            assert_eq!(idx.get(9).unwrap(), Some(live));
            idx.set(9, &IndexEntry::tombstone()).unwrap();
            idx.flush().unwrap();
        }
        let ro = IndexReader::open(dir.path()).unwrap();
        assert_eq!(ro.get(9).unwrap(), None);
        assert!(ro.dropped(9).unwrap() && !ro.dropped(4).unwrap());
        assert_eq!(ro.count(), 1, "a tombstone is not an object");
    }

    #[test]
    fn a_growth_or_creation_cut_short_by_a_crash_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INDEX_FILE);
        let entry = IndexEntry {
            loc: 9,
            version: 2,
            coll_len: 0,
            flags: 0,
        };
        {
            let mut idx = IndexMap::open(dir.path(), 0).unwrap();
            idx.set(7, &entry).unwrap();
            idx.flush().unwrap();
        }
        // `grow` sized the file, then died before writing the new head.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEAD_LEN + 4 * INITIAL_CAPACITY * ENTRY_LEN)
            .unwrap();
        drop(f);
        let mut idx = IndexMap::open(dir.path(), 0).unwrap();
        assert_eq!(idx.capacity(), INITIAL_CAPACITY);
        assert_eq!(idx.get(7).unwrap(), Some(entry));
        // Growing again never shrinks the longer file.
        idx.set(INITIAL_CAPACITY + 1, &entry).unwrap();
        idx.flush().unwrap();
        drop(idx);
        assert!(
            std::fs::metadata(&path).unwrap().len() >= HEAD_LEN + 4 * INITIAL_CAPACITY * ENTRY_LEN
        );
        let idx = IndexMap::open(dir.path(), 0).unwrap();
        assert_eq!(idx.get(INITIAL_CAPACITY + 1).unwrap(), Some(entry));
        assert_eq!(idx.get(7).unwrap(), Some(entry));
        drop(idx);

        // Creation sized the file and died before writing the head.
        let fresh = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(fresh.path().join(INDEX_FILE)).unwrap();
        f.set_len(HEAD_LEN + INITIAL_CAPACITY * ENTRY_LEN).unwrap();
        drop(f);
        assert_eq!(
            IndexMap::open(fresh.path(), 0).unwrap().get(7).unwrap(),
            None
        );
        // A shorter all-zero file: its capacity is what it holds.
        std::fs::write(fresh.path().join(INDEX_FILE), vec![0u8; 96]).unwrap();
        let mut short = IndexMap::open(fresh.path(), 0).unwrap();
        assert_eq!((short.capacity(), short.get(0).unwrap()), (1, None));
        assert_eq!(short.get(7).unwrap(), None);
        short.set(7, &entry).unwrap();
        assert_eq!(short.get(7).unwrap(), Some(entry));
        drop(short);

        // A zeroed head over entries in use is damage, not a fresh index.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..HEAD_LEN as usize].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            IndexMap::open(dir.path(), 0),
            Err(StorageError::Corrupted(_))
        ));
    }

    #[test]
    fn a_checkpoint_is_undone_unless_the_header_reached_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = |loc| IndexEntry {
            loc,
            version: loc,
            coll_len: 0,
            flags: 0,
        };
        let mut idx = IndexMap::open(dir.path(), 0).unwrap();
        idx.set_checkpoint(3, &[(1, e(1))]).unwrap();
        idx.checkpointed().unwrap();
        // Entries 1 (changed) and 9000 (new, past the capacity: the map
        // grows) of checkpoint 5, cut short before its header.
        idx.set_checkpoint(5, &[(1, e(2)), (9000, e(3))]).unwrap();
        drop(idx);
        let mut idx = IndexMap::open(dir.path(), 0).unwrap();
        assert_eq!(idx.recover(3).unwrap(), 2);
        assert_eq!(idx.get(1).unwrap(), Some(e(1)));
        assert_eq!(idx.get(9000).unwrap(), None);
        assert!(!dir.path().join(UNDO_FILE).exists());
        // Cut short after its header: kept.
        idx.set_checkpoint(5, &[(1, e(2))]).unwrap();
        drop(idx);
        let mut idx = IndexMap::open(dir.path(), 0).unwrap();
        assert_eq!(idx.recover(5).unwrap(), 0);
        assert_eq!(idx.get(1).unwrap(), Some(e(2)));
        // A torn save (the crash came while writing it): nothing had
        // changed yet, nothing is undone.
        std::fs::write(dir.path().join(UNDO_FILE), &b"MAGUNDO1\x07"[..]).unwrap();
        assert_eq!(idx.recover(1).unwrap(), 0);
        assert_eq!(idx.get(1).unwrap(), Some(e(2)));
    }

    #[test]
    fn corrupt_entry_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut idx = IndexMap::open(dir.path(), 0).unwrap();
            idx.set(
                3,
                &IndexEntry {
                    loc: 1,
                    version: 1,
                    coll_len: 0,
                    flags: 0,
                },
            )
            .unwrap();
            idx.flush().unwrap();
        }
        let path = dir.path().join(INDEX_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(HEAD_LEN + 3 * ENTRY_LEN + 9) as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let idx = IndexMap::open(dir.path(), 0).unwrap();
        assert!(matches!(idx.get(3), Err(StorageError::Corrupted(_))));
    }
}
