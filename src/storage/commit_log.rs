//! The commit log: segment files of checksummed commit records.
//!
//! Owns `DIR/log/`. Each segment is named by the number of its first record
//! (`00000000000000000001.log`), starts with a 16-byte head (magic +
//! first number) and holds records `u32 len | u32 crc32(body) | body`.
//! Appends go to the last segment only; earlier segments are immutable,
//! marked finished in their head and synced once the next one exists, so
//! a finished segment that is last at open means newer ones were lost. On open, a torn tail of the last segment
//! is cut; any other bad record is an error naming the file and offset.
//! This module never interprets payloads: it checks numbers and the hash
//! chain only.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::storage::error::{Result, StorageError};
use crate::storage::record::{record_hash, RecordHead};
use crate::storage::sync::SyncTarget;
use crate::types::{CommitNumber, Hash};

pub const LOG_DIR: &str = "log";
const SEGMENT_MAGIC: &[u8; 8] = b"MAGLOG01";
/// The head magic of a finished segment: the log moved on to the next one
/// (whose file existed, durably, before this was written).
const FINISHED_MAGIC: &[u8; 8] = b"MAGLOGF1";
const SEGMENT_HEAD_LEN: u64 = 16;
const RECORD_PREFIX: u64 = 8;
/// A record larger than this is not a record but garbage (a torn length);
/// commits that would make a larger record are refused before they are
/// logged.
pub const MAX_RECORD: u64 = 1 << 30;
/// Read back, a record length beyond [`MAX_RECORD`] is taken for a torn
/// tail and cut: never log what start-up would throw away.
fn check_record_len(len: usize) -> Result<()> {
    if len == 0 || len as u64 > MAX_RECORD {
        return Err(StorageError::Invalid(format!(
            "a commit record of {len} bytes is over the {MAX_RECORD}-byte limit"
        )));
    }
    Ok(())
}

/// The current segment is kept zero-filled this far ahead of its records:
/// overwriting allocated zeros lets fdatasync skip the file-size update,
/// about a third faster per commit on the development machine. The fill
/// runs on the storage thread, between two commit batches, so it is kept
/// short: 4 MiB steps held every commit for 1.3–5 ms there (measured
/// while the allocator still used huge pages; new memory in a VM is
/// slow). With 1 MiB steps and no huge pages, 5 s of 8 committing
/// clients saw no more than one batch over 2 ms.
const PREALLOC_CHUNK: u64 = 1024 * 1024;
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
/// Default size at which a new segment is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// A handle that makes every record written so far to one segment durable.
/// It is the only piece of the storage engine that leaves the storage
/// thread: the flushing thread calls [`LogSync::sync`] so that readers never
/// wait behind an fsync. The file is shared read-only (fdatasync needs no
/// exclusive access); earlier segments are synced before a new one starts.
#[derive(Clone, Debug)]
pub struct LogSync {
    file: Arc<File>,
    upto: CommitNumber,
    /// The last record written to this segment so far (shared with the
    /// log, which raises it after each write): a sync covers at least that.
    written: Arc<AtomicU64>,
}

impl LogSync {
    /// A handle on `file` covering up to `upto` (tests' stand-in logs).
    #[cfg(test)]
    pub(crate) fn new(file: Arc<File>, upto: CommitNumber) -> Self {
        LogSync::covering(file, upto, Arc::new(AtomicU64::new(upto)))
    }

    fn covering(file: Arc<File>, upto: CommitNumber, written: Arc<AtomicU64>) -> Self {
        LogSync {
            file,
            upto,
            written,
        }
    }

    /// The last commit this handle covers.
    pub fn upto(&self) -> CommitNumber {
        self.upto
    }

    /// fdatasync the segment: on success every record up to `upto` is durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// True when both handles sync the same segment file.
    pub fn same_segment(&self, other: &LogSync) -> bool {
        Arc::ptr_eq(&self.file, &other.file)
    }

    /// [`LogSync::sync`], returning the last commit now durable: every
    /// record written to the segment before the call, at least `upto`
    /// (group commit: one sync covers the records written meanwhile).
    pub fn sync_written(&self) -> std::io::Result<CommitNumber> {
        let upto = self.written.load(Ordering::Acquire).max(self.upto);
        self.file.sync_data()?;
        Ok(upto)
    }
}

struct Segment {
    first: CommitNumber,
    path: PathBuf,
    /// Byte offset of each record, indexed by `number - first`; built
    /// lazily for old segments (catch-up reads), eagerly for the tail.
    offsets: Option<Vec<u64>>,
    /// End of the records (what is logically in the segment).
    len: u64,
    /// File size: records plus preallocated zeros (current segment only).
    allocated: u64,
}

pub struct CommitLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Records appended but not yet written to the current segment; they
    /// end at `segments.last().len`. Written before any sync, read or roll.
    pending: Vec<u8>,
    current: Option<Arc<File>>,
    /// fsyncs by [`CommitLog::sync`], for tests.
    #[cfg(test)]
    pub(crate) syncs: u64,
    /// Last record written to `current` (shared with its `LogSync`s).
    written: Arc<AtomicU64>,
    readers: HashMap<CommitNumber, File>,
    last: CommitNumber,
    last_hash: Hash,
    segment_bytes: u64,
}

pub(crate) fn segment_name(first: CommitNumber) -> String {
    format!("{first:020}.log")
}

fn io_at(path: &Path, what: &str, e: std::io::Error) -> StorageError {
    StorageError::io(format!("{what} {}", path.display()), e)
}

/// Outcome of reading one record at an offset.
enum Read {
    Record(Vec<u8>),
    /// Nothing more (clean end of file).
    End,
    /// Not a valid record: `reason`.
    Bad(String),
}

fn read_record_at(file: &File, offset: u64, file_len: u64) -> std::io::Result<Read> {
    if offset == file_len {
        return Ok(Read::End);
    }
    if file_len - offset < RECORD_PREFIX {
        return Ok(Read::Bad("record prefix cut short".into()));
    }
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, offset)?;
    if prefix == [0u8; 8] && rest_is_zero(file, offset, file_len)? {
        // Preallocated space after the last record.
        return Ok(Read::End);
    }
    let len = u32::from_le_bytes(prefix[0..4].try_into().unwrap()) as u64;
    let crc = u32::from_le_bytes(prefix[4..8].try_into().unwrap());
    if len == 0 || len > MAX_RECORD {
        return Ok(Read::Bad(format!("impossible record length {len}")));
    }
    if file_len - offset - RECORD_PREFIX < len {
        return Ok(Read::Bad(format!("record of {len} bytes cut short")));
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, offset + RECORD_PREFIX)?;
    if crc32fast::hash(&body) != crc {
        return Ok(Read::Bad("checksum mismatch".into()));
    }
    Ok(Read::Record(body))
}

