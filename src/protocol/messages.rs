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
    },
    BackupStatus,
    BackupAbort,
    BackupPause,
    BackupResume,
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
    pub commit: CommitNumber,
    pub lag_commits: u64,
    pub lag_ms: u64,
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

/// Keep `Member` reachable from protocol users without importing types.
pub type NodeMember = Member;
