//! Pulling a backup over the protocol: stream a server's snapshot into a
//! directory on this machine, resumably, and check it like
//! `verify-backup`. Used by `magma backup --pull` and by `magma-server
//! --join` (a new member's first copy); it sits between the client library
//! (an `AdminSession`) and `storage::backup` (what is written and how it is
//! checked), and knows nothing of either caller: errors are [`PullError`]s
//! and progress goes to a bar the caller supplies (hidden for a server).
//!
//! The server keeps the snapshot as a pull job (id, file list, idle
//! timeout). This module fetches each file in order, chunk by chunk,
//! through one admin session, writing through `storage::backup::Receiver`
//! (which hashes what it stores). `PULL-STATE` in the target records the
//! job, so:
//!
//! * a broken connection is retried here (reconnect, continue from the
//!   offsets on disk);
//! * a killed pull, run again into the same directory, continues the same
//!   job;
//! * if the server no longer has the job (finished, expired, restarted),
//!   the files are removed and the pull starts over, once, cleanly.
//!
//! At the end the checksums the server computed over what it sent are
//! compared with the local ones, the backup is sealed (header, manifest
//! last) and verified. A copy the server cannot confirm (its answer to the
//! finish was lost) is pulled again, never sealed on local checksums alone;
//! a copy that does not match is removed. This module never writes outside its target, never trusts
//! a file path from the server without checking it, and never leaves a
//! manifest on a directory whose files it has not verified.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::{AdminSession, ClientError};
use crate::protocol::{PullFile, PullSnapshot, WireError};
use crate::storage::backup::{
    describe_problems, read_marker, safe_relative_path, seal, verify, write_marker, Receiver,
    Verified, INCOMPLETE_FILE, MANIFEST_FILE,
};
use crate::types::RepositoryId;

/// The record of an unfinished pull, in the target directory.
pub const STATE_FILE: &str = "PULL-STATE";
/// Reconnection attempts in a row before giving up.
const RECONNECTS: u32 = 6;

/// What a pull was asked to do.
#[derive(Clone, Debug)]
pub struct PullOptions {
    pub server: String,
    pub to: PathBuf,
    pub rate: Option<u64>,
    /// Shows bytes fetched of the total, and the current file: the pull sets
    /// its length and position. `ProgressBar::hidden()` shows nothing.
    pub progress: indicatif::ProgressBar,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// A call to the server failed (after the reconnections allowed).
    #[error("{server}: {source}")]
    Client {
        server: String,
        #[source]
        source: ClientError,
    },
    /// A local file could not be written or read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pull cannot go on: the target is not an interrupted pull, the
    /// server lost the job twice, the server's checksums differ, ...
    #[error("{0}")]
    Backup(String),
    /// The pulled copy, sealed, does not verify.
    #[error("{0}")]
    InvalidBackup(String),
}

impl PullError {
    fn at(server: &str) -> impl FnOnce(ClientError) -> PullError + '_ {
        move |source| PullError::Client {
            server: server.to_string(),
            source,
        }
    }
}

/// A finished pull.
#[derive(Clone, Debug)]
pub struct PullSummary {
    pub server: String,
    pub dir: PathBuf,
    pub verified: Verified,
    pub elapsed: Duration,
    /// Bytes fetched by this run (less than the total when resumed).
    pub fetched: u64,
    /// It continued an earlier, interrupted run.
    pub resumed: bool,
    /// The server had lost the job: it started over.
    pub restarted: bool,
    pub reconnects: u32,
}

impl std::fmt::Display for PullSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "pulled backup of {} into {}: snapshot commit {}, {} files, {} bytes ({} fetched in {:.1} s, {:.1} MiB/s), verified",
            self.server,
            self.dir.display(),
            self.verified.snapshot_commit,
            self.verified.files,
            self.verified.bytes,
            self.fetched,
            secs,
            self.fetched as f64 / 1_048_576.0 / secs.max(1e-9),
        )?;
        if self.resumed {
            write!(f, ", resumed an interrupted pull")?;
        }
        if self.restarted {
            write!(f, ", started over (the server no longer had the job)")?;
        }
        if self.reconnects > 0 {
            write!(f, ", {} reconnect(s)", self.reconnects)?;
        }
        Ok(())
    }
}

