//! [`Receiver`]: one backup file arriving over the network, possibly across
//! several connections or runs of `magma backup --pull`.
//!
//! Bytes are appended in order and hashed as they are written. Reopening a
//! partly received file hashes the prefix already on disk first, so a
//! resumed transfer ends with the checksum of the whole file, computed here
//! over the bytes actually stored. A receiver never writes outside the file
//! it was opened on and never beyond the size the server announced.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use crate::storage::backup::manifest::ManifestFile;
use crate::storage::backup::IO_PIECE;
use crate::types::hex;

/// `relative` as a path inside a backup directory, or `None` if it could
/// escape it (absolute, `..`, empty). Paths come from the server.
pub fn safe_relative_path(relative: &str) -> Option<PathBuf> {
    let p = Path::new(relative);
    if relative.is_empty() || p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            _ => return None,
        }
    }
    Some(out)
}

/// One file being received; see the module doc.
pub struct Receiver {
    path: String,
    file_path: PathBuf,
    file: File,
    hasher: blake3::Hasher,
    received: u64,
    size: u64,
}

impl Receiver {
    /// Open `dir/relative` to receive `size` bytes, keeping (and hashing)
    /// whatever prefix of it is already there.
    pub fn open(dir: &Path, relative: &str, size: u64) -> std::io::Result<Receiver> {
        let rel = safe_relative_path(relative).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the server named an unsafe file path {relative:?}"),
            )
        })?;
        let file_path = dir.join(rel);
        if let Some(parent) = file_path.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&file_path)?;
        let on_disk = file.metadata()?.len();
        let keep = on_disk.min(size);
        if on_disk > keep {
            file.set_len(keep)?;
        }
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; IO_PIECE.min(keep as usize).max(1)];
        let mut left = keep;
        file.seek(SeekFrom::Start(0))?;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            file.read_exact(&mut buf[..n])?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(SeekFrom::Start(keep))?;
        Ok(Receiver {
            path: relative.to_string(),
            file_path,
            file,
            hasher,
            received: keep,
            size,
        })
    }

    /// Bytes held so far (the offset to ask for next).
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_complete(&self) -> bool {
        self.received == self.size
    }

    /// Append the bytes that start at `received()`.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.received + data.len() as u64 > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: {} more bytes would pass the announced size {}",
                    self.path,
                    data.len(),
                    self.size
                ),
            ));
        }
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.received += data.len() as u64;
        Ok(())
    }

    /// fsync the complete file and describe it for the manifest.
    pub fn finish(self) -> std::io::Result<ManifestFile> {
        if !self.is_complete() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ({}) holds {} of {} bytes",
                    self.path,
                    self.file_path.display(),
                    self.received,
                    self.size
                ),
            ));
        }
        self.file.sync_all()?;
        Ok(ManifestFile {
            path: self.path,
            size: self.size,
            blake3: hex(self.hasher.finalize().as_bytes()),
        })
    }
}
