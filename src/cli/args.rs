//! Every command and flag of `magma`, as clap derive types. The doc comments
//! are the `--help` texts, so they state defaults and exit behaviour.
//!
//! This module owns the command-line surface only: names and flags listed
//! in DESIGN.md ("Interfaces operators and scripts rely on") are stable and
//! must never be renamed. It never connects to anything.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

const AFTER_HELP: &str = "\
Errors: every failure prints one line `error: <kind>: <message>` on stderr.
<kind> is a stable short word: network, outcome_unknown, conflict,
no_server_reachable, protocol, unavailable, wrong_server, shutting_down,
backup, invalid_backup, compact, unknown_object, not_a_collection, io, not_found,
incompatible_root, usage, ... (the client's error kind or the server's error code).

Exit codes: 0 success; 1 error (including a server's `unavailable`:
cannot be served now, retry later); 2 usage error, or the feature is not
in this release.";

/// Operate a Magma-HA node: status, backups, membership, shutdown, and the
/// flooding clients used to test and measure it.
///
/// ADDR is host:port. Admin commands (--server) talk to exactly that server
/// and never fail over; client commands (--node) see the node as one server.
#[derive(Parser, Debug)]
#[command(name = "magma", version, about, long_about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The clap command, with the error and exit-code notes on every
    /// subcommand's help too.
    pub fn clap_command() -> clap::Command {
        Cli::command().mut_subcommands(|c| c.after_help(AFTER_HELP))
    }

    /// Parse `args` (the program name first) as the binary does.
    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut cmd = Cli::clap_command();
        let matches = cmd.try_get_matches_from_mut(args)?;
        Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Role, commit, epoch, members and their lag, backup job of one server.
    ///
    /// Human form: a table. With --json: one JSON object with `role`
    /// ("primary", "secondary", "catching-up", "restore", "witness",
    /// "deposed"), `commit`, `epoch` (a string "<term>.<server id in hex>",
    /// e.g. "3.1f"; `epoch_term` and `epoch_server` give its parts as
    /// numbers, `epoch_server_hex` exactly), `repository`, `server_id`
    /// (and `server_id_hex`: jq and JavaScript round 64-bit numbers),
    /// `addr`, `partition_safe`, `flush`, `sync_replicas`, `members` (each
    /// `addr`, `role`, `commit`, `durable`, `lag_commits`, `lag_ms`; null,
    /// and `-` in the table, where the answering server does not know them,
    /// e.g. a secondary about the other members) and `backup` (null or the
    /// job: `state`, `target`, `current_file`, `bytes_done`, `bytes_total`,
    /// ...).
    Status(StatusArgs),

    /// Take a full online backup of a server.
    ///
    /// Without --pull: the server copies a point-in-time snapshot into --to,
    /// a NEW directory on ITS machine, in the background; this command
    /// follows the job with a live progress bar (bytes, rate, ETA, current
    /// file) until it ends and prints a summary, unless --detach. Commits go
    /// on during the copy. The backup is the repository at one commit in
    /// restore mode, with a MANIFEST written last; a server started on it
    /// serves reads (role "restore") and refuses commits.
    ///
    /// With --pull: the snapshot is streamed over the protocol into --to on
    /// THIS machine, then checked like `magma verify-backup`. If the
    /// connection breaks, the command reconnects and continues; if it was
    /// killed, running the same command again continues from what --to
    /// holds (or starts over cleanly if the server no longer has the job).
    ///
    /// Exits 1 with `error: backup: ...` if the server refuses (a backup is
    /// running, the target exists or is the live directory or cannot be
    /// created) or the job ends aborted or failed.
    Backup(BackupArgs),

    /// Show the server's current (or last) backup job.
    BackupStatus(BackupStatusArgs),

    /// Abort the server's running backup job.
    BackupAbort(ServerArgs),

    /// Pause the server's running backup job.
    BackupPause(ServerArgs),

    /// Resume the server's paused backup job.
    BackupResume(ServerArgs),

    /// Check a backup directory offline: the MANIFEST exists and parses,
    /// every file has the size and BLAKE3 checksum it lists and no other
    /// file is present, and the header is intact (magic, CRC) with the
    /// restore-mode bit set and the repository id and snapshot commit of the
    /// manifest.
    ///
    /// Prints one line describing the backup and exits 0 when it is valid;
    /// otherwise exits 1 with `error: invalid_backup: DIR: <every problem,
    /// each naming the file and expected vs found>`. A copy that never
    /// finished (aborted, failed, interrupted) has no manifest and is
    /// reported as incomplete, with the reason it recorded.
    VerifyBackup(VerifyBackupArgs),

    /// Make a server a warm backup (secondary) of a primary.
    Follow(FollowArgs),

    /// Ask a current secondary to take over as primary (deliberate swap).
    ///
    /// The primary stops taking commits, drains to it, and the roles swap
    /// under a new epoch; sessions re-route their commits. A secondary that
    /// is not current refuses.
    TakeOver(ServerArgs),

    /// Ask the primary to remove a secondary from the node.
    Remove(RemoveArgs),

    /// Stop a server, saving (flushing and checkpointing) first unless
    /// --no-save, and wait until it has stopped: its repository closed and
    /// its lock released, so a server may be started on the directory (or
    /// port) at once. A primary first hands over to a current secondary.
    Shutdown(ShutdownArgs),

    /// Copy a backup offline, dropping unreachable objects and superseded
    /// versions (garbage collection without stopping the node).
    ///
    /// Reads the backup in --from (made by `magma backup`; never changed)
    /// and writes --to, a NEW directory holding only the objects reachable
    /// from the root anchor, each at its latest version, with the backup's
    /// commit number, epoch, hash-chain head, repository id and node, in
    /// restore mode and with a MANIFEST (`magma verify-backup` accepts it).
    /// A server started on it catches up from the primary like on any
    /// backup. Draws a progress bar on a terminal (objects copied, bytes
    /// written) unless --quiet, then prints one line: objects kept and
    /// dropped, size before and after in bytes, elapsed time.
    ///
    /// Exits 1 with `error: compact: ...` if --from is locked by a running
    /// server, is not a backup (restore-mode bit clear), is not pristine
    /// (no MANIFEST, or a server has opened it), if --to exists, or if
    /// reading or writing fails (then --to is marked incomplete).
    Compact(CompactArgs),

    /// Append numbered strings to a large collection, one commit each.
    ///
    /// Appends "NAME-<seq>" (seq from 1, zero-padded to 9 digits, e.g.
    /// "NAME-000000001") to the large collection NAME under the domain root,
    /// creating the root and the collection if needed (see `magma dump`).
    /// Each acknowledged seq is written on its own line of the ack log as
    /// soon as it is acknowledged. Stops after --duration or --count (never,
    /// without either), or at Ctrl-C or SIGTERM (a second one ends it at
    /// once), and prints one summary line on stdout. At the first
    /// error the application sees, prints `error: <kind>: <message>` and
    /// exits non-zero; kind `outcome_unknown` means the last append (seq
    /// named in the summary) may or may not have been applied.
    ///
    /// The domain root is a map {"collections": {NAME: <ref>, ...}} (class
    /// "MagmaRoot" when flood creates it; an application's map root gets the
    /// "collections" key added). Flooders starting at once with different
    /// names are safe: the root is created by one idempotent commit and
    /// names are added by optimistic rewrites, retried on conflict.
    ///
    /// Reusing a NAME appends to the same collection, starting again at 1.
    Flood(FloodArgs),

    /// Measure throughput and commit latency with K flooding clients.
    ///
    /// Runs K clients in this process, each appending to its own collection
    /// PREFIX-<i> (i from 1), one commit per append, one commit in flight.
    /// By default one event loop drives K connections to the primary (as
    /// redis-benchmark and pgbench do); --threads gives each client its own
    /// thread and client-library session. Prints commits/s and commit
    /// latency p50/p99/max in milliseconds; with --json, a JSON object
    /// (`clients`, `duration_s`, `commits`, `commits_per_sec`, `latency_ms`
    /// {`p50`, `p99`, `max`, `mean`}). Latency is measured per commit from
    /// its send to its reply; percentiles are nearest-rank over every
    /// sample. The first error of any client ends the run and is reported
    /// instead of figures; so does a client without a reply for 30 s.
    Bench(BenchArgs),

    /// Print "<commit> <hex digest of the content>" of one server.
    ///
    /// Two servers with the same commit number and content print the same
    /// line.
    Digest(ServerArgs),

    /// Print a large collection's elements, one per line, in order, as read
    /// from exactly this server.
    ///
    /// The collection is found by NAME in the domain root written by `magma
    /// flood` (a map {"collections": {NAME: <ref>}}). Strings are printed
    /// raw, other values as JSON (a reference as {"$ref": oid}). Prints the
    /// elements the collection had when the dump started.
    Dump(DumpArgs),
}