/// `PULL-STATE`: enough to continue the job after this process dies.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PullState {
    server: String,
    snapshot: PullSnapshot,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_state(dir: &Path, state: &PullState) -> Result<(), PullError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(state).expect("pull state serializes");
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// What the target directory holds before we start.
fn existing_state(dir: &Path) -> Result<Option<PullState>, PullError> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(dir)(e)),
        Ok(_) => {}
    }
    if dir.join(MANIFEST_FILE).exists() {
        return Err(PullError::Backup(format!(
            "{} already holds a complete backup (it has a {MANIFEST_FILE}); pull into a new directory",
            dir.display()
        )));
    }
    let path = dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            PullError::Backup(format!(
                "{} is damaged ({e}); remove {} to pull again",
                path.display(),
                dir.display()
            ))
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let why = if read_marker(dir).is_some() {
                "holds an incomplete backup that cannot be continued (no PULL-STATE); remove it first"
            } else {
                "already exists and is not an interrupted pull; a backup goes into a new directory"
            };
            Err(PullError::Backup(format!("{} {why}", dir.display())))
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Errors after which reconnecting may help.
fn is_connection_failure(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Io { .. }
            | ClientError::Protocol { .. }
            | ClientError::Server(WireError::ShuttingDown)
    )
}

/// The job is gone on the server (or refused for a reason starting over
/// may cure).
fn is_lost_job(e: &ClientError) -> bool {
    matches!(e, ClientError::Server(WireError::Backup { .. }))
}

/// One admin session that reconnects on connection failures.
struct Link {
    server: String,
    session: Option<AdminSession>,
    reconnects: u32,
}

impl Link {
    fn new(server: &str) -> Result<Link, PullError> {
        let session = AdminSession::connect(server).map_err(PullError::at(server))?;
        Ok(Link {
            server: server.to_string(),
            session: Some(session),
            reconnects: 0,
        })
    }

    /// Run `f` on the session, reconnecting (with backoff, a bounded number
    /// of times in a row) after connection failures.
    fn call<T>(
        &mut self,
        mut f: impl FnMut(&mut AdminSession) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut attempt = 0;
        loop {
            let result = match self.session.as_mut() {
                Some(s) => f(s),
                None => AdminSession::connect(&self.server).and_then(|mut s| {
                    let r = f(&mut s);
                    self.session = Some(s);
                    r
                }),
            };
            match result {
                Err(e) if is_connection_failure(&e) && attempt < RECONNECTS => {
                    attempt += 1;
                    self.reconnects += 1;
                    self.session = None;
                    let pause = Duration::from_millis(200 << attempt.min(5));
                    log::warn!(
                        "pull from {}: {e}; reconnecting in {} ms ({attempt}/{RECONNECTS})",
                        self.server,
                        pause.as_millis()
                    );
                    thread::sleep(pause);
                }
                other => return other,
            }
        }
    }
}

/// What `BACKUP-INCOMPLETE` says while a pull runs.
const PULLING: &str =
    "This directory is an INCOMPLETE Magma backup: a pull (`magma backup --pull` \
     or `magma-server --join`) is in progress.\nstate: pulling\nreason: run the same command \
     again to continue\n";

/// Remove what a lost job left, keeping the directory, marked incomplete.
fn wipe(dir: &Path, state: &PullState) -> Result<(), PullError> {
    // A crash during a seal can leave the header without the marker: mark
    // the directory again before anything else, so that a start on it is
    // refused until a pull seals it.
    write_marker(dir, PULLING).map_err(|e| PullError::Backup(e.to_string()))?;
    let header = dir.join(crate::storage::HEADER_FILE);
    match fs::remove_file(&header) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&header)(e)),
    }
    for f in &state.snapshot.files {
        if let Some(rel) = safe_relative_path(&f.path) {
            let p = dir.join(rel);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
    }
    Ok(())
}

fn start_job(link: &mut Link, opts: &PullOptions) -> Result<PullState, PullError> {
    let to = opts.to.display().to_string();
    let snapshot = link
        .call(|s| s.backup_pull_start(opts.rate, Some(&to)))
        .map_err(PullError::at(&opts.server))?;
    for f in &snapshot.files {
        if safe_relative_path(&f.path).is_none() {
            return Err(PullError::Backup(format!(
                "{} named an unsafe file path {:?}; refusing to write it",
                opts.server, f.path
            )));
        }
    }
    let state = PullState {
        server: opts.server.clone(),
        snapshot,
    };
    write_state(&opts.to, &state)?;
    Ok(state)
}

