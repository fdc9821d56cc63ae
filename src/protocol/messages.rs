//! Every message of the wire protocol (documented in `docs/PROTOCOL.md`).
//!
//! A frame carries one [`Request`] (client → server) or one [`Response`]
//! (server → client), MessagePack-encoded with named fields (maps), enum
//! variants internally tagged by `"type"` (requests/responses) or `"code"`
//! (errors). Object values travel as plain MessagePack values in which a
//! reference to a persistent object is extension type 1 (8-byte big-endian
//! oid) and, inside a commit, a reference to a new object is extension type
//! 2 (its temporary id). This module owns shapes only: no I/O, no actix.

use serde::{Deserialize, Serialize};

use crate::protocol::error::WireError;
use crate::types::{CommitNumber, Epoch, Member, Node, NodeAddr, Oid};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Who opened a connection; said once, in [`RequestBody::Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionRole {
    Application,
    Admin,
    Peer,
}

/// One request. `id` is chosen by the client and echoed in the response, so
/// a client may pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

/// A read may require the server to have applied at least this commit.
pub type RequiredProgress = Option<CommitNumber>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestBody {
    /// Must be the first request of a connection.
    Hello {
        protocol_version: u32,
        role: SessionRole,
        client_name: String,
    },
    Ping,
    /// The node as this server knows it.
    GetNode,
    /// Read an object and, to `depth` levels, the objects it references.
    /// Oid 0 is the root anchor.
    Read {
        oid: Oid,
        #[serde(default)]
        depth: u32,
        #[serde(default)]
        required_progress: RequiredProgress,
    },
    /// The user's domain root (oid and object), to `depth`.
    ReadRoot {
        #[serde(default)]
        depth: u32,
        #[serde(default)]
        required_progress: RequiredProgress,
    },
    CollectionLength {
        coll: Oid,
        #[serde(default)]
        required_progress: RequiredProgress,
    },
    /// Up to `count` elements from index `start`.
    CollectionRange {
        coll: Oid,
        start: u64,
        count: u64,
        #[serde(default)]
        required_progress: RequiredProgress,
    },
    GetMeta {
        key: String,
        #[serde(default)]
        required_progress: RequiredProgress,
    },
    Commit(CommitBody),
    /// Server status (also allowed on application sessions).
    Status,
    /// `<commit> <hex digest>` of the live content.
    Digest,
    // ---- admin requests (admin sessions only) ----
    /// Full backup to a directory on the server's machine.
    Backup {
        to: String,
        /// Copy at most this many bytes per second (the server's
        /// `--backup-rate` applies too; the lower wins).
        #[serde(default)]
        rate: Option<u64>,
    },
    BackupStatus,
    BackupAbort,
    BackupPause,
    BackupResume,
    /// Snapshot the repository for a pull backup over this protocol.
    BackupPullStart {
        /// As in `backup`.
        #[serde(default)]
        rate: Option<u64>,
        /// Where the client writes it (shown in `backup_status`).
        #[serde(default)]
        to: Option<String>,
    },
    /// Bytes `offset..offset+len` of one file of a pull job's snapshot.
    BackupPullChunk {
        id: u64,
        file: String,
        offset: u64,
        len: u64,
    },
    /// The client has every file: release the pull job. `files`: what the
    /// client stored (BLAKE3 of each whole file); the job counts as a
    /// completed backup only if they match what the server sent. Without
    /// them (older clients), every file fully served is enough.
    BackupPullFinish {
        id: u64,
        #[serde(default)]
        files: Option<Vec<PullFile>>,
    },
    /// serverSave:andExit:
    Shutdown {
        save: bool,
    },
    /// beWarmBackupFor:
    Follow {
        primary: NodeAddr,
    },
    TakeOver,
    RemoveSecondary {
        addr: NodeAddr,
    },
    /// Was a commit carrying this idempotency token applied (e.g. one whose
    /// outcome was unknown after a failover)? Ask the primary.
    CommitStatus {
        #[serde(with = "serde_bytes")]
        token: Vec<u8>,
    },
    // ---- node requests ----
    /// From an application: `addr` could not be reached. A hint for the
    /// primary to check that member, never a removal by itself.
    Complain {
        addr: NodeAddr,
    },
    // ---- peer requests (peer sessions only) ----
    /// A catching-up server pulls a glob of commit records from `from` on.
    CatchUp {
        from: CommitNumber,
        max_count: u32,
        max_bytes: u64,
        server_id: u64,
        /// Where the primary reaches the catching-up server.
        addr: NodeAddr,
        repository_id: String,
        /// A successor about to promote pulls what another secondary holds
        /// beyond it; served by secondaries too, and never adds a member.
        #[serde(default)]
        for_promotion: bool,
    },
    /// The chain hash of record `number` (0: the genesis hash), to check
    /// whether one log is a prefix of another.
    RecordHash {
        number: CommitNumber,
    },
    /// Another secondary found the primary unreachable and names this
    /// server its successor: check, and promote if the primary is gone.
    Promote,
    /// A secondary taking over asks the primary to stop taking commits and
    /// drain to it; answered once it holds everything.
    HandOver {
        server_id: u64,
    },
    /// A secondary stops on purpose: remove it from the node without the
    /// usual checks.
    Leaving {
        server_id: u64,
    },
    /// The primary pushes records in order (none: a heartbeat).
    Replicate {
        epoch: Epoch,
        primary_id: u64,
        records: Vec<serde_bytes::ByteBuf>,
        primary_last: CommitNumber,
        /// When to answer; absent means `durable`.
        #[serde(default)]
        ack: ReplicateAck,
    },
}

/// When a secondary answers a `replicate`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicateAck {
    /// Once the records are applied and fsynced: what synchronous
    /// replication (`--sync-replicas` N > 0) waits for.
    #[default]
    Durable,
    /// Once the records are applied (visible to reads, and in the
    /// secondary's page cache, so they survive its process being killed);
    /// they become durable under the secondary's own `--flush` policy. For
    /// asynchronous replication, where nobody waits for the secondary: its
    /// fsyncs then neither pace the stream nor count as lag.
    Applied,
}

/// A reference inside a commit: an existing object, or a new object of the
/// same commit by its temporary id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireRef {
    Oid(Oid),
    New(u64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WirePut {
    pub oid: Oid,
    /// The version the client read; the commit conflicts if it changed.
    pub expected_version: u64,
    pub class: String,
    pub value: rmpv::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireNew {
    pub temp_id: u64,
    pub class: String,
    pub value: rmpv::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireAppend {
    pub coll: WireRef,
    pub value: rmpv::Value,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommitBody {
    /// Idempotency token (up to 32 bytes): a retried commit with the same
    /// token is answered with the original outcome instead of applied twice.
    #[serde(default, with = "serde_bytes")]
    pub token: Option<Vec<u8>>,
    #[serde(default)]
    pub puts: Vec<WirePut>,
    #[serde(default)]
    pub news: Vec<WireNew>,
    #[serde(default)]
    pub appends: Vec<WireAppend>,
    #[serde(default)]
    pub set_root: Option<WireRef>,
    /// key -> value (nil removes the attribute).
    #[serde(default)]
    pub meta: Vec<(String, Option<rmpv::Value>)>,
}

/// One response, echoing the request's id. `commit` is the server's current
/// (last applied) commit number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub commit: CommitNumber,
    pub body: ResponseBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireObject {
    pub oid: Oid,
    pub version: u64,
    pub class: String,
    pub value: rmpv::Value,
    /// For a large collection, its length.
    #[serde(default)]
    pub collection_len: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseBody {
    Hello {
        protocol_version: u32,
        server_id: u64,
        repository_id: String,
        role: ServerRole,
        node: Node,
        epoch: Epoch,
    },
    Pong,
    Node {
        node: Node,
        epoch: Epoch,
        role: ServerRole,
    },
    /// The requested object first, then those reached to the depth asked.
    Objects {
        objects: Vec<WireObject>,
    },
    Root {
        root: Option<Oid>,
        objects: Vec<WireObject>,
    },
    Length {
        len: u64,
    },
    Elements {
        start: u64,
        values: Vec<rmpv::Value>,
        /// The collection's length when it was read: a reply may stop
        /// short of it (by count or by bytes) and the client pages on.
        /// Absent from servers that predate it, whose replies were short
        /// only at the end.
        #[serde(default)]
        len: Option<u64>,
    },
    Meta {
        value: Option<rmpv::Value>,
    },
    Committed {
        number: CommitNumber,
        /// temp id -> assigned oid.
        new_oids: Vec<(u64, Oid)>,
        /// Element index of each append, in request order.
        positions: Vec<u64>,
    },
    Status(StatusReport),
    Digest {
        commit: CommitNumber,
        digest: String,
    },
    BackupState(BackupReport),
    /// A pull job started: its snapshot's files, to fetch by chunks.
    BackupPull(PullSnapshot),
    /// Bytes of one file of a pull job's snapshot.
    BackupChunk {
        id: u64,
        file: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The pull job is released; `files` carry the BLAKE3 the server
    /// computed over the bytes it served (nil for a file not served in one
    /// sequential pass).
    BackupPullDone {
        id: u64,
        files: Vec<PullFile>,
    },
    /// A glob of record bodies (see `docs/STORAGE.md`), from the requested
    /// number on. `level`: they reach the primary's last commit.
    Records {
        records: Vec<serde_bytes::ByteBuf>,
        last: CommitNumber,
        epoch: Epoch,
        level: bool,
    },
    RecordHash {
        number: CommitNumber,
        #[serde(with = "serde_bytes")]
        hash: Vec<u8>,
    },
    /// The primary stopped taking commits; everything up to `last` is
    /// durable on the server taking over.
    HandedOver {
        last: CommitNumber,
    },
    /// Whether a commit with this idempotency token was applied.
    TokenStatus {
        number: Option<CommitNumber>,
    },
    /// What a secondary applied, and made durable, after a `replicate`.
    Replicated {
        applied: CommitNumber,
        durable: CommitNumber,
    },
    /// An admin request was accepted (shutdown, pause, ...).
    Ok,
    Error {
        error: WireError,
        /// Human-readable; never parse it, use `error`.
        message: String,
    },
}

/// What a server is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerRole {
    Primary,
    Secondary,
    CatchingUp,
    Restore,
    Witness,
    Deposed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub addr: NodeAddr,
    pub role: ServerRole,
    /// The last commit the member applied (for a secondary: acknowledged
    /// to the primary); 0 when the answering server does not know.
    pub commit: CommitNumber,
    /// The last commit the member holds durably (≤ `commit`; behind it
    /// under `interval:MS` flushing or asynchronous replication); 0 when
    /// unknown. Absent from servers that predate it.
    #[serde(default)]
    pub durable: CommitNumber,
    pub lag_commits: u64,
    pub lag_ms: u64,
    /// False when the answering server does not know this member's figures
    /// (a secondary about the other members, a member the primary streams
    /// nothing to or could not ask): `commit`, `durable` and the lags are
    /// then 0 and mean nothing. Absent (true) from servers that predate it.
    #[serde(default = "known_by_default")]
    pub known: bool,
}

fn known_by_default() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub role: ServerRole,
    pub commit: CommitNumber,
    pub epoch: Epoch,
    pub repository: String,
    pub server_id: u64,
    pub addr: NodeAddr,
    pub partition_safe: bool,
    pub members: Vec<MemberStatus>,
    pub backup: Option<BackupReport>,
    pub flush: String,
    pub sync_replicas: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupState {
    Running,
    Paused,
    Completed,
    Aborted,
    Failed,
}

impl BackupState {
    /// The word on the wire and in output (`running`, `paused`, ...).
    pub fn name(self) -> &'static str {
        match self {
            BackupState::Running => "running",
            BackupState::Paused => "paused",
            BackupState::Completed => "completed",
            BackupState::Aborted => "aborted",
            BackupState::Failed => "failed",
        }
    }

    /// The job is over (completed, aborted or failed).
    pub fn is_final(self) -> bool {
        !matches!(self, BackupState::Running | BackupState::Paused)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupReport {
    pub state: BackupState,
    pub target: String,
    pub snapshot_commit: CommitNumber,
    pub current_file: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub started_unix_ms: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

/// One file of a pull job's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullFile {
    /// Relative path inside the backup, `/`-separated.
    pub path: String,
    pub size: u64,
    #[serde(default)]
    pub blake3: Option<String>,
}

impl PullFile {
    /// The files of `sent` (what a server served, with its checksums) that
    /// `held` (what a client stored) does not confirm, one line each: not
    /// stored, of another size or checksum, or without a checksum on
    /// either side (a file not served in one sequential pass). Files only
    /// the client holds do not count; order does not matter.
    pub fn unconfirmed(sent: &[PullFile], held: &[PullFile]) -> Vec<String> {
        let held: std::collections::HashMap<&str, &PullFile> =
            held.iter().map(|h| (h.path.as_str(), h)).collect();
        let mut bad = Vec::new();
        for s in sent {
            let Some(h) = held.get(s.path.as_str()) else {
                bad.push(format!("{}: sent by the server but not received", s.path));
                continue;
            };
            if h.size != s.size {
                bad.push(format!(
                    "{}: {} bytes received, server has {}",
                    s.path, h.size, s.size
                ));
            }
            match (&s.blake3, &h.blake3) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    bad.push(format!("{}: BLAKE3 {b} stored, server sent {a}", s.path))
                }
                (None, _) => bad.push(format!("{}: the server sent no checksum", s.path)),
                (_, None) => bad.push(format!("{}: no checksum of the stored file", s.path)),
            }
        }
        bad
    }
}

/// The answer to `backup_pull_start`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PullSnapshot {
    pub id: u64,
    pub snapshot_commit: CommitNumber,
    pub repository_id: String,
    /// The header to write last (restore-mode bit set, server id 0).
    #[serde(with = "serde_bytes")]
    pub header: Vec<u8>,
    /// The data files, in the order to fetch them.
    pub files: Vec<PullFile>,
    /// Largest chunk the server sends; ask for this much at a time.
    pub max_chunk: u64,
    /// Seconds a pull job may stay idle before the server releases it.
    pub idle_timeout_s: u64,
}

/// Keep `Member` reachable from protocol users without importing types.
pub type NodeMember = Member;

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, blake3: Option<&str>) -> PullFile {
        PullFile {
            path: path.into(),
            size,
            blake3: blake3.map(str::to_string),
        }
    }

    #[test]
    fn a_pulled_copy_is_confirmed_only_file_by_file_with_checksums_on_both_sides() {
        let served = vec![
            file("objects.dat", 10, Some("aa")),
            file("index.map", 20, Some("bb")),
        ];
        // In another order, with a file the server did not list: confirmed.
        let held = vec![
            file("index.map", 20, Some("bb")),
            file("extra", 1, Some("cc")),
            file("objects.dat", 10, Some("aa")),
        ];
        assert!(PullFile::unconfirmed(&served, &held).is_empty());

        let held = vec![file("index.map", 20, Some("bb"))];
        assert_eq!(
            PullFile::unconfirmed(&served, &held),
            ["objects.dat: sent by the server but not received".to_string()]
        );
        let held = vec![
            file("objects.dat", 9, Some("aa")),
            file("index.map", 20, Some("b0")),
        ];
        assert_eq!(
            PullFile::unconfirmed(&served, &held),
            [
                "objects.dat: 9 bytes received, server has 10".to_string(),
                "index.map: BLAKE3 b0 stored, server sent bb".to_string()
            ]
        );
        // Not served in one pass: nothing to compare, so not confirmed.
        let served = vec![file("objects.dat", 10, None)];
        let held = vec![file("objects.dat", 10, Some("aa"))];
        assert_eq!(
            PullFile::unconfirmed(&served, &held),
            ["objects.dat: the server sent no checksum".to_string()]
        );
    }
}
