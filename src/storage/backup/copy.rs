//! [`SnapshotCopy`]: a snapshot copied into a target directory a bounded
//! piece at a time, each file's BLAKE3 computed over what the copy holds
//! as it is written (`transfer.rs`).
//!
//! The caller decides when each [`SnapshotCopy::step`] runs (the
//! `BackupActor` runs one per chunk on a blocking thread, so pause, abort
//! and rate limits act between chunks). Each step copies at most its budget
//! from one file; a file is fsynced when its last byte is written; the step
//! after the last file seals the backup (header, manifest). This type never
//! reads past a file's snapshot length: the live repository may be appending
//! to the same file meanwhile. Writes stream to the disk as they go
//! (`writeback.rs`), so a copy never piles up gigabytes for its final fsync.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::storage::backup::manifest::{seal, write_marker, Manifest, ManifestFile};
use crate::storage::backup::transfer::Transfer;
use crate::storage::backup::writeback::Writeback;
use crate::storage::backup::IO_PIECE;
use crate::storage::error::{Result, StorageError};
use crate::storage::repository::Snapshot;
use crate::types::hex;

/// One file being copied.
struct OpenFile {
    src: File,
    dst: File,
    to: PathBuf,
    hasher: blake3::Hasher,
    writeback: Writeback,
    copied: u64,
    len: u64,
    path: String,
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Data bytes copied by this step.
    pub bytes: u64,
    /// Files complete so far (cumulative).
    pub files_done: u64,
    /// The backup is sealed: manifest written.
    pub complete: bool,
}

/// A snapshot being copied into a prepared target (see
/// `prepare_target`); see the module doc.
pub struct SnapshotCopy {
    snapshot: Snapshot,
    target: PathBuf,
    source: String,
    next: usize,
    open: Option<OpenFile>,
    done: Vec<ManifestFile>,
    manifest: Option<Manifest>,
    transfer: Transfer,
}

/// `coll/12.idx` whatever the platform's separator.
fn display_path(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

impl SnapshotCopy {
    /// Copy `snapshot` into `target`, which exists and is empty but for the
    /// incomplete marker. `source` names the origin in the manifest.
    pub fn new(snapshot: Snapshot, target: &Path, source: &str) -> SnapshotCopy {
        SnapshotCopy {
            snapshot,
            target: target.to_path_buf(),
            source: source.to_string(),
            next: 0,
            open: None,
            done: Vec::new(),
            manifest: None,
            transfer: Transfer::default(),
        }
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Data bytes to copy in all (the header and manifest not counted).
    pub fn bytes_total(&self) -> u64 {
        self.snapshot.files.iter().map(|f| f.len).sum()
    }

    pub fn files_total(&self) -> u64 {
        self.snapshot.files.len() as u64
    }

    /// The file the next step works on (`MANIFEST` while sealing, `None`
    /// once sealed).
    pub fn current_file(&self) -> Option<String> {
        if self.manifest.is_some() {
            return None;
        }
        match self.snapshot.files.get(self.next) {
            Some(f) => Some(display_path(&f.relative)),
            None => Some(super::MANIFEST_FILE.to_string()),
        }
    }

    /// The manifest, once sealed.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// Copy at most `budget` bytes of the current file (at least one byte
    /// if any is left), or seal the backup once every file is copied.
    pub fn step(&mut self, budget: u64) -> Result<Step> {
        if self.manifest.is_some() {
            return Ok(self.progress(0));
        }
        if self.next == self.snapshot.files.len() {
            let s = &self.snapshot;
            let manifest = seal(
                &self.target,
                &s.header,
                std::mem::take(&mut self.done),
                s.repository_id,
                s.commit,
                &self.source,
            )?;
            self.done = manifest.files.clone();
            self.manifest = Some(manifest);
            return Ok(self.progress(0));
        }
        if self.open.is_none() {
            self.open = Some(self.open_next()?);
        }
        let f = self.open.as_mut().expect("just opened");
        let want = budget.max(1).min(f.len - f.copied);
        self.transfer
            .copy(
                &f.src,
                &f.dst,
                f.copied,
                want,
                &mut f.hasher,
                &mut f.writeback,
            )
            .map_err(|e| {
                if e.kind() == ErrorKind::UnexpectedEof {
                    StorageError::Corrupted(format!(
                        "{} is shorter than its snapshot length {}",
                        f.path, f.len
                    ))
                } else {
                    StorageError::backup_io(format!("copying {} to {}", f.path, f.to.display()), e)
                }
            })?;
        let copied = want;
        f.copied += copied;
        if f.copied == f.len {
            self.close_current()?;
        }
        Ok(self.progress(copied))
    }

    /// Run every remaining step (for tools and tests; the server steps).
    pub fn run_to_end(&mut self) -> Result<Manifest> {
        while !self.step(8 * IO_PIECE as u64)?.complete {}
        Ok(self.manifest.clone().expect("sealed"))
    }

    /// Record in the target why this copy stopped (abort, failure): the
    /// marker explains, and no manifest will ever be written.
    pub fn mark_incomplete(&mut self, state: &str, reason: &str) -> Result<()> {
        self.open = None;
        write_marker(
            &self.target,
            &incomplete_text(state, reason, Some(self.snapshot.commit)),
        )
    }

    fn progress(&self, bytes: u64) -> Step {
        Step {
            bytes,
            files_done: self.next as u64,
            complete: self.manifest.is_some(),
        }
    }

    fn open_next(&mut self) -> Result<OpenFile> {
        let f = &self.snapshot.files[self.next];
        let to = self.target.join(&f.relative);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| {
                StorageError::backup_io(format!("creating {}", parent.display()), e)
            })?;
        }
        let src = File::open(&f.source)
            .map_err(|e| StorageError::backup_io(format!("opening {}", f.source.display()), e))?;
        // Read as well as written: the copy is hashed from what it holds.
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&to)
            .map_err(|e| StorageError::backup_io(format!("creating {}", to.display()), e))?;
        Ok(OpenFile {
            src,
            dst,
            to,
            hasher: blake3::Hasher::new(),
            writeback: Writeback::default(),
            copied: 0,
            len: f.len,
            path: display_path(&f.relative),
        })
    }

    fn close_current(&mut self) -> Result<()> {
        let f = self.open.take().expect("a file is open");
        f.dst
            .sync_all()
            .map_err(|e| StorageError::backup_io(format!("syncing {}", f.to.display()), e))?;
        self.done.push(ManifestFile {
            path: f.path,
            size: f.len,
            blake3: hex(f.hasher.finalize().as_bytes()),
        });
        self.next += 1;
        Ok(())
    }
}

/// The text of an incomplete marker: a sentence for people, then
/// `key: value` lines.
pub(crate) fn incomplete_text(state: &str, reason: &str, commit: Option<u64>) -> String {
    let mut s = format!(
        "This directory is an INCOMPLETE Magma backup: do not start a server on it.\n\
         state: {state}\nreason: {reason}\n"
    );
    if let Some(c) = commit {
        s.push_str(&format!("snapshot commit: {c}\n"));
    }
    s.push_str(&format!("written at unix ms: {}\n", super::unix_ms_now()));
    s
}