fn rest_is_zero(file: &File, offset: u64, file_len: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < file_len {
        let n = ((file_len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Where [`CommitLog::open_with_history`] starts: the checkpoint the
/// repository's files describe, and the first record to hand to `history`.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    pub checkpoint: CommitNumber,
    pub checkpoint_hash: Hash,
    pub history_from: CommitNumber,
    /// The segment the header names as current at the checkpoint
    /// (`Header::log_segment`; 0: none named). Its file must exist...
    pub segment: CommitNumber,
    /// ... unless the operator accepted its loss (`--accept-missing-log`).
    pub accept_missing: bool,
}

impl CommitLog {
    /// Open (creating `log/` if needed) and scan from `checkpoint`: every
    /// record after it is checked against the chain and handed to `replay`.
    /// A torn tail of the last segment is cut and synced. (Tests; the
    /// repository opens with its history.)
    #[cfg(test)]
    pub fn open(
        repo_dir: &Path,
        checkpoint: CommitNumber,
        checkpoint_hash: Hash,
        segment_bytes: u64,
        replay: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<CommitLog> {
        let start = Start {
            checkpoint,
            checkpoint_hash,
            history_from: checkpoint + 1,
            segment: 0,
            accept_missing: false,
        };
        CommitLog::open_with_history(repo_dir, start, segment_bytes, |_| Ok(()), replay)
    }

    /// [`CommitLog::open`], and before the replay, every record still kept
    /// from `start.history_from` up to the checkpoint is handed to
    /// `history` (already applied; read for what the repository remembers
    /// beyond the checkpoint, such as idempotency tokens).
    pub fn open_with_history(
        repo_dir: &Path,
        start: Start,
        segment_bytes: u64,
        mut history: impl FnMut(&[u8]) -> Result<()>,
        mut replay: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<CommitLog> {
        let Start {
            checkpoint,
            checkpoint_hash,
            history_from,
            segment,
            accept_missing,
        } = start;
        let dir = repo_dir.join(LOG_DIR);
        let mut segments = Vec::new();
        // Listed before it is created: a refused open (below) must not
        // leave an empty `log/` where the operator is to put the old one.
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => Some(listing),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at(&dir, "listing", e)),
        };
        for entry in listing.into_iter().flatten() {
            let entry = entry.map_err(|e| io_at(&dir, "listing", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".log") else {
                continue;
            };
            let Ok(first) = stem.parse::<u64>() else {
                continue;
            };
            // Its file's length until it is scanned (`ensure_offsets` sets
            // the records' end): what it takes on disk counts toward
            // `--max-log-bytes` from the start.
            let len = entry
                .metadata()
                .map_err(|e| io_at(&entry.path(), "inspecting", e))?
                .len();
            segments.push(Segment {
                first,
                path: entry.path(),
                offsets: None,
                len,
                allocated: 0,
            });
        }
        segments.sort_by_key(|s| s.first);
        if segment != 0 && !segments.iter().any(|s| s.first == segment) {
            // The log never deletes its current segment, and the header
            // names the one that was current at the checkpoint: its file
            // was deleted, moved or lost. Going on would silently drop
            // every commit it held after the checkpoint.
            let missing = dir.join(segment_name(segment));
            if !accept_missing {
                return Err(StorageError::Corrupted(format!(
                    "commit-log segment {} is missing (deleted, moved or lost): the \
                     header written at checkpoint {checkpoint} names it as the log's \
                     current segment, which the log never deletes. It may have held \
                     commits after {checkpoint} (none if the server was stopped cleanly) \
                     and holds the idempotency history of recent commits. Put it back; \
                     otherwise move this directory aside and start this server from a \
                     new backup of the node (magma-server --dir NEW --join PRIMARY), or \
                     accept the loss and start once with --accept-missing-log",
                    missing.display()
                )));
            }
            log::warn!(
                "--accept-missing-log: commit-log segment {} is missing; starting from \
                 checkpoint {checkpoint}. Any commits after it are lost, and a client \
                 resending a commit from before the loss may have it applied again",
                missing.display()
            );
        }
        fs::create_dir_all(&dir).map_err(|e| io_at(&dir, "creating", e))?;
        let mut log = CommitLog {
            dir,
            segments,
            pending: Vec::new(),
            current: None,
            #[cfg(test)]
            syncs: 0,
            written: Arc::new(AtomicU64::new(0)),
            readers: HashMap::new(),
            last: checkpoint,
            last_hash: checkpoint_hash,
            segment_bytes,
        };
        let lost_tail = log.scan_from_checkpoint(
            checkpoint,
            history_from,
            accept_missing,
            &mut history,
            &mut replay,
        )?;
        if lost_tail {
            // The last segment left is finished: appends go to a new one,
            // which also keeps the loss from being asked about again.
            log.start_segment(log.last + 1)?;
        }
        // After a kill -9 the tail may still be only in the page cache, yet
        // from now on it counts as durable (a resent token is answered as
        // `Duplicate` without waiting for an fsync, `durable` starts at the
        // last record): make it so. Earlier segments were synced when the
        // next one was started.
        log.sync()?;
        Ok(log)
    }

    /// Returns whether the last segment is a finished one whose successor
    /// is gone and the operator accepted the loss (`accept_missing`).
    fn scan_from_checkpoint(
        &mut self,
        checkpoint: CommitNumber,
        history_from: CommitNumber,
        accept_missing: bool,
        history: &mut impl FnMut(&[u8]) -> Result<()>,
        replay: &mut impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        let mut lost_tail = false;
        // Segments wholly before the checkpoint (and before the history
        // asked for) are not read at open.
        let holds_next = self
            .segments
            .iter()
            .rposition(|s| s.first <= checkpoint + 1)
            .unwrap_or(0);
        if let Some(first_seg) = self.segments.get(holds_next) {
            if first_seg.first > checkpoint + 1 {
                return Err(StorageError::Corrupted(format!(
                    "commit log starts at {} but the checkpoint is {checkpoint}: records {}..{} are missing",
                    first_seg.first,
                    checkpoint + 1,
                    first_seg.first - 1
                )));
            }
        }
        // The segment holding `history_from`, or the earliest kept one if
        // the history starts before every segment.
        let start = match self.segments.get(..=holds_next) {
            Some(upto) => upto
                .iter()
                .rposition(|s| s.first <= history_from)
                .unwrap_or(0),
            None => 0,
        };
        let count = self.segments.len();
        for i in start..count {
            let is_last = i + 1 == count;
            let path = self.segments[i].path.clone();
            let first = self.segments[i].first;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_at(&path, "opening", e))?;
            let file_len = file
                .metadata()
                .map_err(|e| io_at(&path, "inspecting", e))?
                .len();
            let finished = self.check_segment_head(&file, &path, first, file_len, is_last)?;
            let mut offsets = Vec::new();
            let mut offset = SEGMENT_HEAD_LEN.min(file_len);
            if file_len < SEGMENT_HEAD_LEN {
                // A segment whose head was torn: it held no complete record.
                log::warn!(
                    "{}: {file_len} bytes, a segment head cut short by a crash; \
                     rewriting the head (it held no record)",
                    path.display()
                );
                file.set_len(0).map_err(|e| io_at(&path, "cutting", e))?;
                self.write_segment_head(&file, &path, first)?;
                offset = SEGMENT_HEAD_LEN;
            }
            let mut number = first;
            loop {
                match read_record_at(&file, offset, file_len.max(offset))
                    .map_err(|e| io_at(&path, "reading", e))?
                {
                    Read::End => break,
                    Read::Record(body) => {
                        let head = RecordHead::parse(&body)?;
                        if head.number != number {
                            return Err(StorageError::CorruptRecord {
                                file: path.clone(),
                                offset,
                                reason: format!(
                                    "holds record {} where {number} belongs",
                                    head.number
                                ),
                            });
                        }
                        if number > checkpoint {
                            if number != self.last + 1 || head.prev_hash != self.last_hash {
                                return Err(StorageError::CorruptRecord {
                                    file: path.clone(),
                                    offset,
                                    reason: format!(
                                        "record {number} does not continue the hash chain"
                                    ),
                                });
                            }
                            replay(&body)?;
                            self.last = number;
                            self.last_hash = record_hash(&body);
                        } else {
                            if number == checkpoint && record_hash(&body) != self.last_hash {
                                return Err(StorageError::CorruptRecord {
                                    file: path.clone(),
                                    offset,
                                    reason: format!(
                                        "record {number} does not match the checkpoint's hash"
                                    ),
                                });
                            }
                            if number >= history_from {
                                history(&body)?;
                            }
                        }
                        offsets.push(offset);
                        offset += RECORD_PREFIX + body.len() as u64;
                        number += 1;
                    }
                    Read::Bad(reason) => {
                        // A checkpointed record was complete once: damage
                        // to it is never a torn tail.
                        // Nor is damage to a finished segment: it was
                        // synced whole before it was marked.
                        let torn = is_last
                            && !finished
                            && number > checkpoint
                            && !valid_record_after(&file, offset, file_len, number)
                                .map_err(|e| io_at(&path, "reading", e))?;
                        if !torn {
                            return Err(StorageError::CorruptRecord {
                                file: path.clone(),
                                offset,
                                reason,
                            });
                        }
                        log::warn!(
                            "cutting torn tail of {} at offset {offset} ({} bytes): {reason}",
                            path.display(),
                            file_len - offset
                        );
                        file.set_len(offset)
                            .and_then(|_| file.sync_all())
                            .map_err(|e| io_at(&path, "cutting torn tail of", e))?;
                        break;
                    }
                }
            }
            let next = self.segments.get(i + 1).map(|s| s.first);
            check_segment_end(&path, offset, first, number, next)?;
            if is_last && first <= checkpoint && number <= checkpoint {
                // This server logged every record up to its checkpoint
                // before taking it (a backup's log starts after it). Also
                // with --accept-missing-log: a new segment after this one
                // would leave a gap below the checkpoint.
                return Err(StorageError::CorruptRecord {
                    file: path,
                    offset,
                    reason: format!(
                        "the log ends at record {}, before the checkpoint {checkpoint}",
                        number - 1
                    ),
                });
            }
            if is_last && finished {
                // The log wrote the next segment's file before marking
                // this one finished: it was deleted, moved or lost, with
                // every record it and any later segment held.
                let missing = self.dir.join(segment_name(number));
                if !accept_missing {
                    return Err(StorageError::Corrupted(format!(
                        "commit-log segment {} is missing (deleted, moved or lost): {} is \
                         marked finished, so the log went on in that file from record \
                         {number}. It held any commits after {} (acknowledged ones \
                         included) and the idempotency history of recent commits. Put it \
                         back, with any later segments; otherwise move this directory aside \
                         and start this server from a new backup of the node (magma-server \
                         --dir NEW --join PRIMARY), or accept the loss and start once with \
                         --accept-missing-log",
                        missing.display(),
                        path.display(),
                        number - 1
                    )));
                }
                log::warn!(
                    "--accept-missing-log: commit-log segment {} is missing; the log ends \
                     at record {}. Any commits after it are lost, and a client resending a \
                     commit from before the loss may have it applied again",
                    missing.display(),
                    number - 1
                );
                lost_tail = true;
            }
            let allocated = file
                .metadata()
                .map_err(|e| io_at(&path, "inspecting", e))?
                .len();
            let seg = &mut self.segments[i];
            seg.len = offset;
            seg.allocated = allocated.max(offset);
            seg.offsets = Some(offsets);
            if is_last {
                self.current = Some(Arc::new(file));
            }
        }
        Ok(lost_tail)
    }

    /// Checks the head of the segment of records from `first`; returns
    /// whether it is marked finished.
    fn check_segment_head(
        &self,
        file: &File,
        path: &Path,
        first: CommitNumber,
        file_len: u64,
        is_last: bool,
    ) -> Result<bool> {
        if file_len < SEGMENT_HEAD_LEN {
            if is_last {
                return Ok(false);
            }
            return Err(StorageError::CorruptRecord {
                file: path.to_path_buf(),
                offset: 0,
                reason: "segment head cut short".into(),
            });
        }
        let mut head = [0u8; 16];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| io_at(path, "reading", e))?;
        let stored_first = u64::from_le_bytes(head[8..16].try_into().unwrap());
        let finished = &head[0..8] == FINISHED_MAGIC;
        if (!finished && &head[0..8] != SEGMENT_MAGIC) || stored_first != first {
            return Err(StorageError::CorruptRecord {
                file: path.to_path_buf(),
                offset: 0,
                reason: "bad segment head".into(),
            });
        }
        Ok(finished)
    }

    fn write_segment_head(&self, file: &File, path: &Path, first: CommitNumber) -> Result<()> {
        let mut head = [0u8; 16];
        head[0..8].copy_from_slice(SEGMENT_MAGIC);
        head[8..16].copy_from_slice(&first.to_le_bytes());
        file.write_all_at(&head, 0)
            .map_err(|e| io_at(path, "writing head of", e))
    }

    pub fn last(&self) -> CommitNumber {
        self.last
    }

    pub fn last_hash(&self) -> Hash {
        self.last_hash
    }

    /// Oldest record number still in the log (`last + 1` when empty).
    pub fn first_retained(&self) -> CommitNumber {
        self.segments
            .first()
            .map(|s| s.first)
            .unwrap_or(self.last + 1)
    }

    /// Append one record body (already checked by the caller to be
    /// `last + 1` on the chain) and write it; not synced.
    #[cfg(test)]
    pub fn append(&mut self, number: CommitNumber, body: &[u8]) -> Result<LogSync> {
        self.append_buffered(number, body)?;
        self.write_pending()?;
        Ok(self.sync_handle_written())
    }

    /// Append without writing yet (batches of replicated records): the
    /// bytes reach the file at the next `write_pending`, sync, read or roll.
    pub fn append_buffered(&mut self, number: CommitNumber, body: &[u8]) -> Result<()> {
        debug_assert_eq!(number, self.last + 1);
        check_record_len(body.len())?;
        let need_new = match self.segments.last() {
            None => true,
            Some(s) => {
                let has_records = s.offsets.as_ref().is_some_and(|o| !o.is_empty());
                has_records && s.len + RECORD_PREFIX + body.len() as u64 > self.segment_bytes
            }
        };
        if need_new {
            self.start_segment(number)?;
        }
        let seg = self.segments.last_mut().expect("a segment exists");
        self.pending
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.pending
            .extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        self.pending.extend_from_slice(body);
        seg.offsets.get_or_insert_with(Vec::new).push(seg.len);
        seg.len += RECORD_PREFIX + body.len() as u64;
        self.last = number;
        self.last_hash = record_hash(body);
        if self.pending.len() >= 1 << 20 {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Write buffered records to the current segment.
    pub fn write_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let seg = self
            .segments
            .last_mut()
            .expect("pending records have a segment");
        let file = self.current.as_ref().expect("current segment is open");
        if seg.len > seg.allocated {
            // Zero-fill ahead; the first sync after this pays for the size
            // change once, later ones overwrite allocated blocks only.
            let target = seg.len + PREALLOC_CHUNK;
            let mut at = seg.allocated;
            while at < target {
                let n = ((target - at) as usize).min(ZEROS.len());
                file.write_all_at(&ZEROS[..n], at)
                    .map_err(|e| io_at(&seg.path, "preallocating", e))?;
                at += n as u64;
            }
            seg.allocated = target;
        }
        let at = seg.len - self.pending.len() as u64;
        file.write_all_at(&self.pending, at)
            .map_err(|e| io_at(&seg.path, "appending to", e))?;
        self.pending.clear();
        self.written.store(self.last, Ordering::Release);
        Ok(())
    }

    fn sync_handle_written(&self) -> LogSync {
        let file = self.current.as_ref().expect("current segment is open");
        LogSync::covering(file.clone(), self.last, self.written.clone())
    }

    fn start_segment(&mut self, first: CommitNumber) -> Result<()> {
        self.write_pending()?;
        // 1. The finished segment ends at its last record, all durable: a
        //    crash later in the roll can leave no torn tail in it, which
        //    (no longer last) could not be cut.
        if let (Some(cur), Some(seg)) = (&self.current, self.segments.last_mut()) {
            cur.set_len(seg.len)
                .and_then(|_| cur.sync_all())
                .map_err(|e| io_at(&seg.path, "finishing segment", e))?;
            seg.allocated = seg.len;
        }
        // 2. The next segment, its head and its directory entry durable.
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_at(&path, "creating", e))?;
        self.write_segment_head(&file, &path, first)?;
        file.sync_all()
            .map_err(|e| io_at(&path, "syncing the head of", e))?;
        crate::storage::header::sync_dir(&self.dir)?;
        // 3. Only now is the previous one marked finished: a finished
        //    segment that is last at open always means a lost one, never
        //    a crash in between.
        if let (Some(cur), Some(seg)) = (&self.current, self.segments.last()) {
            cur.write_all_at(FINISHED_MAGIC, 0)
                .and_then(|_| cur.sync_data())
                .map_err(|e| io_at(&seg.path, "marking finished", e))?;
        }
        self.segments.push(Segment {
            first,
            path,
            offsets: Some(Vec::new()),
            len: SEGMENT_HEAD_LEN,
            allocated: SEGMENT_HEAD_LEN,
        });
        self.current = Some(Arc::new(file));
        self.written = Arc::new(AtomicU64::new(0));
        Ok(())
    }

    /// fsync the current segment (the storage thread's own flush).
    pub fn sync(&mut self) -> Result<()> {
        self.write_pending()?;
        if let (Some(f), Some(s)) = (&self.current, self.segments.last()) {
            f.sync_data().map_err(|e| io_at(&s.path, "syncing", e))?;
            #[cfg(test)]
            {
                self.syncs += 1;
            }
        }
        Ok(())
    }

    /// Write what is buffered and hand out the current segment for a
    /// parallel sync (earlier segments were synced when they ended).
    pub fn sync_target(&mut self) -> Result<Option<SyncTarget>> {
        self.write_pending()?;
        match (&self.current, self.segments.last()) {
            (Some(f), Some(s)) => Ok(Some(SyncTarget::of(f, s.path.clone())?)),
            _ => Ok(None),
        }
    }

    /// A handle covering everything appended so far.
    pub fn sync_handle(&mut self) -> Result<Option<LogSync>> {
        self.write_pending()?;
        Ok(self.current.as_ref().map(|_| self.sync_handle_written()))
    }

    /// Record bodies from `from` on: at most `max_count`, and stopping once
    /// `max_bytes` is reached (at least one record if any exists).
    pub fn read_from(
        &mut self,
        from: CommitNumber,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>> {
        self.write_pending()?;
        if from > self.last {
            if from == self.last + 1 {
                return Ok(Vec::new());
            }
            return Err(StorageError::BeyondEnd {
                requested: from,
                last: self.last,
            });
        }
        let oldest = self.first_retained();
        if from < oldest {
            return Err(StorageError::LogTruncated {
                requested: from,
                oldest,
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut number = from;
        while number <= self.last && out.len() < max_count.max(1) && bytes < max_bytes.max(1) {
            let i = self
                .segments
                .iter()
                .rposition(|s| s.first <= number)
                .expect("from >= first_retained");
            self.ensure_offsets(i)?;
            let (first, path) = (self.segments[i].first, self.segments[i].path.clone());
            self.open_reader(first, &path)?;
            let seg = &self.segments[i];
            let offsets = seg.offsets.as_ref().expect("offsets built");
            let len = seg.len;
            let file = &self.readers[&first];
            let mut k = (number - first) as usize;
            if k >= offsets.len() {
                // ensure_offsets and open check that segments join up:
                // only a file changed under a running server gets here.
                return Err(StorageError::CorruptRecord {
                    file: path,
                    offset: len,
                    reason: format!("record {number} is missing"),
                });
            }
            while k < offsets.len() && out.len() < max_count.max(1) && bytes < max_bytes.max(1) {
                match read_record_at(file, offsets[k], len)
                    .map_err(|e| io_at(&path, "reading", e))?
                {
                    Read::Record(body) => {
                        bytes += body.len();
                        out.push(body);
                    }
                    Read::End | Read::Bad(_) => {
                        return Err(StorageError::CorruptRecord {
                            file: path,
                            offset: offsets[k],
                            reason: format!("record {} unreadable", first + k as u64),
                        })
                    }
                }
                k += 1;
                number += 1;
            }
        }
        Ok(out)
    }

    fn open_reader(&mut self, first: CommitNumber, path: &Path) -> Result<()> {
        if !self.readers.contains_key(&first) {
            if self.readers.len() > 8 {
                self.readers.clear();
            }
            let f = File::open(path).map_err(|e| io_at(path, "opening", e))?;
            self.readers.insert(first, f);
        }
        Ok(())
    }

    /// Build the offset table of an old segment by scanning it once.
    fn ensure_offsets(&mut self, i: usize) -> Result<()> {
        if self.segments[i].offsets.is_some() {
            return Ok(());
        }
        let path = self.segments[i].path.clone();
        let file = File::open(&path).map_err(|e| io_at(&path, "opening", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| io_at(&path, "inspecting", e))?
            .len();
        let mut offsets = Vec::new();
        let mut offset = SEGMENT_HEAD_LEN;
        loop {
            match read_record_at(&file, offset, file_len).map_err(|e| io_at(&path, "reading", e))? {
                Read::End => break,
                Read::Record(body) => {
                    offsets.push(offset);
                    offset += RECORD_PREFIX + body.len() as u64;
                }
                Read::Bad(reason) => {
                    return Err(StorageError::CorruptRecord {
                        file: path,
                        offset,
                        reason,
                    })
                }
            }
        }
        let first = self.segments[i].first;
        let next = self.segments.get(i + 1).map(|s| s.first);
        check_segment_end(&path, offset, first, first + offsets.len() as u64, next)?;
        let seg = &mut self.segments[i];
        seg.len = offset;
        seg.offsets = Some(offsets);
        Ok(())
    }

    /// Delete segments all of whose records are below `keep_from`. The
    /// current segment is never deleted.
    pub fn remove_before(&mut self, keep_from: CommitNumber) -> Result<usize> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first <= keep_from {
            let seg = self.segments.remove(0);
            self.readers.remove(&seg.first);
            fs::remove_file(&seg.path).map_err(|e| io_at(&seg.path, "removing", e))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Whether a segment starting at record `first` is in the log.
    pub fn has_segment(&self, first: CommitNumber) -> bool {
        self.segments.iter().any(|s| s.first == first)
    }

    /// First record number of the current (newest) segment, if any: the
    /// one segment the log never deletes.
    pub fn current_segment(&self) -> Option<CommitNumber> {
        self.segments.last().map(|s| s.first)
    }

    /// First number of the second-oldest segment: removing the oldest
    /// segment keeps every record from there on.
    pub fn second_segment_first(&self) -> Option<CommitNumber> {
        self.segments.get(1).map(|s| s.first)
    }

    /// Byte offset where the current segment's records end.
    #[cfg(test)]
    pub fn end_offset(&self) -> u64 {
        self.segments.last().map(|s| s.len).unwrap_or(0)
    }

    /// Bytes of log currently on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

impl Drop for CommitLog {
    fn drop(&mut self) {
        if let Err(e) = self.write_pending() {
            log::error!("commit log: writing buffered records at close failed: {e}");
        }
    }
}

/// After a bad record `bad` at `offset`, is there a complete valid record
/// anywhere further on? If so the damage is in the middle of the log, not a
/// torn tail, and must not be cut silently.
///
/// Only a candidate numbered as a later record could be one (at least
/// `bad`, at most one per smallest record in the bytes left): the check
/// that filters out nearly every position of a torn record's bytes before
/// its checksum is computed, which would otherwise be about N^2 bytes of
/// checksum for a torn record of N bytes, and which keeps the image of a
/// record held inside a value from passing for one.
fn valid_record_after(
    file: &File,
    offset: u64,
    file_len: u64,
    bad: CommitNumber,
) -> std::io::Result<bool> {
    let mut rest = vec![0u8; (file_len - offset) as usize];
    file.read_exact_at(&mut rest, offset)?;
    let min = crate::storage::record::RECORD_HEAD_LEN;
    let most = bad.saturating_add((rest.len() / (RECORD_PREFIX as usize + min)) as u64);
    for pos in 1..rest.len().saturating_sub(RECORD_PREFIX as usize) {
        let len = u32::from_le_bytes(rest[pos..pos + 4].try_into().unwrap()) as usize;
        let body_at = pos + RECORD_PREFIX as usize;
        if len < min || len > rest.len() - body_at {
            continue;
        }
        let number = u64::from_le_bytes(rest[body_at..body_at + 8].try_into().unwrap());
        if number < bad || number > most {
            continue;
        }
        let crc = u32::from_le_bytes(rest[pos + 4..pos + 8].try_into().unwrap());
        if crc32fast::hash(&rest[body_at..body_at + len]) == crc {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A segment other than the last must end where the next one starts: one
/// cut short at a record boundary, or a missing segment between them, would
/// otherwise go unseen until a read of the records in the gap.
fn check_segment_end(
    path: &Path,
    end: u64,
    first: CommitNumber,
    after_last: CommitNumber,
    next_first: Option<CommitNumber>,
) -> Result<()> {
    match next_first {
        Some(next) if next != after_last => Err(StorageError::CorruptRecord {
            file: path.to_path_buf(),
            offset: end,
            reason: format!(
                "the segment of records from {first} ends at {}, the next one starts at {next}",
                after_last - 1
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::{CommitRecord, Payload, GENESIS_HASH};
    use crate::types::Epoch;

    fn body(number: u64, prev: Hash) -> Vec<u8> {
        CommitRecord {
            number,
            epoch: Epoch::initial(1),
            prev_hash: prev,
            payload: Payload {
                token: None,
                ops: vec![],
            },
        }
        .encode()
    }

    #[test]
    fn what_start_up_reads_back_is_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log =
                CommitLog::open(dir.path(), 0, GENESIS_HASH, 1 << 20, |_| Ok(())).unwrap();
            log.append_buffered(1, &body(1, GENESIS_HASH)).unwrap();
            // Written, never synced: a kill -9 leaves it in the page cache.
            log.write_pending().unwrap();
            assert_eq!(log.syncs, 0);
        }
        let log = CommitLog::open(dir.path(), 0, GENESIS_HASH, 1 << 20, |_| Ok(())).unwrap();
        assert_eq!(log.last(), 1);
        assert_eq!(log.syncs, 1, "the tail read back was synced at open");
    }

    #[test]
    fn only_records_start_up_would_read_back_are_logged() {
        // Start-up cuts a length beyond MAX_RECORD as a torn tail: such a
        // record, once acknowledged, would be lost silently.
        let e = check_record_len(MAX_RECORD as usize + 1).unwrap_err();
        assert!(e.to_string().contains("over the"), "{e}");
        assert!(!e.is_fatal(), "refused like any bad request");
        check_record_len(MAX_RECORD as usize).unwrap();
        check_record_len(0).unwrap_err();
    }

    /// Write records 1..=n; returns their bodies and where the last
    /// segment's records end (the file is longer: preallocated zeros).
    fn write_n(dir: &Path, n: u64, segment_bytes: u64) -> (Vec<Vec<u8>>, u64) {
        let mut log = CommitLog::open(dir, 0, GENESIS_HASH, segment_bytes, |_| Ok(())).unwrap();
        let mut bodies = Vec::new();
        for i in 1..=n {
            let b = body(i, log.last_hash());
            log.append(i, &b).unwrap();
            bodies.push(b);
        }
        log.sync().unwrap();
        (bodies, log.end_offset())
    }

    #[test]
    fn a_sync_covers_what_its_segment_holds_when_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CommitLog::open(dir.path(), 0, GENESIS_HASH, 1000, |_| Ok(())).unwrap();
        let mut handles = Vec::new();
        for i in 1..=3 {
            let b = body(i, log.last_hash());
            handles.push(log.append(i, &b).unwrap());
        }
        // Records 2 and 3 were written before the first handle syncs.
        assert_eq!(handles[0].upto(), 1);
        assert_eq!(handles[0].sync_written().unwrap(), 3);
        // Buffered records count only once written.
        let b = body(4, log.last_hash());
        log.append_buffered(4, &b).unwrap();
        assert_eq!(handles[1].sync_written().unwrap(), 3);
        log.write_pending().unwrap();
        assert_eq!(handles[1].sync_written().unwrap(), 4);
        // Records of a later segment are not in this segment's sync.
        let first = log.segments.len();
        let mut n = 4;
        while log.segments.len() == first {
            n += 1;
            let b = body(n, log.last_hash());
            log.append(n, &b).unwrap();
        }
        let old = handles[2].sync_written().unwrap();
        assert!(old < n, "{old} covers record {n} of the next segment");
        assert_eq!(old, log.segments[first].first - 1);
        let current = log.sync_handle().unwrap().unwrap();
        assert_eq!(current.sync_written().unwrap(), n);
        assert!(current.same_segment(&log.sync_handle().unwrap().unwrap()));
        assert!(!current.same_segment(&handles[2]));
        // A handle made by hand covers what it names.
        let file = Arc::new(tempfile::tempfile().unwrap());
        assert_eq!(LogSync::new(file, 7).sync_written().unwrap(), 7);
    }

    #[test]
    fn appends_roll_segments_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (bodies, _) = write_n(dir.path(), 50, 400);
        let segs = fs::read_dir(dir.path().join(LOG_DIR)).unwrap().count();
        assert!(segs > 3, "expected several segments, got {segs}");
        let mut seen = Vec::new();
        let mut log = CommitLog::open(dir.path(), 0, GENESIS_HASH, 400, |b| {
            seen.push(b.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, bodies);
        assert_eq!(log.last(), 50);
        let got = log.read_from(20, 5, usize::MAX).unwrap();
        assert_eq!(got, bodies[19..24].to_vec());
        let got = log.read_from(1, 1000, 1).unwrap();
        assert_eq!(got.len(), 1, "a byte limit still returns one record");
        assert!(log.read_from(51, 10, 100).unwrap().is_empty());
        assert!(matches!(
            log.read_from(60, 10, 100),
            Err(StorageError::BeyondEnd { .. })
        ));
    }

    #[test]
    fn torn_tail_is_cut_and_middle_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, end) = write_n(dir.path(), 10, DEFAULT_SEGMENT_BYTES);
        let seg = dir.path().join(LOG_DIR).join(segment_name(1));
        let full = fs::read(&seg).unwrap();
        assert!(full.len() as u64 > end, "the segment is preallocated");
        // Torn: the last record's final bytes never reached the disk.
        let mut torn = full.clone();
        for b in &mut torn[end as usize - 5..end as usize] {
            *b = 0;
        }
        fs::write(&seg, &torn).unwrap();
        let log = CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| {
            Ok(())
        })
        .unwrap();
        assert_eq!(log.last(), 9);
        let end9 = log.end_offset();
        drop(log);
        // Middle: flip a byte inside record 3's body.
        let mut bytes = fs::read(&seg).unwrap();
        let rec_len = (end9 - SEGMENT_HEAD_LEN) / 9;
        let pos = (SEGMENT_HEAD_LEN + 2 * rec_len + 20) as usize;
        bytes[pos] ^= 0x55;
        fs::write(&seg, &bytes).unwrap();
        let err = CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| {
            Ok(())
        })
        .err()
        .expect("middle corruption must fail");
        match err {
            StorageError::CorruptRecord { file, offset, .. } => {
                assert_eq!(file, seg);
                assert_eq!(offset, SEGMENT_HEAD_LEN + 2 * rec_len);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_zeroed_record_prefix_before_valid_records_is_corruption_not_a_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (_, end) = write_n(dir.path(), 10, DEFAULT_SEGMENT_BYTES);
        let seg = dir.path().join(LOG_DIR).join(segment_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        let rec_len = (end - SEGMENT_HEAD_LEN) / 10;
        let at = (SEGMENT_HEAD_LEN + 4 * rec_len) as usize;
        for b in &mut bytes[at..at + 8] {
            *b = 0;
        }
        fs::write(&seg, &bytes).unwrap();
        assert!(matches!(
            CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| Ok(
                ()
            )),
            Err(StorageError::CorruptRecord { .. })
        ));
    }

    #[test]
    fn a_torn_record_holding_the_image_of_an_older_record_is_still_torn() {
        // A value may hold any bytes, a logged record's image among them
        // (an application storing a copy of a log file). Cut short by a
        // kill -9, the record holding it must still be a torn tail.
        let dir = tempfile::tempdir().unwrap();
        let (bodies, end) = write_n(dir.path(), 10, DEFAULT_SEGMENT_BYTES);
        let seg = dir.path().join(LOG_DIR).join(segment_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        let image = &bodies[2];
        let mut torn = Vec::new();
        torn.extend_from_slice(&(4096u32).to_le_bytes());
        torn.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
        torn.extend_from_slice(&[7u8; 100]);
        torn.extend_from_slice(&(image.len() as u32).to_le_bytes());
        torn.extend_from_slice(&crc32fast::hash(image).to_le_bytes());
        torn.extend_from_slice(image);
        let at = end as usize;
        bytes[at..at + torn.len()].copy_from_slice(&torn);
        fs::write(&seg, &bytes).unwrap();
        let log = CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| {
            Ok(())
        })
        .expect("a torn tail, cut");
        assert_eq!(log.last(), 10);
    }

    #[test]
    fn reopening_continues_in_the_preallocated_space() {
        let dir = tempfile::tempdir().unwrap();
        let (_, end) = write_n(dir.path(), 5, DEFAULT_SEGMENT_BYTES);
        let mut log = CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| {
            Ok(())
        })
        .unwrap();
        assert_eq!((log.last(), log.end_offset()), (5, end));
        let b = body(6, log.last_hash());
        log.append(6, &b).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| {
            Ok(())
        })
        .unwrap();
        assert_eq!(log.last(), 6);
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let _ = write_n(dir.path(), 3, DEFAULT_SEGMENT_BYTES);
        let seg = dir.path().join(LOG_DIR).join(segment_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        bytes.extend_from_slice(&[0u8; 100]);
        fs::write(&seg, &bytes).unwrap();
        let log = CommitLog::open(dir.path(), 0, GENESIS_HASH, DEFAULT_SEGMENT_BYTES, |_| {
            Ok(())
        })
        .unwrap();
        assert_eq!(log.last(), 3);
    }

    /// The error `open` gives, as text, with `checkpoint` (its record's
    /// hash from `bodies`).
    fn open_error(dir: &Path, checkpoint: u64, bodies: &[Vec<u8>], seg_bytes: u64) -> String {
        let hash = record_hash(&bodies[checkpoint as usize - 1]);
        match CommitLog::open(dir, checkpoint, hash, seg_bytes, |_| Ok(())) {
            Ok(log) => panic!("opened, last {}", log.last()),
            Err(e @ StorageError::CorruptRecord { .. }) => e.to_string(),
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn damage_to_the_checkpointed_last_record_is_corruption_not_a_torn_tail() {
        // After a clean stop the checkpoint is the last record. Cutting it
        // as a torn tail would file the next commit under its number.
        for damage in ["flip", "zero", "truncate"] {
            let dir = tempfile::tempdir().unwrap();
            let (bodies, end) = write_n(dir.path(), 10, DEFAULT_SEGMENT_BYTES);
            let seg = dir.path().join(LOG_DIR).join(segment_name(1));
            let mut bytes = fs::read(&seg).unwrap();
            let last_start = end as usize - (RECORD_PREFIX as usize + bodies[9].len());
            match damage {
                "flip" => bytes[end as usize - 3] ^= 0x55,
                "zero" => bytes[last_start..end as usize].fill(0),
                _ => bytes.truncate(end as usize - 3),
            }
            fs::write(&seg, &bytes).unwrap();
            let e = open_error(dir.path(), 10, &bodies, DEFAULT_SEGMENT_BYTES);
            assert!(e.contains(&seg.display().to_string()), "{damage}: {e}");
            // Above the checkpoint the same damage is a torn tail.
            let log = CommitLog::open(
                dir.path(),
                9,
                record_hash(&bodies[8]),
                DEFAULT_SEGMENT_BYTES,
                |_| Ok(()),
            )
            .unwrap_or_else(|e| panic!("{damage} above the checkpoint: {e}"));
            assert_eq!(log.last(), 9, "{damage}");
        }
    }

    /// The first record number a segment file is named by.
    fn first_of(path: &Path) -> u64 {
        path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
    }

    /// The segment files of `dir`'s log, oldest first.
    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut segs: Vec<_> = fs::read_dir(dir.join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        segs
    }

    #[test]
    fn a_lost_newest_segment_is_refused_unless_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (bodies, _) = write_n(dir.path(), 50, 400);
        let segs = segment_files(dir.path());
        assert!(segs.len() > 3, "{segs:?}");
        let newest = segs.last().unwrap().clone();
        let newest_first = first_of(&newest);
        assert!(newest_first > 11, "{segs:?}");
        let open = |accept_missing| {
            let start = Start {
                checkpoint: 10,
                checkpoint_hash: record_hash(&bodies[9]),
                history_from: 11,
                segment: 0,
                accept_missing,
            };
            CommitLog::open_with_history(dir.path(), start, 400, |_| Ok(()), |_| Ok(()))
        };
        // Every segment but the newest is marked finished.
        for seg in &segs {
            let head = fs::read(seg).unwrap();
            let magic = if *seg == newest {
                SEGMENT_MAGIC
            } else {
                FINISHED_MAGIC
            };
            assert_eq!(&head[..8], magic, "{}", seg.display());
        }
        let saved = fs::read(&newest).unwrap();
        fs::remove_file(&newest).unwrap();
        match open(false) {
            Err(StorageError::Corrupted(m)) => assert!(
                m.contains(&newest.display().to_string()) && m.contains("is missing"),
                "{m}"
            ),
            other => panic!(
                "expected a missing segment, got {:?}",
                other.map(|l| l.last())
            ),
        }
        fs::write(&newest, &saved).unwrap();
        assert_eq!(open(false).unwrap().last(), 50, "put back, nothing lost");
        // Segments an older build wrote carry no mark: nothing is refused.
        for seg in &segs {
            let mut head = fs::read(seg).unwrap();
            head[..8].copy_from_slice(SEGMENT_MAGIC);
            fs::write(seg, &head).unwrap();
        }
        assert_eq!(open(false).unwrap().last(), 50);
        // A roll marks the segment it finishes. The newest lost again,
        // and accepted: the log ends before it, goes on in a new segment,
        // and asks nothing again.
        let mut log = open(false).unwrap();
        for i in 51..=60 {
            let b = body(i, log.last_hash());
            log.append(i, &b).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let segs = segment_files(dir.path());
        let newest = segs.last().unwrap().clone();
        let newest_first = first_of(&newest);
        assert!(newest_first > 50, "rolled since: {segs:?}");
        fs::remove_file(&newest).unwrap();
        assert!(open(false).is_err());
        // A finished segment was synced whole: damage at its end is not a
        // torn tail to cut, even when the loss after it is accepted.
        let last_left = segment_files(dir.path()).pop().unwrap();
        let good = fs::read(&last_left).unwrap();
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 0xff;
        fs::write(&last_left, &bad).unwrap();
        match open(true) {
            Err(StorageError::CorruptRecord { file, .. }) => assert_eq!(file, last_left),
            other => panic!("expected corruption, got {:?}", other.map(|l| l.last())),
        }
        fs::write(&last_left, &good).unwrap();
        let mut log = open(true).unwrap();
        assert_eq!(log.last(), newest_first - 1);
        let b = body(newest_first, log.last_hash());
        log.append(newest_first, &b).unwrap();
        log.sync().unwrap();
        drop(log);
        assert_eq!(open(false).unwrap().last(), newest_first);
    }

    /// The segment the header names lost with every later one: what is
    /// left ends before the checkpoint, and a new segment after it would
    /// leave a gap below the checkpoint, refused at every later start.
    #[test]
    fn an_accepted_loss_that_leaves_the_log_short_of_the_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (bodies, _) = write_n(dir.path(), 60, 400);
        let segs = segment_files(dir.path());
        let named = first_of(&segs[segs.len() - 3]);
        let checkpoint = named + 1;
        assert!(first_of(&segs[segs.len() - 2]) > checkpoint, "{segs:?}");
        for seg in &segs[segs.len() - 3..] {
            fs::remove_file(seg).unwrap();
        }
        let start = Start {
            checkpoint,
            checkpoint_hash: record_hash(&bodies[checkpoint as usize - 1]),
            history_from: checkpoint + 1,
            segment: named,
            accept_missing: true,
        };
        match CommitLog::open_with_history(dir.path(), start, 400, |_| Ok(()), |_| Ok(())) {
            Err(StorageError::CorruptRecord { reason, .. }) => {
                assert!(reason.contains("before the checkpoint"), "{reason}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|l| l.last())),
        }
    }

    #[test]
    fn a_missing_or_shortened_older_segment_is_found_not_read_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let (bodies, _) = write_n(dir.path(), 50, 400);
        let mut segs: Vec<_> = fs::read_dir(dir.path().join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort_by_key(|p| {
            p.file_stem()
                .unwrap()
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        });
        assert!(segs.len() > 3, "{segs:?}");
        // A middle segment deleted: found at open when the scan reads
        // across it, else by the first read across it.
        let gone = segs[1].clone();
        let saved = fs::read(&gone).unwrap();
        fs::remove_file(&gone).unwrap();
        let e = match CommitLog::open(dir.path(), 0, GENESIS_HASH, 400, |_| Ok(())) {
            Err(e @ StorageError::CorruptRecord { .. }) => e.to_string(),
            other => panic!("expected corruption, got {:?}", other.map(|l| l.last())),
        };
        assert!(e.contains("the next one starts at"), "{e}");
        let mut log =
            CommitLog::open(dir.path(), 50, record_hash(&bodies[49]), 400, |_| Ok(())).unwrap();
        match log.read_from(1, 100, usize::MAX) {
            Err(StorageError::CorruptRecord { file, reason, .. }) => {
                assert_eq!(file, segs[0]);
                assert!(reason.contains("the next one starts at"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        drop(log);
        fs::write(&gone, &saved).unwrap();
        // The first segment cut at a record boundary.
        let first = fs::read(&segs[0]).unwrap();
        let rec = RECORD_PREFIX as usize + bodies[0].len();
        let cut = SEGMENT_HEAD_LEN as usize + rec;
        fs::write(&segs[0], &first[..cut]).unwrap();
        let mut log = CommitLog::open(dir.path(), 50, record_hash(&bodies[49]), 400, |_| Ok(()))
            .expect("the damaged segment is before the checkpoint: not read at open");
        match log.read_from(1, 10, usize::MAX) {
            Err(StorageError::CorruptRecord { file, reason, .. }) => {
                assert_eq!(file, segs[0]);
                assert!(reason.contains("ends at 1,"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn retention_removes_old_segments_and_reports_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let _ = write_n(dir.path(), 50, 400);
        let mut log = CommitLog::open(dir.path(), 0, GENESIS_HASH, 400, |_| Ok(())).unwrap();
        let removed = log.remove_before(30).unwrap();
        assert!(removed > 0);
        let oldest = log.first_retained();
        assert!(oldest <= 30 && oldest > 1);
        assert!(matches!(
            log.read_from(1, 10, 1000),
            Err(StorageError::LogTruncated { requested: 1, .. })
        ));
        assert_eq!(log.read_from(30, 1, 1000).unwrap().len(), 1);
    }
}
