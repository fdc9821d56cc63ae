//! The `magma` operator tool as a library: argument definitions, one module
//! per group of commands, and the error every command reports. The binary
//! (`src/bin/magma.rs`) only parses, calls [`run`] and turns a
//! [`CliError`] into `error: <kind>: <message>` and an exit code; tests call
//! the same functions in-process (`flood::run`, `bench::run`, ...).
//!
//! | module | owns |
//! |---|---|
//! | `args` | [`Cli`]: every command and flag, with the `--help` texts |
//! | `error` | [`CliError`]: the stable error kinds and exit codes |
//! | `dispatch` | [`run`]: one command → the module that does it, output |
//! | `domain` | the documented shape of the domain root flood and dump share |
//! | `flood` | `magma flood`: numbered appends, ack log, summary |
//! | `bench` | `magma bench`: K flooding clients, throughput, latency |
//! | `status` | `magma status`: the human table and the JSON document |
//! | `inspect` | `magma digest` and `magma dump`: reads from one server |
//! | `admin` | shutdown, backups, follow, take-over, remove, verify-backup |
//! | `compact` | `magma compact`: offline garbage collection of a backup |
//!
//! The CLI is a client like any other: it speaks to servers only through
//! `crate::client`, never through the server's actors, and it never hides a
//! failure (an unanswered commit is reported as unknown). The only storage
//! code it uses is `storage::backup`, to write and check backup directories
//! on this machine (`verify-backup`), and `storage::compact`; `backup --pull`
//! is `crate::pull`, shared with `magma-server --join`.

mod admin;
mod args;
pub mod bench;
mod bench_loop;
mod compact;
mod dispatch;
pub mod domain;
mod error;
pub mod flood;
pub mod inspect;
pub mod status;

pub use args::{
    BackupArgs, BackupStatusArgs, BenchArgs, Cli, Command, CompactArgs, DumpArgs, FloodArgs,
    FollowArgs, RemoveArgs, ServerArgs, ShutdownArgs, StatusArgs, VerifyBackupArgs,
};
pub use dispatch::run;
pub use error::{CliError, ErrorLine, EXIT_ERROR, EXIT_OK, EXIT_USAGE};
