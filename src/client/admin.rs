//! `AdminSession`: the operator's connection to exactly one server (status,
//! digest, backups, follow, take-over, removal, shutdown).
//!
//! This module owns the typed admin calls. It must never fail over, retry or
//! talk to any server but the one it was opened on: an operator asking
//! server A must never get server B's answer.

use std::time::{Duration, Instant};

use crate::client::connection::{unexpected, ConnectOptions, Connection, ServerHello};
use crate::client::error::{ClientError, Result};
use crate::protocol::{
    BackupReport, PullFile, PullSnapshot, RequestBody, ResponseBody, ServerRole, SessionRole,
    StatusReport,
};
use crate::types::{CommitNumber, Epoch, Node, NodeAddr};

/// An admin session on one server.
#[derive(Debug)]
pub struct AdminSession {
    conn: Connection,
}

impl AdminSession {
    /// Connect to `addr` (`host:port`) with default options.
    pub fn connect(addr: &str) -> Result<AdminSession> {
        AdminSession::connect_with(addr, &ConnectOptions::default())
    }

    pub fn connect_with(addr: &str, opts: &ConnectOptions) -> Result<AdminSession> {
        Ok(AdminSession {
            conn: Connection::connect(addr, SessionRole::Admin, opts)?,
        })
    }

    /// The address the session talks to.
    pub fn addr(&self) -> &str {
        self.conn.addr()
    }

    /// What the server said about itself when the session opened.
    pub fn hello(&self) -> &ServerHello {
        self.conn.hello()
    }

    fn call(&mut self, body: RequestBody) -> Result<ResponseBody> {
        Ok(self.conn.call(body)?.body)
    }

    /// Accept `ok`, or a `backup_state` some servers send instead.
    fn call_ok(&mut self, body: RequestBody) -> Result<()> {
        match self.call(body)? {
            ResponseBody::Ok | ResponseBody::BackupState(_) => Ok(()),
            other => Err(unexpected(self.addr(), "ok", &other)),
        }
    }

    /// Round-trip time of a `ping`.
    pub fn ping(&mut self) -> Result<Duration> {
        let start = Instant::now();
        match self.call(RequestBody::Ping)? {
            ResponseBody::Pong => Ok(start.elapsed()),
            other => Err(unexpected(self.addr(), "pong", &other)),
        }
    }

    /// Role, commit, epoch, members with their lag, and any backup job.
    pub fn status(&mut self) -> Result<StatusReport> {
        match self.call(RequestBody::Status)? {
            ResponseBody::Status(report) => Ok(report),
            other => Err(unexpected(self.addr(), "status", &other)),
        }
    }

    /// The node as this server knows it, its epoch and the server's role.
    pub fn node(&mut self) -> Result<(Node, Epoch, ServerRole)> {
        match self.call(RequestBody::GetNode)? {
            ResponseBody::Node { node, epoch, role } => Ok((node, epoch, role)),
            other => Err(unexpected(self.addr(), "node", &other)),
        }
    }

    /// `(commit, hex digest)` of the live content: equal on two servers
    /// exactly when they hold the same content at the same commit.
    pub fn digest(&mut self) -> Result<(CommitNumber, String)> {
        match self.call(RequestBody::Digest)? {
            ResponseBody::Digest { commit, digest } => Ok((commit, digest)),
            other => Err(unexpected(self.addr(), "digest", &other)),
        }
    }

    fn backup_report(&mut self, body: RequestBody) -> Result<BackupReport> {
        match self.call(body)? {
            ResponseBody::BackupState(report) => Ok(report),
            ResponseBody::Ok => self.backup_status(),
            other => Err(unexpected(self.addr(), "backup_state", &other)),
        }
    }

    /// Start a full backup into `to`, a directory on the server's machine.
    /// Returns at once with the job's first report; follow it with
    /// [`AdminSession::backup_status`].
    pub fn backup(&mut self, to: &str) -> Result<BackupReport> {
        self.backup_with_rate(to, None)
    }

    /// [`AdminSession::backup`] copying at most `rate` bytes per second
    /// (the server's own limit applies too; the lower wins).
    pub fn backup_with_rate(&mut self, to: &str, rate: Option<u64>) -> Result<BackupReport> {
        self.backup_report(RequestBody::Backup {
            to: to.to_string(),
            rate,
        })
    }