/// Fetch every file of `state`'s job into `dir`; `Ok(None)` when the server
/// lost the job. Returns the local manifest entries.
fn fetch_all(
    link: &mut Link,
    dir: &Path,
    state: &PullState,
    bar: &indicatif::ProgressBar,
    fetched: &mut u64,
) -> Result<Option<Vec<crate::storage::backup::ManifestFile>>, PullError> {
    let snap = &state.snapshot;
    let server = state.server.clone();
    let mut entries = Vec::with_capacity(snap.files.len());
    for f in &snap.files {
        let mut rx = Receiver::open(dir, &f.path, f.size).map_err(io_err(&dir.join(&f.path)))?;
        bar.set_message(f.path.clone());
        while !rx.is_complete() {
            let offset = rx.received();
            let want = snap.max_chunk.max(1).min(f.size - offset);
            let data = match link.call(|s| s.backup_pull_chunk(snap.id, &f.path, offset, want)) {
                Ok(d) => d,
                Err(e) if is_lost_job(&e) => {
                    log::warn!("pull from {server}: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(PullError::at(&server)(e)),
            };
            if data.is_empty() {
                return Err(PullError::Backup(format!(
                    "{server} sent no bytes of {} at offset {offset} (of {})",
                    f.path, f.size
                )));
            }
            rx.write(&data).map_err(io_err(&dir.join(&f.path)))?;
            *fetched += data.len() as u64;
            bar.inc(data.len() as u64);
        }
        entries.push(rx.finish().map_err(io_err(&dir.join(&f.path)))?);
    }
    Ok(Some(entries))
}

/// What the client stored, as the protocol lists files.
fn held_files(local: &[crate::storage::backup::ManifestFile]) -> Vec<PullFile> {
    local
        .iter()
        .map(|e| PullFile {
            path: e.path.clone(),
            size: e.size,
            blake3: Some(e.blake3.clone()),
        })
        .collect()
}

/// Compare the server's checksums with ours; every mismatch is named.
fn compare(
    local: &[crate::storage::backup::ManifestFile],
    server: &[PullFile],
) -> Result<(), PullError> {
    let bad = PullFile::unconfirmed(server, &held_files(local));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(PullError::Backup(format!(
            "the pulled files do not match what the server sent: {}",
            bad.join("; ")
        )))
    }
}

/// End the job and compare the server's checksums with the files held:
/// `Ok(None)` when the server no longer has the job. Local checksums
/// alone are never enough to seal a copy (a partial file damaged on disk
/// between two runs hashes "correctly"), so a job that cannot be confirmed
/// is pulled again. On a mismatch the files are removed and `PULL-STATE`
/// kept: the job is over on the server, so running the same command again
/// starts a clean pull instead of sealing the bad copy.
fn finish(
    link: &mut Link,
    dir: &Path,
    state: &PullState,
    entries: Vec<crate::storage::backup::ManifestFile>,
) -> Result<Option<Vec<crate::storage::backup::ManifestFile>>, PullError> {
    let server = &state.server;
    let mut held = Some(held_files(&entries));
    let finished = loop {
        match link.call(|s| s.backup_pull_finish(state.snapshot.id, held.clone())) {
            // A server with a low --max-frame (a very large repository)
            // refuses the list and closes the connection: finish without
            // it, as older clients do; the server then trusts that every
            // file was served.
            Err(ClientError::Server(
                e @ (WireError::FrameTooLarge { .. } | WireError::BadRequest { .. }),
            )) if held.is_some() => {
                log::warn!("pull from {server}: the list of files stored was refused ({e}); finishing without it");
                held = None;
                link.session = None;
            }
            other => break other,
        }
    };
    let server_files = match finished {
        Ok(files) => files,
        Err(e) if is_lost_job(&e) => {
            log::warn!("pull from {server}: {e}; the copy cannot be checked against it");
            return Ok(None);
        }
        Err(e) => return Err(PullError::at(server)(e)),
    };
    // The server checksums a file only when it served it in one sweep; a
    // run cut short (a partial last write) can break the sweep. Unconfirmed
    // is not confirmed: pull again.
    let unchecked: Vec<&str> = server_files
        .iter()
        .filter(|f| f.blake3.is_none())
        .map(|f| f.path.as_str())
        .collect();
    if !unchecked.is_empty() {
        log::warn!(
            "pull from {server}: no checksum of {}; the copy cannot be confirmed",
            unchecked.join(", ")
        );
        return Ok(None);
    }
    if let Err(mismatch) = compare(&entries, &server_files) {
        return Err(match wipe(dir, state) {
            Ok(()) => PullError::Backup(format!(
                "{mismatch}; the pulled files were removed: run the same command again to pull afresh"
            )),
            Err(e) => PullError::Backup(format!("{mismatch}; removing the pulled files failed: {e}")),
        });
    }
    Ok(Some(entries))
}

/// Run a pull; see the module doc.
pub fn run(opts: &PullOptions) -> Result<PullSummary, PullError> {
    let started = Instant::now();
    let dir = opts.to.as_path();
    if dir.join(MANIFEST_FILE).exists() && dir.join(STATE_FILE).exists() {
        // An earlier run sealed the copy and stopped before it removed its
        // state: finish it.
        let verified = finish_sealed(dir)?;
        return Ok(PullSummary {
            server: opts.server.clone(),
            dir: dir.to_path_buf(),
            verified,
            elapsed: started.elapsed(),
            fetched: 0,
            resumed: true,
            restarted: false,
            reconnects: 0,
        });
    }
    let earlier = existing_state(dir)?;
    let resumed = earlier.is_some();
    let mut link = Link::new(&opts.server)?;
    let mut state = match earlier {
        Some(s) => s,
        None => {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            write_marker(dir, PULLING).map_err(|e| PullError::Backup(e.to_string()))?;
            start_job(&mut link, opts)?
        }
    };
    let mut restarted = false;
    let mut fetched = 0;
    let entries = loop {
        let total: u64 = state.snapshot.files.iter().map(|f| f.size).sum();
        let bar = &opts.progress;
        bar.reset();
        bar.set_length(total);
        let have: u64 = state
            .snapshot
            .files
            .iter()
            .filter_map(|f| {
                let p = dir.join(safe_relative_path(&f.path)?);
                Some(fs::metadata(p).map(|m| m.len().min(f.size)).unwrap_or(0))
            })
            .sum();
        bar.set_position(have);
        let confirmed = match fetch_all(&mut link, dir, &state, bar, &mut fetched)? {
            Some(entries) => finish(&mut link, dir, &state, entries)?,
            None => None,
        };
        match confirmed {
            Some(entries) => {
                bar.finish_and_clear();
                break entries;
            }
            None if !restarted => {
                log::warn!(
                    "the copy of pull job {} could not be confirmed by {}: starting over",
                    state.snapshot.id,
                    opts.server
                );
                wipe(dir, &state)?;
                state = start_job(&mut link, opts)?;
                restarted = true;
            }
            None => {
                return Err(PullError::Backup(format!(
                    "{} could not confirm the copy twice (job lost or checksums missing); \
                     giving up (the directory stays incomplete)",
                    opts.server
                )))
            }
        }
    };
    let snap = &state.snapshot;
    let repository_id = parse_repository_id(&snap.repository_id)?;
    // Sealed first, the state removed after: a stop in between leaves a
    // sealed copy whose state says so (the next run finishes it), never
    // an incomplete one that cannot be continued.
    seal(
        dir,
        &snap.header,
        entries,
        repository_id,
        snap.snapshot_commit,
        &opts.server,
    )
    .map_err(|e| PullError::Backup(e.to_string()))?;
    let verified = finish_sealed(dir)?;
    debug_assert!(!dir.join(INCOMPLETE_FILE).exists());
    Ok(PullSummary {
        server: opts.server.clone(),
        dir: dir.to_path_buf(),
        verified,
        elapsed: started.elapsed(),
        fetched,
        resumed,
        restarted,
        reconnects: link.reconnects,
    })
}

/// A sealed copy: remove the pull's state (its name durably), then verify
/// the copy; one that fails is marked so, never to be opened.
fn finish_sealed(dir: &Path) -> Result<Verified, PullError> {
    let state_path = dir.join(STATE_FILE);
    match fs::remove_file(&state_path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&state_path)(e)),
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    verify(dir).map_err(|problems| {
        let described = describe_problems(dir, &problems);
        // Sealed but wrong: never to be opened as a repository.
        if let Err(e) = write_marker(
            dir,
            &format!(
                "This pulled copy FAILED verification: {described}\n\
                 Remove this directory and pull again.\n"
            ),
        ) {
            log::error!("marking {} as failed: {e}", dir.display());
        }
        PullError::InvalidBackup(described)
    })
}

