//! [`Writeback`]: keep a bulk copy's dirty pages few, so that it streams to
//! the disk as it goes instead of in one burst at its final fsync.
//!
//! Without it, a gigabyte copy stays in the page cache until the file's
//! fsync, which then fills the device queue for seconds; every commit's
//! fsync waits behind it. With it, each piece written is handed to the disk
//! at once (`sync_file_range(WRITE)`), and the copy waits for the oldest
//! piece once more than [`IN_FLIGHT`] bytes are in flight, so at most that
//! much backup data ever stands between a commit and the disk. The bound is
//! a trade: a deep queue is what makes a bulk copy as fast as `cp` + `sync`
//! on virtual disks, a shallow one what keeps commit fsyncs short; the rate
//! limit (`--backup-rate`) is the operator's knob beyond it. It only
//! schedules writes; durability still comes from the fsync at the end of
//! each file. Elsewhere than Linux it does nothing.

use std::collections::VecDeque;
use std::fs::File;

/// Bytes of a copy that may be on their way to the disk at once.
pub(crate) const IN_FLIGHT: u64 = 64 * 1024 * 1024;

/// The ranges of one file handed to the disk and not yet waited for.
#[derive(Default)]
pub(crate) struct Writeback {
    pending: VecDeque<(u64, u64)>,
    bytes: u64,
}

impl Writeback {
    /// `len` bytes at `offset` of `file` were just written.
    pub(crate) fn written(&mut self, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        start(file, offset, len)?;
        self.pending.push_back((offset, len));
        self.bytes += len;
        while self.bytes > IN_FLIGHT {
            let (o, l) = self.pending.pop_front().expect("bytes > 0");
            wait(file, o, l)?;
            self.bytes -= l;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn range_op(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid, owned descriptor and plain integers; no memory is
    // shared with the kernel.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn start(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    range_op(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

#[cfg(target_os = "linux")]
fn wait(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    range_op(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

#[cfg(not(target_os = "linux"))]
fn start(_: &File, _: u64, _: u64) -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn wait(_: &File, _: u64, _: u64) -> std::io::Result<()> {
    Ok(())
}
