//! The two files that say what a backup directory is: `MANIFEST` (complete)
//! and `BACKUP-INCOMPLETE` (not), and [`seal`], the one way a backup
//! becomes complete.
//!
//! The manifest is JSON (one object, described in `docs/STORAGE.md`) so an
//! operator can read it with any tool. It is written last, through a
//! temporary file, fsynced and renamed, so it exists only once every file it
//! lists is durable. This module never decides what to copy; it records
//! what was copied.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::storage::commit_log::LOG_DIR;
use crate::storage::error::{Result, StorageError};
use crate::storage::header::{sync_dir, FORMAT_VERSION, HEADER_FILE};
use crate::storage::object_store::COLL_DIR;
use crate::types::{hex, CommitNumber, RepositoryId};

pub const MANIFEST_FILE: &str = "MANIFEST";
const MANIFEST_TMP: &str = "MANIFEST.tmp";
pub const INCOMPLETE_FILE: &str = "BACKUP-INCOMPLETE";
/// The manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "magma-backup";
/// The manifest's `manifest_version` this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// One file of a backup, as copied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative to the backup directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// BLAKE3 of the whole file, lowercase hex.
    pub blake3: String,
}

/// The contents of `MANIFEST`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    pub manifest_version: u32,
    /// The repository format version of the header.
    pub repository_format: u32,
    /// Hex, as in `status`.
    pub repository_id: String,
    /// The commit the backup holds exactly; its log continues at +1.
    pub snapshot_commit: CommitNumber,
    pub created_unix_ms: u64,
    /// Who took it: the server's address, or the directory copied.
    pub source: String,
    /// Every file of the backup except the manifest itself, `header` last.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Read and parse `DIR/MANIFEST`.
    pub fn read(dir: &Path) -> std::result::Result<Manifest, String> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a valid manifest: {e}", path.display()))
    }

    /// Write `DIR/MANIFEST` atomically: temporary file, fsync, rename,
    /// fsync of the directory.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(MANIFEST_TMP);
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut text = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        text.push(b'\n');
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StorageError::backup_io(ctx("creating"), e))?;
        f.write_all(&text)
            .map_err(|e| StorageError::backup_io(ctx("writing"), e))?;
        f.sync_all()
            .map_err(|e| StorageError::backup_io(ctx("syncing"), e))?;
        fs::rename(&tmp, dir.join(MANIFEST_FILE))
            .map_err(|e| StorageError::backup_io(ctx("renaming"), e))?;
        sync_backup_dir(dir)
    }
}

/// Write (or replace) `DIR/BACKUP-INCOMPLETE` with `text`, fsynced.
pub fn write_marker(dir: &Path, text: &str) -> Result<()> {
    let path = dir.join(INCOMPLETE_FILE);
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut f = File::create(&path).map_err(|e| StorageError::backup_io(ctx("creating"), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| StorageError::backup_io(ctx("writing"), e))?;
    f.sync_all()
        .map_err(|e| StorageError::backup_io(ctx("syncing"), e))?;
    // Its name too: a marker that vanished would make an unfinished copy
    // look like one with nothing to say.
    sync_backup_dir(dir)
}

/// The text of `DIR/BACKUP-INCOMPLETE`, if there is one.
pub fn read_marker(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(INCOMPLETE_FILE)).ok()
}

pub(crate) fn sync_backup_dir(dir: &Path) -> Result<()> {
    sync_dir(dir).map_err(|e| match e {
        StorageError::Io { context, source } => StorageError::BackupIo { context, source },
        other => other,
    })
}

/// Make a backup whose data files are all in place and fsynced complete:
/// write the header (restore-mode bit set by whoever made `header`), create
/// the empty log directory, remove the incomplete marker, then write the
/// manifest, last. A crash at any point before the rename of the manifest
/// leaves a directory without a manifest: incomplete, as it should be.
pub fn seal(
    dir: &Path,
    header: &[u8],
    mut files: Vec<ManifestFile>,
    repository_id: RepositoryId,
    snapshot_commit: CommitNumber,
    source: &str,
) -> Result<Manifest> {
    let path = dir.join(HEADER_FILE);
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut f = File::create(&path).map_err(|e| StorageError::backup_io(ctx("creating"), e))?;
    f.write_all(header)
        .map_err(|e| StorageError::backup_io(ctx("writing"), e))?;
    f.sync_all()
        .map_err(|e| StorageError::backup_io(ctx("syncing"), e))?;
    files.push(ManifestFile {
        path: HEADER_FILE.to_string(),
        size: header.len() as u64,
        blake3: hex(blake3::hash(header).as_bytes()),
    });
    for sub in [COLL_DIR, LOG_DIR] {
        let d = dir.join(sub);
        fs::create_dir_all(&d)
            .map_err(|e| StorageError::backup_io(format!("creating {}", d.display()), e))?;
        sync_backup_dir(&d)?;
    }
    match fs::remove_file(dir.join(INCOMPLETE_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StorageError::backup_io(
                format!("removing {}", dir.join(INCOMPLETE_FILE).display()),
                e,
            ))
        }
    }
    sync_backup_dir(dir)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        manifest_version: MANIFEST_VERSION,
        // The header's own format (bytes 8..12): 2 only for a copy with
        // tombstones.
        repository_format: header
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .unwrap_or(FORMAT_VERSION),
        repository_id: repository_id.to_string(),
        snapshot_commit,
        created_unix_ms: super::unix_ms_now(),
        source: source.to_string(),
        files,
    };
    manifest.write(dir)?;
    Ok(manifest)
}
