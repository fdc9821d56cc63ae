//! Where a backup may go, and the scratch area for snapshots.
//!
//! [`prepare_target`] refuses a target that is relative, exists, is the
//! live repository directory or lies inside it, or cannot be created; it
//! creates the directory and marks it incomplete at once, so from its first
//! byte the target cannot be mistaken for a backup. It must never touch a
//! path that already exists.
//!
//! Snapshots of a live repository put their index copy in
//! `DIR/backup-tmp/<name>/`; [`clear_scratch`] removes what a previous
//! process left there.

use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::storage::backup::copy::incomplete_text;
use crate::storage::backup::manifest::write_marker;

/// Scratch area inside a live repository directory.
pub const SCRATCH_DIR: &str = "backup-tmp";

/// Why a backup target is refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetRefusal {
    #[error("target {0} must be an absolute path (it names a directory on the server's machine)")]
    NotAbsolute(PathBuf),
    #[error("target {0} must not contain `..`")]
    ParentComponent(PathBuf),
    #[error("target {target} is the live repository directory {live} or inside it")]
    LiveRepository { target: PathBuf, live: PathBuf },
    #[error("target {0} already exists (a backup goes into a new directory)")]
    Exists(PathBuf),
    #[error("cannot create the target {target}: {source}")]
    NotCreatable {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `path` with its longest existing prefix resolved (symlinks, `.`), the
/// rest appended as written.
fn resolve(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        if let Ok(real) = at.canonicalize() {
            let mut out = real;
            for part in missing.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                at = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Check `target` against the live repository `live` and create it,
/// holding only an incomplete marker. Parents are created as needed.
pub fn prepare_target(live: &Path, target: &Path) -> Result<(), TargetRefusal> {
    if !target.is_absolute() {
        return Err(TargetRefusal::NotAbsolute(target.to_path_buf()));
    }
    if target.components().any(|c| c == Component::ParentDir) {
        return Err(TargetRefusal::ParentComponent(target.to_path_buf()));
    }
    let live_real = live.canonicalize().unwrap_or_else(|_| live.to_path_buf());
    if resolve(target).starts_with(&live_real) {
        return Err(TargetRefusal::LiveRepository {
            target: target.to_path_buf(),
            live: live_real,
        });
    }
    if target.symlink_metadata().is_ok() {
        return Err(TargetRefusal::Exists(target.to_path_buf()));
    }
    let not_creatable = |source| TargetRefusal::NotCreatable {
        target: target.to_path_buf(),
        source,
    };
    if let Some(blocker) = target
        .ancestors()
        .skip(1)
        .find(|a| a.metadata().is_ok())
        .filter(|a| !a.is_dir())
    {
        return Err(not_creatable(std::io::Error::other(format!(
            "{} is not a directory",
            blocker.display()
        ))));
    }
    // The directories made here, deepest first: each one's name is made
    // durable in its parent, or a power loss could take a completed backup
    // away whole.
    let existing = target.ancestors().skip(1).find(|a| a.exists());
    let made: Vec<&Path> = target
        .ancestors()
        .take_while(|a| Some(*a) != existing)
        .collect();
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(not_creatable)?;
    }
    match fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(TargetRefusal::Exists(target.to_path_buf()))
        }
        Err(e) => return Err(not_creatable(e)),
    }
    for dir in made {
        if let Some(parent) = dir.parent() {
            let synced = fs::File::open(parent).and_then(|d| d.sync_all());
            if let Err(e) = synced {
                let _ = fs::remove_dir_all(target);
                return Err(not_creatable(e));
            }
        }
    }
    let text = incomplete_text(
        "in progress",
        "the copy has not finished; if this file remains, it was interrupted",
        None,
    );
    if let Err(e) = write_marker(target, &text) {
        let _ = fs::remove_dir_all(target);
        let source = match e {
            crate::storage::StorageError::BackupIo { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        };
        return Err(not_creatable(source));
    }
    Ok(())
}

/// Remove a job's scratch directory. The (empty) scratch area itself
/// stays: removing it could race with the next job creating its own.
pub fn remove_scratch(scratch: &Path) {
    if let Err(e) = fs::remove_dir_all(scratch) {
        if e.kind() != ErrorKind::NotFound {
            log::warn!("cannot remove snapshot scratch {}: {e}", scratch.display());
        }
    }
}

/// Remove every scratch directory under `live/backup-tmp` except those
/// whose name starts with `keep_prefix` (this process's own).
pub fn clear_scratch(live: &Path, keep_prefix: &str) {
    let root = live.join(SCRATCH_DIR);
    let Ok(entries) = fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(keep_prefix) {
            continue;
        }
        if let Err(e) = fs::remove_dir_all(entry.path()) {
            log::warn!(
                "cannot remove stale snapshot scratch {}: {e}",
                entry.path().display()
            );
        }
    }
}
