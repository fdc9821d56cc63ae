//! Making several files durable at once, for checkpoints.
//!
//! A checkpoint must fsync the commit log, `objects.dat` and every large
//! collection's `.idx` and `.dat` written since the last one before the
//! index and header may describe them — twenty-odd files under a workload
//! of eight collections. One after another that took 10–13 ms on the
//! development machine's virtual disk, all of it on the storage thread,
//! so commits and reads stalled that long every checkpoint. Issued
//! together the filesystem folds them into a few journal commits.
//!
//! This module owns only the fan-out: it never decides what to sync nor in
//! which order relative to other writes (the caller syncs data before it
//! writes the index and header), and it returns only once every file is
//! synced or one failed.

use std::fs::File;
use std::path::PathBuf;

use crate::storage::error::{Result, StorageError};

/// Most fsyncs in flight at once.
const MAX_PARALLEL: usize = 16;

/// One file to make durable; `path` names it in errors.
pub struct SyncTarget {
    pub file: File,
    pub path: PathBuf,
}

impl SyncTarget {
    /// A second descriptor of `file` (an fsync through it syncs the file).
    pub fn of(file: &File, path: PathBuf) -> Result<SyncTarget> {
        let file = file
            .try_clone()
            .map_err(|e| StorageError::io(format!("duplicating {}", path.display()), e))?;
        Ok(SyncTarget { file, path })
    }
}

/// fdatasync every target, up to [`MAX_PARALLEL`] at a time; the first
/// failure (in target order) is the error.
pub fn sync_all(targets: &[SyncTarget]) -> Result<()> {
    if targets.len() <= 1 {
        return targets.iter().try_for_each(sync_one);
    }
    for group in targets.chunks(MAX_PARALLEL) {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = group.iter().map(|t| s.spawn(move || sync_one(t))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StorageError::Corrupted("a sync thread panicked".into()))
                    })
                })
                .collect()
        });
        results.into_iter().collect::<Result<()>>()?;
    }
    Ok(())
}

fn sync_one(t: &SyncTarget) -> Result<()> {
    t.file
        .sync_data()
        .map_err(|e| StorageError::io(format!("syncing {}", t.path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn syncs_every_target_and_names_a_failing_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut targets = Vec::new();
        for i in 0..20 {
            let path = dir.path().join(format!("f{i}"));
            let mut f = File::create(&path).unwrap();
            f.write_all(b"data").unwrap();
            targets.push(SyncTarget::of(&f, path).unwrap());
        }
        sync_all(&targets).unwrap();
        sync_all(&targets[..1]).unwrap();
        sync_all(&[]).unwrap();
        // A descriptor that cannot be synced: a read-only pipe end.
        let (rd, _wr) = std::os::unix::net::UnixStream::pair().unwrap();
        let bad = SyncTarget {
            file: File::from(std::os::fd::OwnedFd::from(rd)),
            path: PathBuf::from("/the/bad/one"),
        };
        targets.insert(3, bad);
        let err = sync_all(&targets).unwrap_err().to_string();
        assert!(err.contains("/the/bad/one"), "{err}");
    }
}