fn parse_repository_id(hex: &str) -> Result<RepositoryId, PullError> {
    let bad = || PullError::Backup(format!("the server sent a malformed repository id {hex:?}"));
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(RepositoryId(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_ids_round_trip() {
        let id = RepositoryId([0xab; 16]);
        assert_eq!(parse_repository_id(&id.to_string()).unwrap(), id);
        assert!(parse_repository_id("zz").is_err());
        assert!(parse_repository_id(&"g".repeat(32)).is_err());
    }

    #[test]
    fn a_directory_is_refused_unless_new_or_an_interrupted_pull() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(existing_state(&tmp.path().join("new")).unwrap().is_none());
        let e = existing_state(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        fs::write(tmp.path().join(MANIFEST_FILE), b"{}").unwrap();
        let e = existing_state(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("complete backup"), "{e}");
    }

    /// A run stopped after sealing the copy but before removing its state
    /// is finished by the next one (the state removed, the copy verified),
    /// without the server: never left as a directory nobody can continue.
    #[test]
    fn a_copy_sealed_before_its_state_was_removed_is_finished_by_the_next_run() {
        let tmp = tempfile::tempdir().unwrap();
        let mut repo =
            crate::storage::Repository::create(&tmp.path().join("live"), 3, "127.0.0.1:1").unwrap();
        let backup = tmp.path().join("backup");
        repo.snapshot(&tmp.path().join("scratch"))
            .unwrap()
            .copy_to(&backup)
            .unwrap();
        fs::write(backup.join(STATE_FILE), b"{}").unwrap();
        let summary = run(&PullOptions {
            // Nothing listens there: the run must not need the server.
            server: "127.0.0.1:1".into(),
            to: backup.clone(),
            rate: None,
            progress: indicatif::ProgressBar::hidden(),
        })
        .unwrap();
        assert!(summary.resumed && summary.fetched == 0);
        assert!(!backup.join(STATE_FILE).exists());
        verify(&backup).unwrap();
    }

    #[test]
    fn the_pull_state_round_trips_through_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let state = PullState {
            server: "h:1".into(),
            snapshot: PullSnapshot {
                id: 42,
                snapshot_commit: 7,
                repository_id: "ab".repeat(16),
                header: (0..128u8).collect(),
                files: vec![PullFile {
                    path: "coll/3.dat".into(),
                    size: 99,
                    blake3: None,
                }],
                max_chunk: 65536,
                idle_timeout_s: 120,
            },
        };
        write_state(tmp.path(), &state).unwrap();
        let back = existing_state(tmp.path()).unwrap().unwrap();
        assert_eq!(back.snapshot, state.snapshot);
        assert_eq!(back.server, "h:1");
    }

    /// A server on a fresh repository and the options of a pull from it.
    fn serving(tmp: &Path) -> (crate::server::ServerThread, PullOptions) {
        serving_with(tmp, crate::server::Config::default().max_frame)
    }

    /// [`serving`] with the server's `--max-frame`.
    fn serving_with(tmp: &Path, max_frame: u64) -> (crate::server::ServerThread, PullOptions) {
        let server = crate::server::spawn(crate::server::Config {
            dir: tmp.join("repo"),
            listen: "127.0.0.1:0".into(),
            max_frame,
            ..crate::server::Config::default()
        })
        .unwrap();
        let opts = PullOptions {
            server: server.local_addr().to_string(),
            to: tmp.join("copy"),
            rate: None,
            progress: indicatif::ProgressBar::hidden(),
        };
        (server, opts)
    }

    /// What `run` leaves before its first fetch: the marker and the job.
    fn begin(opts: &PullOptions) -> (Link, PullState) {
        fs::create_dir_all(&opts.to).unwrap();
        write_marker(&opts.to, "a pull in a test\n").unwrap();
        let mut link = Link::new(&opts.server).unwrap();
        let state = start_job(&mut link, opts).unwrap();
        (link, state)
    }

    /// A pull killed half-way through its largest file: the first half
    /// fetched, all but its last `short` bytes written. Returns the file's
    /// path in the copy and the half the server sent.
    fn cut_short(opts: &PullOptions, short: usize) -> (String, Vec<u8>) {
        let (mut link, state) = begin(opts);
        let big = state.snapshot.files.iter().max_by_key(|f| f.size).unwrap();
        assert!(big.size >= 4, "{:?}", state.snapshot.files);
        let first = link
            .call(|s| s.backup_pull_chunk(state.snapshot.id, &big.path, 0, big.size / 2))
            .unwrap();
        Receiver::open(&opts.to, &big.path, big.size)
            .unwrap()
            .write(&first[..first.len() - short])
            .unwrap();
        (big.path.clone(), first)
    }

    /// Flip the first byte of `path`.
    fn damage_first_byte(path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        bytes[0] ^= 0xff;
        fs::write(path, &bytes).unwrap();
    }

    /// A pull cut short with `short` bytes of its last chunk unwritten,
    /// and the first byte on disk damaged before it runs again: the run
    /// finds the damage against the server's checksum, removes the copy
    /// and seals nothing; the next run starts over and seals what the
    /// server confirmed.
    fn damaged_cut_short_copy_is_pulled_afresh(short: usize) {
        let tmp = tempfile::tempdir().unwrap();
        let (server, opts) = serving(tmp.path());
        let (big, first) = cut_short(&opts, short);
        let path = opts.to.join(&big);
        damage_first_byte(&path);

        let e = run(&opts).unwrap_err().to_string();
        assert!(e.contains(&format!("{big}: BLAKE3")), "{e}");
        assert!(e.contains("run the same command again"), "{e}");
        assert!(!path.exists(), "the damaged copy is removed");
        assert!(!opts.to.join(MANIFEST_FILE).exists(), "nothing sealed");

        let again = run(&opts).unwrap();
        assert!(again.restarted, "{again}");
        assert_eq!(fs::read(&path).unwrap()[0], first[0]);
        server.shutdown(true).unwrap();
    }

    /// A crash during a seal can leave the header without the marker; a
    /// resumed pull whose job is lost wipes the copy: it is marked
    /// incomplete again and loses its header, so no start opens it.
    #[test]
    fn a_wiped_copy_is_marked_incomplete_again_and_loses_its_header() {
        let tmp = tempfile::tempdir().unwrap();
        let (server, opts) = serving(tmp.path());
        let (_, state) = begin(&opts);
        fs::remove_file(opts.to.join(INCOMPLETE_FILE)).unwrap();
        fs::write(opts.to.join(crate::storage::HEADER_FILE), b"sealed").unwrap();
        for f in &state.snapshot.files {
            let p = opts.to.join(&f.path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"data").unwrap();
        }
        wipe(&opts.to, &state).unwrap();
        assert!(read_marker(&opts.to).unwrap().contains("state: pulling"));
        assert!(!opts.to.join(crate::storage::HEADER_FILE).exists());
        for f in &state.snapshot.files {
            assert!(!opts.to.join(&f.path).exists(), "{}", f.path);
        }
        server.shutdown(true).unwrap();
    }

    #[test]
    fn a_copy_that_does_not_match_the_server_is_removed_and_pulled_afresh() {
        // The local hash covers the damage, the server's does not.
        damaged_cut_short_copy_is_pulled_afresh(0);
    }

    #[test]
    fn a_damaged_partial_write_before_a_resume_is_never_sealed() {
        // Only part of the last chunk reached the file (the server hashed
        // all of it): the resumed run asks from before where the server's
        // checksum stopped, and the checksum goes on.
        damaged_cut_short_copy_is_pulled_afresh(1);
    }

    /// A server joining the node of `opts.server` on `opts.to`.
    fn joining(opts: &PullOptions) -> anyhow::Result<crate::server::ServerThread> {
        crate::server::spawn(crate::server::Config {
            dir: opts.to.clone(),
            listen: "127.0.0.1:0".into(),
            join: Some(opts.server.clone()),
            ..crate::server::Config::default()
        })
    }

    #[test]
    fn join_continues_a_pull_cut_short_and_refuses_a_failed_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (server, opts) = serving(tmp.path());
        // `magma-server --join` killed half-way through its pull.
        cut_short(&opts, 0);
        assert!(opts.to.join(STATE_FILE).exists());
        // Started again the same way: the pull goes on, then it serves.
        let joined = joining(&opts).expect("the cut-short pull is continued");
        assert!(opts.to.join(MANIFEST_FILE).exists());
        assert!(!opts.to.join(INCOMPLETE_FILE).exists());
        joined.shutdown(true).unwrap();

        // A copy marked incomplete or failed, with no pull to continue, is
        // never opened.
        let failed = PullOptions {
            to: tmp.path().join("failed"),
            ..opts.clone()
        };
        fs::create_dir_all(&failed.to).unwrap();
        write_marker(&failed.to, "This pulled copy FAILED verification: test\n").unwrap();
        let e = format!("{:#}", joining(&failed).err().expect("refused"));
        assert!(e.contains("incomplete or failed copy"), "{e}");
        assert!(e.contains("FAILED verification"), "{e}");
        server.shutdown(true).unwrap();
    }

    /// The server counts a pull as a completed backup (the one it keeps
    /// its log for) only if the client stored what it sent: a copy the
    /// client refuses to seal ends the job aborted, naming the file.
    #[test]
    fn a_pull_the_client_stored_wrongly_is_no_completed_backup_on_the_server() {
        use crate::protocol::BackupState;
        let tmp = tempfile::tempdir().unwrap();
        let (server, opts) = serving(tmp.path());
        let (mut link, state) = begin(&opts);
        let bar = indicatif::ProgressBar::hidden();
        let mut fetched = 0;
        let mut entries = fetch_all(&mut link, &opts.to, &state, &bar, &mut fetched)
            .unwrap()
            .unwrap();
        // What the client hashed while writing is not what the server sent
        // (a byte flipped on its way to the disk).
        let damaged = entries.iter_mut().max_by_key(|e| e.size).unwrap();
        damaged.blake3 = "00".repeat(32);
        let path = damaged.path.clone();
        let err = finish(&mut link, &opts.to, &state, entries).unwrap_err();
        assert!(err.to_string().contains(&path), "{err}");
        let ended = backup_report(&opts);
        assert_eq!(ended.state, BackupState::Aborted, "{ended:?}");
        let why = ended.error.unwrap_or_default();
        assert!(
            why.contains("not what was sent") && why.contains(&path),
            "{why}"
        );

        // Pulled again, correctly: now it is the server's completed backup.
        run(&opts).unwrap();
        assert_eq!(backup_report(&opts).state, BackupState::Completed);
        server.shutdown(true).unwrap();
    }

    /// The server's report of its last backup job.
    fn backup_report(opts: &PullOptions) -> crate::protocol::BackupReport {
        AdminSession::connect(&opts.server)
            .unwrap()
            .backup_status()
            .unwrap()
    }

    /// A server whose --max-frame refuses the list of stored files closes
    /// the connection; the pull finishes without the list, as an older
    /// client would, instead of failing.
    #[test]
    fn a_list_of_stored_files_too_large_for_the_server_is_left_out() {
        use crate::protocol::BackupState;
        let tmp = tempfile::tempdir().unwrap();
        // Every other request of a pull fits; the list does not.
        let (server, opts) = serving_with(tmp.path(), 160);
        run(&opts).unwrap();
        let report = backup_report(&opts);
        assert_eq!(report.state, BackupState::Completed, "{report:?}");
        server.shutdown(true).unwrap();
    }

    #[test]
    fn a_pull_whose_finish_went_unseen_is_pulled_again_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let (server, opts) = serving(tmp.path());
        // Every file fetched and the job finished, but the answer lost
        // (the process killed while it was on its way).
        let (mut link, state) = begin(&opts);
        let bar = indicatif::ProgressBar::hidden();
        let mut fetched = 0;
        assert!(fetch_all(&mut link, &opts.to, &state, &bar, &mut fetched)
            .unwrap()
            .is_some());
        link.call(|s| s.backup_pull_finish(state.snapshot.id, None))
            .unwrap();
        drop(link);

        let summary = run(&opts).unwrap();
        assert!(summary.restarted, "{summary}");
        assert!(summary.fetched > 0, "{summary}");
        server.shutdown(true).unwrap();
    }

    #[test]
    fn mismatched_checksums_are_named() {
        let local = vec![crate::storage::backup::ManifestFile {
            path: "objects.dat".into(),
            size: 3,
            blake3: "aa".into(),
        }];
        let server = vec![PullFile {
            path: "objects.dat".into(),
            size: 3,
            blake3: Some("bb".into()),
        }];
        let e = compare(&local, &server).unwrap_err().to_string();
        assert!(
            e.contains("objects.dat: BLAKE3 aa stored, server sent bb"),
            "{e}"
        );
        let unknown = vec![PullFile {
            blake3: None,
            ..server[0].clone()
        }];
        let e = compare(&local, &unknown).unwrap_err().to_string();
        assert!(
            e.contains("objects.dat: the server sent no checksum"),
            "{e}"
        );
    }
}
