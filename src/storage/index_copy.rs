//! Copies of `index.map` made off the storage thread.
//!
//! A backup's snapshot and a digest each need `index.map` as of one
//! checkpoint. Copied on the storage thread, that held up every commit and
//! read for as long as the copy took: 20–30 ms per million objects on the
//! development machine, 80–130 ms at four million. Instead the storage
//! thread only *pins* the index: it hands out an [`IndexCopy`] (a handle of
//! the file and its length as of the checkpoint) and the copy is made on
//! the consumer's thread. Checkpoints are the only writers of `index.map`
//! (entries newer than the last checkpoint live in memory), so while a pin
//! is held the repository puts its next checkpoint off, or waits for the
//! copy when one is required.
//!
//! This module owns the pin's protocol, nothing else. It must never let a
//! copy that a checkpoint may have written under be used: a checkpoint that
//! waited [`PIN_PATIENCE`] in vain breaks the pin, and a copy finished
//! after that is refused rather than handed out.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::storage::error::{Result, StorageError};

/// How long a required checkpoint waits for a copy under way before it
/// goes ahead and the copy is refused. Copies run at disk or page-cache
/// speed, with no rate limit: a gigabyte of index (some 30 million
/// objects) takes a few seconds even from a cold disk.
pub const PIN_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Copying,
    Released,
    /// A checkpoint stopped waiting: what the copy read may be mixed.
    Broken,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The repository's side of one pin (see the module doc).
#[derive(Clone, Debug)]
pub struct Pin(Arc<Shared>);

impl Pin {
    /// Whether its copy is still being made.
    pub fn holds(&self) -> bool {
        *self.0.state.lock().expect("pin lock") == State::Copying
    }

    /// Wait until the copy is made, at most `patience`; then break the pin
    /// if it still holds. `true` if the copy finished in time.
    pub fn wait_or_break(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut state = self.0.state.lock().expect("pin lock");
        while *state == State::Copying {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *state = State::Broken;
                return false;
            }
            state = self
                .0
                .changed
                .wait_timeout(state, left)
                .expect("pin lock")
                .0;
        }
        true
    }
}

/// `index.map` as of a checkpoint, to be copied on any thread; see the
/// module doc. Dropping it uncopied releases the pin.
#[derive(Debug)]
pub struct IndexCopy {
    source: File,
    len: u64,
    path: PathBuf,
    pin: Pin,
}

impl IndexCopy {
    /// Pin `path` (the live `index.map`, `len` bytes long): the caller
    /// keeps the [`Pin`] and writes nothing to the file while it holds.
    pub fn pin(path: &Path, len: u64) -> Result<(IndexCopy, Pin)> {
        // Its own open file description: reading it moves no offset that
        // the repository's handle uses.
        let source = File::open(path)
            .map_err(|e| StorageError::backup_io(format!("opening {}", path.display()), e))?;
        let pin = Pin(Arc::new(Shared {
            state: Mutex::new(State::Copying),
            changed: Condvar::new(),
        }));
        let copy = IndexCopy {
            source,
            len,
            path: path.to_path_buf(),
            pin: pin.clone(),
        };
        Ok((copy, pin))
    }

    /// Write the copy into `out` from its start (in-kernel where the file
    /// systems allow), then release the pin. Refused if a checkpoint broke
    /// the pin meanwhile.
    pub fn write_into(self, out: &mut File) -> Result<()> {
        let copied = std::io::copy(&mut (&self.source).take(self.len), out)
            .and_then(|n| {
                out.flush()?;
                Ok(n)
            })
            .map_err(|e| StorageError::backup_io(format!("copying {}", self.path.display()), e))?;
        if copied != self.len {
            return Err(StorageError::backup_io(
                format!("copying {}", self.path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{copied} bytes read of {}", self.len),
                ),
            ));
        }
        let mut state = self.pin.0.state.lock().expect("pin lock");
        if *state == State::Broken {
            return Err(StorageError::backup_io(
                format!("copying {}", self.path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the copy took longer than {} s and a checkpoint went ahead \
                         meanwhile, so it may be inconsistent; try again",
                        PIN_PATIENCE.as_secs()
                    ),
                ),
            ));
        }
        *state = State::Released;
        self.pin.0.changed.notify_all();
        Ok(())
    }

    /// [`IndexCopy::write_into`] a new file at `dest`; its length.
    pub fn write_to(self, dest: &Path) -> Result<u64> {
        let len = self.len;
        let mut out = File::create(dest)
            .map_err(|e| StorageError::backup_io(format!("creating {}", dest.display()), e))?;
        self.write_into(&mut out)?;
        Ok(len)
    }
}

impl Drop for IndexCopy {
    fn drop(&mut self) {
        let mut state = self.pin.0.state.lock().expect("pin lock");
        if *state == State::Copying {
            *state = State::Released;
            self.pin.0.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path) -> PathBuf {
        let path = dir.join("index.map");
        std::fs::write(&path, (0..=255u8).cycle().take(10_000).collect::<Vec<_>>()).unwrap();
        path
    }

    #[test]
    fn a_copy_holds_the_pinned_bytes_and_releases_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = source(dir.path());
        let (copy, pin) = IndexCopy::pin(&path, 4_000).unwrap();
        assert!(pin.holds());
        let dest = dir.path().join("copy");
        assert_eq!(copy.write_to(&dest).unwrap(), 4_000);
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(&path).unwrap()[..4_000]
        );
        assert!(!pin.holds());
        assert!(pin.wait_or_break(Duration::ZERO));
    }

    #[test]
    fn a_waiting_checkpoint_goes_on_once_the_copy_is_made_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = source(dir.path());
        let (copy, pin) = IndexCopy::pin(&path, 100).unwrap();
        let dest = dir.path().join("copy");
        let to = dest.clone();
        let copier = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            copy.write_to(&to)
        });
        assert!(pin.wait_or_break(Duration::from_secs(30)));
        // The copy was whole before the wait ended.
        assert_eq!(std::fs::read(&dest).unwrap().len(), 100);
        copier.join().unwrap().unwrap();
        // A copy given up (its job failed) releases the pin too.
        let (copy, pin) = IndexCopy::pin(&path, 100).unwrap();
        drop(copy);
        assert!(!pin.holds());
    }

    #[test]
    fn a_copy_finished_after_the_pin_was_broken_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = source(dir.path());
        let (copy, pin) = IndexCopy::pin(&path, 100).unwrap();
        assert!(!pin.wait_or_break(Duration::from_millis(10)));
        assert!(!pin.holds());
        let err = copy.write_to(&dir.path().join("copy")).unwrap_err();
        assert!(!err.is_fatal(), "only the backup or digest fails: {err}");
        let err = err.to_string();
        assert!(err.contains("a checkpoint went ahead"), "{err}");
    }
}