/// A command addressed to one server.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server to talk to (host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The server to ask (host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// The server to back up (host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// Target directory: an absolute path on the server's machine that
    /// must not exist (with --pull: a path here, new, or the directory of an
    /// interrupted pull to continue).
    #[arg(long, value_name = "DIR")]
    pub to: String,
    /// Start the job and return at once (follow it with backup-status).
    #[arg(long, conflicts_with = "pull")]
    pub detach: bool,
    /// Stream the backup into --to on THIS machine instead.
    #[arg(long)]
    pub pull: bool,
    /// Copy at most this many bytes per second (the server's --backup-rate
    /// applies too; the lower wins). Default: the server's limit.
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct BackupStatusArgs {
    /// The server to ask (host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// Print the job as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct VerifyBackupArgs {
    /// The backup directory to check.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct FollowArgs {
    /// The server that becomes a warm backup (host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// The primary to follow (host:port).
    #[arg(long, value_name = "ADDR")]
    pub primary: String,
}

#[derive(Args, Debug, Clone)]
pub struct RemoveArgs {
    /// The primary of the node (host:port).
    #[arg(long, value_name = "PRIMARY")]
    pub server: String,
    /// The secondary to remove, as the node knows it (host:port).
    #[arg(long, value_name = "ADDR")]
    pub secondary: String,
}

