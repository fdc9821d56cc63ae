//! The commit log: segment files of checksummed commit records.

use std::fs::File;
use std::sync::Arc;

use crate::types::CommitNumber;

/// A handle that makes every record written so far to one segment durable.
/// It is the only piece of the storage engine that leaves the storage
/// thread: the flushing thread calls [`LogSync::sync`] so that readers never
/// wait behind an fsync. The file is shared read-only (fdatasync needs no
/// exclusive access); earlier segments are synced before a new one starts.
#[derive(Clone, Debug)]
pub struct LogSync {
    file: Arc<File>,
    upto: CommitNumber,
}

impl LogSync {
    pub(crate) fn new(file: Arc<File>, upto: CommitNumber) -> Self {
        LogSync { file, upto }
    }

    /// The last commit this handle covers.
    pub fn upto(&self) -> CommitNumber {
        self.upto
    }

    /// fdatasync the segment: on success every record up to `upto` is durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