    /// The current (or last) backup job.
    pub fn backup_status(&mut self) -> Result<BackupReport> {
        match self.call(RequestBody::BackupStatus)? {
            ResponseBody::BackupState(report) => Ok(report),
            other => Err(unexpected(self.addr(), "backup_state", &other)),
        }
    }

    /// Abort the running job; returns its final report (`completed` if it
    /// finished before the abort took effect).
    pub fn backup_abort(&mut self) -> Result<BackupReport> {
        self.backup_report(RequestBody::BackupAbort)
    }

    pub fn backup_pause(&mut self) -> Result<BackupReport> {
        self.backup_report(RequestBody::BackupPause)
    }

    pub fn backup_resume(&mut self) -> Result<BackupReport> {
        self.backup_report(RequestBody::BackupResume)
    }

    /// Start a pull backup: the server snapshots and keeps the snapshot as
    /// a pull job until [`AdminSession::backup_pull_finish`] (or an idle
    /// timeout). `to` is only shown in the server's reports.
    pub fn backup_pull_start(
        &mut self,
        rate: Option<u64>,
        to: Option<&str>,
    ) -> Result<PullSnapshot> {
        match self.call(RequestBody::BackupPullStart {
            rate,
            to: to.map(str::to_string),
        })? {
            ResponseBody::BackupPull(snapshot) => Ok(snapshot),
            other => Err(unexpected(self.addr(), "backup_pull", &other)),
        }
    }

    /// Up to `len` bytes of `file` from `offset` (the server sends at most
    /// its `max_chunk`; fewer only at the end of the file).
    pub fn backup_pull_chunk(
        &mut self,
        id: u64,
        file: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        match self.call(RequestBody::BackupPullChunk {
            id,
            file: file.to_string(),
            offset,
            len,
        })? {
            ResponseBody::BackupChunk { data, .. } => Ok(data),
            other => Err(unexpected(self.addr(), "backup_chunk", &other)),
        }
    }

    /// Release a pull job; returns the checksums the server computed over
    /// what it served. `held`: what the client stored (path, size, BLAKE3
    /// of each file); the server then counts the job a completed backup
    /// only if it matches what it sent.
    pub fn backup_pull_finish(
        &mut self,
        id: u64,
        held: Option<Vec<PullFile>>,
    ) -> Result<Vec<PullFile>> {
        match self.call(RequestBody::BackupPullFinish { id, files: held })? {
            ResponseBody::BackupPullDone { files, .. } => Ok(files),
            other => Err(unexpected(self.addr(), "backup_pull_done", &other)),
        }
    }

    /// Stop the server, flushing first when `save`. A server that closes
    /// the connection instead of answering has also done as asked.
    /// Returns once the shutdown has begun; see [`AdminSession::shutdown_and_wait`].
    pub fn shutdown(&mut self, save: bool) -> Result<()> {
        match self.call_ok(RequestBody::Shutdown { save }) {
            Err(ClientError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof
                    || source.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Stop the server as [`AdminSession::shutdown`] does, then wait, at
    /// most `limit`, until it has stopped: the server keeps this connection
    /// open until its repository is closed (its lock released) and the
    /// process exits. False when `limit` passed first.
    pub fn shutdown_and_wait(&mut self, save: bool, limit: Duration) -> Result<bool> {
        self.shutdown(save)?;
        if self.conn.is_usable() {
            self.conn.wait_closed(limit)
        } else {
            Ok(true)
        }
    }

    /// Make this server a warm backup of `primary` (beWarmBackupFor:).
    pub fn follow(&mut self, primary: &str) -> Result<()> {
        self.call_ok(RequestBody::Follow {
            primary: NodeAddr::from(primary),
        })
    }

    /// Ask this secondary to become primary; a secondary that is not
    /// current refuses with an error.
    pub fn take_over(&mut self) -> Result<()> {
        self.call_ok(RequestBody::TakeOver)
    }

    /// Ask this primary to remove the secondary at `addr` from the node.
    pub fn remove_secondary(&mut self, addr: &str) -> Result<()> {
        match self.call(RequestBody::RemoveSecondary {
            addr: addr.to_string(),
        })? {
            ResponseBody::Ok | ResponseBody::Node { .. } => Ok(()),
            other => Err(unexpected(self.addr(), "ok", &other)),
        }
    }
}
