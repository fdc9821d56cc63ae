//! [`Transfer`]: move one range of a file into the same range of a copy as
//! cheaply as the platform allows, and hash what the copy then holds.
//!
//! The bytes move in the kernel (`copy_file_range`, what `cp` uses), one
//! piece at a time; a second thread reads each finished piece back from the
//! copy (from the page cache) and hashes it, overlapping the next piece's
//! copy. So the checksum is over the bytes the copy really holds, and
//! hashing costs little extra time. Where the kernel cannot copy between the
//! two files (another filesystem on an old kernel, not Linux), pieces go
//! through a buffer instead, hashed the same way. Every piece is handed to
//! the disk at once ([`Writeback`]). Both threads are the copy's own and run
//! at a lower CPU priority than the threads serving requests.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use crate::storage::backup::writeback::Writeback;
use crate::storage::backup::IO_PIECE;

/// Per-copy state: whether the kernel copies for us, and the buffers.
pub(crate) struct Transfer {
    kernel: bool,
    hash_buf: Vec<u8>,
    copy_buf: Vec<u8>,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            kernel: true,
            hash_buf: Vec::new(),
            copy_buf: Vec::new(),
        }
    }
}

impl Transfer {
    /// Copy `[at, at + len)` of `src` to the same offsets of `dst`, feeding
    /// the copied bytes (read back from `dst`) to `hasher`. A source shorter
    /// than `at + len` is an `UnexpectedEof` error.
    pub(crate) fn copy(
        &mut self,
        src: &File,
        dst: &File,
        at: u64,
        len: u64,
        hasher: &mut blake3::Hasher,
        writeback: &mut Writeback,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.hash_buf.len() < IO_PIECE {
            self.hash_buf.resize(IO_PIECE, 0);
        }
        let hash_buf = &mut self.hash_buf;
        let copy_buf = &mut self.copy_buf;
        let kernel = &mut self.kernel;
        let (tx, rx) = mpsc::sync_channel::<(u64, usize)>(16);
        std::thread::scope(|s| {
            let hashing = s.spawn(move || -> io::Result<()> {
                yield_cpu();
                for (off, n) in rx {
                    let buf = &mut hash_buf[..n];
                    dst.read_exact_at(buf, off)?;
                    hasher.update(buf);
                }
                Ok(())
            });
            let copying = s.spawn(move || -> io::Result<()> {
                yield_cpu();
                let mut off = at;
                while off < at + len {
                    let n = ((at + len - off) as usize).min(IO_PIECE);
                    move_piece(src, dst, off, n, kernel, copy_buf)?;
                    writeback.written(dst, off, n as u64)?;
                    if tx.send((off, n)).is_err() {
                        // The hasher stopped on an error; it reports it.
                        break;
                    }
                    off += n as u64;
                }
                Ok(())
            });
            let panicked = || Err(io::Error::other("a backup copy thread panicked"));
            let copied = copying.join().unwrap_or_else(|_| panicked());
            let hashed = hashing.join().unwrap_or_else(|_| panicked());
            copied.and(hashed)
        })
    }
}

/// Give the calling thread (one of a copy's own, short-lived threads) a
/// lower CPU priority, so that serving requests wins the CPU from a backup.
fn yield_cpu() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain integers; on Linux a nice value belongs to one thread,
    // and this thread ends with the copy step.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKUP_NICE);
    }
}

/// The nice value of a copy's threads.
const BACKUP_NICE: libc::c_int = 10;

/// Move `n` bytes at `off`: in the kernel while it can, else through `buf`.
fn move_piece(
    src: &File,
    dst: &File,
    off: u64,
    n: usize,
    kernel: &mut bool,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    if *kernel {
        match kernel_copy(src, dst, off, n) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {
                log::info!("copy_file_range unavailable ({e}); copying through a buffer");
                *kernel = false;
            }
            Err(e) => return Err(e),
        }
    }
    if buf.len() < n {
        buf.resize(n, 0);
    }
    src.read_exact_at(&mut buf[..n], off)?;
    dst.write_all_at(&buf[..n], off)
}

#[cfg(target_os = "linux")]
fn kernel_copy(src: &File, dst: &File, off: u64, n: usize) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut done = 0usize;
    while done < n {
        let mut off_in = (off + done as u64) as libc::loff_t;
        let mut off_out = off_in;
        // SAFETY: valid, owned descriptors; the offsets are locals the
        // kernel updates; no user memory is transferred.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                n - done,
                0,
            )
        };
        match r {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the source ended before the snapshot length",
                ))
            }
            r => done += r as usize,
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn kernel_copy(_: &File, _: &File, _: u64, _: usize) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The kernel cannot copy between these two files (but a buffer can).
fn unsupported(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::Unsupported {
        return true;
    }
    #[cfg(target_os = "linux")]
    if let Some(code) = e.raw_os_error() {
        return matches!(
            code,
            libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::EBADF
        );
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn copies_a_range_and_hashes_what_the_copy_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 253) as u8).collect();
        File::create(tmp.path().join("src"))
            .unwrap()
            .write_all(&data)
            .unwrap();
        let src = File::open(tmp.path().join("src")).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("dst"))
            .unwrap();
        for kernel in [true, false] {
            let mut t = Transfer {
                kernel,
                ..Transfer::default()
            };
            let mut h = blake3::Hasher::new();
            let mut wb = Writeback::default();
            t.copy(&src, &dst, 0, 1_000_000, &mut h, &mut wb).unwrap();
            t.copy(&src, &dst, 1_000_000, 2_000_000, &mut h, &mut wb)
                .unwrap();
            assert_eq!(h.finalize(), blake3::hash(&data[..3_000_000]));
            let mut back = vec![0u8; 3_000_000];
            dst.read_exact_at(&mut back, 0).unwrap();
            assert_eq!(back, data[..3_000_000]);
            let e = t
                .copy(&src, &dst, 3_000_000, 600_000, &mut h, &mut wb)
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        }
    }
}