#[derive(Args, Debug, Clone)]
pub struct ShutdownArgs {
    /// The server to stop (host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// Exit without the final save (flush and checkpoint); recovery replays
    /// the log at the next start.
    #[arg(long)]
    pub no_save: bool,
    /// Give up waiting (exit 1, the server still stopping) after this many
    /// seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub wait_secs: u64,
}

#[derive(Args, Debug, Clone)]
pub struct CompactArgs {
    /// The backup directory to read.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// The directory to write the compacted copy to (must not exist).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct FloodArgs {
    /// Servers of the node, comma-separated (any member will do; the
    /// session learns the rest).
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        required = true
    )]
    pub node: Vec<String>,
    /// Collection name; elements are "NAME-<seq>".
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: String,
    /// Stop after this many seconds (decimals allowed), counted from the
    /// first append (after set-up).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Stop after this many acknowledged appends.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Write each acknowledged seq (decimal, e.g. "42") on its own line of
    /// FILE (created or truncated), written out line by line as
    /// acknowledged (not fsynced).
    #[arg(long, value_name = "FILE")]
    pub ack_log: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Servers of the node, comma-separated.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        required = true
    )]
    pub node: Vec<String>,
    /// Number of concurrent clients, each with one commit in flight.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub clients: u32,
    /// Drive each client from its own thread with a client-library session
    /// (measures the library too). By default one event loop drives K
    /// connections to the primary, as redis-benchmark and pgbench do.
    #[arg(long)]
    pub threads: bool,
    /// Seconds to measure for (decimals allowed); set-up is not counted.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Client i appends to the collection PREFIX-<i>.
    #[arg(long = "name", value_name = "PREFIX", default_value = "bench", value_parser = parse_name)]
    pub prefix: String,
}

#[derive(Args, Debug, Clone)]
pub struct DumpArgs {
    /// The server to read from (host:port); only this one is asked.
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// Name of the collection in the domain root.
    #[arg(long, value_name = "NAME")]
    pub collection: String,
}

