//! The repository header: primitive attributes written apart from the
//! object model (the seed's "primitiveAttributes").
//!
//! Owns `DIR/header`, a fixed 128-byte block with a CRC. It is replaced
//! atomically (write `header.tmp`, fsync, rename over `header`, fsync the
//! directory), so a crash at any byte leaves either the old or the new
//! header, never a mixture. It must never hold anything that changes per
//! commit: it is rewritten only at checkpoints and mode changes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::storage::error::{Result, StorageError};
use crate::types::{CommitNumber, Epoch, Hash, Oid, RepositoryId};

pub const HEADER_FILE: &str = "header";
const HEADER_TMP: &str = "header.tmp";
const MAGIC: &[u8; 8] = b"MAGMAHDR";
/// The newest repository format this build reads and writes. Format 2 is
/// format 1 plus tombstones in `index.map` (flags bit 1 here); a header
/// says 2 only when that bit is set, so that a build that knows only
/// format 1 refuses a compacted copy instead of misreading its tombstones
/// as objects (and clearing the bit at its next checkpoint).
pub const FORMAT_VERSION: u32 = 2;
/// Format of a repository without tombstones.
const FORMAT_PLAIN: u32 = 1;
pub const HEADER_LEN: usize = 128;
const FLAG_RESTORE_MODE: u32 = 1;
const FLAG_TOMBSTONES: u32 = 2;

/// Primitive attributes of a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub repository_id: RepositoryId,
    /// This copy's server identity; 0 in a backup (a new one is chosen when
    /// a server first opens the copy).
    pub server_id: u64,
    pub restore_mode: bool,
    /// Compaction left tombstones in `index.map` (objects it dropped), so
    /// commits are checked against them. Set by `magma compact`, kept by
    /// every copy made from this one.
    pub tombstones: bool,
    /// Epoch of the last checkpointed record.
    pub epoch: Epoch,
    /// Last commit whose effects are durable in the data files and index.
    pub checkpoint: CommitNumber,
    /// Chain hash of that commit (genesis hash for 0).
    pub checkpoint_hash: Hash,
    /// Valid length of `objects.dat` at the checkpoint.
    pub objects_len: u64,
    /// Next oid to assign, as of the checkpoint.
    pub next_oid: Oid,
    /// First record number of the commit-log segment that was current
    /// when this header was written; 0 when the log had no segment (a
    /// backup, a new copy) or the header predates this field. The log
    /// never deletes its current segment, so while this header stands
    /// that segment's file must exist: opening checks it, so a deleted
    /// `log/` is refused instead of silently losing the commits after the
    /// checkpoint.
    pub log_segment: CommitNumber,
}