/// Seconds as a positive decimal number.
pub(crate) fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("`{s}`: seconds must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A collection name: non-empty, printable, no line breaks (it ends up in
/// element values and in output lines).
pub(crate) fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the name must not be empty".into());
    }
    if s.chars().any(char::is_control) {
        return Err("the name must not contain control characters".into());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_args(std::iter::once("magma").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
        Cli::clap_command().debug_assert();
    }

    #[test]
    fn derive_and_binary_parsing_agree() {
        let args = ["magma", "digest", "--server", "h:1"];
        let a = Cli::try_parse_from(args).unwrap();
        let b = Cli::try_parse_args(args).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn flood_takes_a_node_list_and_a_duration() {
        let cli = parse(&[
            "flood",
            "--node",
            "a:1,b:2",
            "--name",
            "f1",
            "--duration",
            "2.5",
            "--ack-log",
            "/tmp/acks",
        ])
        .unwrap();
        let Command::Flood(f) = cli.command else {
            panic!("not flood: {cli:?}")
        };
        assert_eq!(f.node, ["a:1", "b:2"]);
        assert_eq!(f.name, "f1");
        assert_eq!(f.duration, Some(Duration::from_millis(2500)));
        assert_eq!(f.count, None);
        assert_eq!(f.ack_log, Some(PathBuf::from("/tmp/acks")));
    }

    #[test]
    fn flood_duration_and_count_exclude_each_other() {
        let e = parse(&[
            "flood",
            "--node",
            "a:1",
            "--name",
            "f",
            "--duration",
            "1",
            "--count",
            "3",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        let e = parse(&["flood", "--name", "f"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        let e = parse(&["flood", "--node", "a:1", "--name", ""]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        let e = parse(&["flood", "--node", "a:1", "--name", "f", "--duration", "0"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn bench_defaults_its_prefix() {
        let cli = parse(&[
            "bench",
            "--node",
            "a:1",
            "--clients",
            "4",
            "--duration",
            "3",
            "--json",
        ])
        .unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("not bench")
        };
        assert_eq!((b.clients, b.json, b.prefix.as_str()), (4, true, "bench"));
        assert_eq!(b.duration, Duration::from_secs(3));
        let e = parse(&[
            "bench",
            "--node",
            "a:1",
            "--clients",
            "0",
            "--duration",
            "1",
        ]);
        assert_eq!(e.unwrap_err().kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn admin_commands_parse() {
        let cli = parse(&["status", "--server", "h:1", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs { json: true, .. })
        ));
        let cli = parse(&["shutdown", "--server", "h:1", "--no-save"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Shutdown(ShutdownArgs { no_save: true, .. })
        ));
        let cli = parse(&["remove", "--server", "p:1", "--secondary", "s:2"]).unwrap();
        assert!(
            matches!(cli.command, Command::Remove(RemoveArgs { ref secondary, .. }) if secondary == "s:2")
        );
        let cli = parse(&["backup", "--server", "h:1", "--to", "/b", "--detach"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Backup(BackupArgs { detach: true, .. })
        ));
        assert!(parse(&["backup", "--server", "h:1", "--to", "/b", "--detach", "--pull"]).is_err());
        for cmd in [
            "backup-status",
            "backup-abort",
            "backup-pause",
            "backup-resume",
        ] {
            parse(&[cmd, "--server", "h:1"]).unwrap();
        }
        parse(&["follow", "--server", "s:1", "--primary", "p:1"]).unwrap();
        parse(&["take-over", "--server", "s:1"]).unwrap();
        parse(&["verify-backup", "/b"]).unwrap();
        let cli = parse(&["compact", "--from", "/a", "--to", "/b", "--quiet"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Compact(CompactArgs { quiet: true, .. })
        ));
        parse(&["digest", "--server", "s:1"]).unwrap();
        let cli = parse(&["dump", "--server", "s:1", "--collection", "c"]).unwrap();
        assert!(
            matches!(cli.command, Command::Dump(DumpArgs { ref collection, .. }) if collection == "c")
        );
        assert_eq!(
            parse(&["status"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn help_documents_exit_codes_and_defaults() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes"), "{help}");
        let mut cmd = Cli::clap_command();
        let flood = cmd.find_subcommand_mut("flood").unwrap();
        let help = flood.render_long_help().to_string();
        assert!(help.contains("Exit codes"), "{help}");
        let mut cmd = Cli::command();
        let bench = cmd.find_subcommand_mut("bench").unwrap();
        let help = bench.render_long_help().to_string();
        assert!(help.contains("[default: bench]"), "{help}");
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_secs("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_secs("0.25").unwrap(), Duration::from_millis(250));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("x").is_err());
        assert!(parse_secs("inf").is_err());
    }
}