impl Header {
    /// The format this header is written in (see [`FORMAT_VERSION`]).
    pub fn format(&self) -> u32 {
        if self.tombstones {
            FORMAT_VERSION
        } else {
            FORMAT_PLAIN
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format().to_le_bytes());
        let mut flags = 0;
        if self.restore_mode {
            flags |= FLAG_RESTORE_MODE;
        }
        if self.tombstones {
            flags |= FLAG_TOMBSTONES;
        }
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.repository_id.0);
        b[32..40].copy_from_slice(&self.server_id.to_le_bytes());
        b[40..48].copy_from_slice(&self.epoch.term.to_le_bytes());
        b[48..56].copy_from_slice(&self.epoch.server.to_le_bytes());
        b[56..64].copy_from_slice(&self.checkpoint.to_le_bytes());
        b[64..96].copy_from_slice(&self.checkpoint_hash);
        b[96..104].copy_from_slice(&self.objects_len.to_le_bytes());
        b[104..112].copy_from_slice(&self.next_oid.to_le_bytes());
        b[112..120].copy_from_slice(&self.log_segment.to_le_bytes());
        let crc = crc32fast::hash(&b[0..120]);
        b[120..124].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8], path: &Path) -> Result<Header> {
        if b.len() < 12 || &b[0..8] != MAGIC {
            return Err(StorageError::NotARepository(path.to_path_buf()));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        // A damaged header of this build's size is damage, whatever its
        // version field says (a flipped bit there is not another format).
        let crc_fails = |b: &[u8]| {
            u32::from_le_bytes(b[120..124].try_into().unwrap()) != crc32fast::hash(&b[0..120])
        };
        let known = (FORMAT_PLAIN..=FORMAT_VERSION).contains(&version);
        if b.len() == HEADER_LEN && !known && crc_fails(b) {
            return Err(StorageError::Corrupted(format!(
                "header {} fails its checksum",
                path.display()
            )));
        }
        if !known {
            return Err(StorageError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if b.len() != HEADER_LEN {
            return Err(StorageError::Corrupted(format!(
                "header {} is {} bytes, expected {HEADER_LEN}",
                path.display(),
                b.len()
            )));
        }
        let crc = u32::from_le_bytes(b[120..124].try_into().unwrap());
        if crc != crc32fast::hash(&b[0..120]) {
            return Err(StorageError::Corrupted(format!(
                "header {} fails its checksum",
                path.display()
            )));
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let flags = u32::from_le_bytes(b[12..16].try_into().unwrap());
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..32]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[64..96]);
        Ok(Header {
            repository_id: RepositoryId(id),
            server_id: u(32),
            restore_mode: flags & FLAG_RESTORE_MODE != 0,
            tombstones: flags & FLAG_TOMBSTONES != 0,
            epoch: Epoch {
                term: u(40),
                server: u(48),
            },
            checkpoint: u(56),
            checkpoint_hash: hash,
            objects_len: u(96),
            next_oid: u(104),
            log_segment: u(112),
        })
    }

    /// Read `DIR/header`. A missing file means "not a repository".
    pub fn read(dir: &Path) -> Result<Header> {
        let path = dir.join(HEADER_FILE);
        match fs::read(&path) {
            Ok(bytes) => Header::decode(&bytes, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NotARepository(dir.to_path_buf()))
            }
            Err(e) => Err(StorageError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Atomically replace `DIR/header`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomically(dir, &self.encode())
    }
}

fn write_atomically(dir: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(HEADER_TMP);
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StorageError::io(ctx("creating"), e))?;
    f.write_all(bytes)
        .map_err(|e| StorageError::io(ctx("writing"), e))?;
    f.sync_all()
        .map_err(|e| StorageError::io(ctx("syncing"), e))?;
    fs::rename(&tmp, dir.join(HEADER_FILE)).map_err(|e| StorageError::io(ctx("renaming"), e))?;
    sync_dir(dir)
}

/// fsync a directory so renames and new files in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            repository_id: RepositoryId([7; 16]),
            server_id: 42,
            restore_mode: true,
            tombstones: true,
            epoch: Epoch { term: 3, server: 9 },
            checkpoint: 1000,
            checkpoint_hash: [5; 32],
            objects_len: 123456,
            next_oid: 77,
            log_segment: 901,
        }
    }

    #[test]
    fn header_round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        for tombstones in [true, false] {
            let h = Header {
                tombstones,
                ..sample()
            };
            h.write(dir.path()).unwrap();
            assert_eq!(Header::read(dir.path()).unwrap(), h);
            assert!(!dir.path().join(HEADER_TMP).exists());
            // Only a compacted copy needs a build that knows tombstones.
            let version = &fs::read(dir.path().join(HEADER_FILE)).unwrap()[8..12];
            let want = if tombstones { 2u32 } else { 1 };
            assert_eq!(version, want.to_le_bytes());
        }
    }

    #[test]
    fn corrupt_header_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        sample().write(dir.path()).unwrap();
        let path = dir.path().join(HEADER_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[60] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = Header::read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        bytes.truncate(50);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Header::read(dir.path()),
            Err(StorageError::Corrupted(_))
        ));
    }

    #[test]
    fn a_flipped_version_bit_is_damage_and_another_version_is_named_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        sample().write(dir.path()).unwrap();
        let path = dir.path().join(HEADER_FILE);
        let good = fs::read(&path).unwrap();
        let mut bytes = good.clone();
        bytes[9] ^= 0x04;
        fs::write(&path, &bytes).unwrap();
        let err = Header::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("checksum") && err.contains(HEADER_FILE),
            "{err}"
        );
        // A real other version: its checksum holds.
        let mut other = good;
        other[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32fast::hash(&other[0..120]);
        other[120..124].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, &other).unwrap();
        match Header::read(dir.path()) {
            Err(e @ StorageError::UnsupportedFormat { .. }) => {
                assert!(e.to_string().contains(HEADER_FILE), "{e}")
            }
            other => panic!("expected unsupported format, got {other:?}"),
        }
    }

    #[test]
    fn missing_or_foreign_header_is_not_a_repository() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Header::read(dir.path()),
            Err(StorageError::NotARepository(_))
        ));
        fs::write(dir.path().join(HEADER_FILE), b"hello world, not magma").unwrap();
        assert!(matches!(
            Header::read(dir.path()),
            Err(StorageError::NotARepository(_))
        ));
    }
}
