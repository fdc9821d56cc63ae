//! [`run`]: carry out one parsed command and write its output.
//!
//! This module owns what each command prints on stdout (JSON documents on
//! one line). It never prints errors and never exits: failures come back as
//! a [`CliError`] for the binary to report, after whatever output the
//! command owes even when failing (flood's summary line).

use std::io::Write;
use std::time::Duration;

use crate::cli::admin;
use crate::cli::args::{Cli, Command};
use crate::cli::bench::{self, BenchEngine, BenchOptions};
use crate::cli::compact;
use crate::cli::error::CliError;
use crate::cli::flood::{self, FloodLimit, FloodOptions};
use crate::cli::inspect;
use crate::cli::status;
use crate::client::SessionOptions;
use crate::pull::{self, PullOptions};

/// Run `cli`, writing its output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let mut say = |line: &str| writeln!(out, "{line}").map_err(CliError::Output);
    match cli.command {
        Command::Status(a) => {
            let report = status::fetch(&a.server)?;
            if a.json {
                say(&status::to_json(&report).to_string())
            } else {
                say(status::to_table(&report).trim_end())
            }
        }
        Command::Backup(a) => {
            if a.pull {
                let opts = PullOptions {
                    server: a.server.clone(),
                    to: a.to.into(),
                    rate: a.rate,
                    progress: admin::byte_bar(0),
                };
                let summary = pull::run(&opts)?;
                return say(&summary.to_string());
            }
            let report = admin::backup(&a.server, &a.to, a.rate, !a.detach)?;
            let what = if a.detach { "started" } else { "finished" };
            say(&format!(
                "backup of {} {what}: {}",
                a.server,
                status::backup_line(&report)
            ))
        }
        Command::BackupStatus(a) => {
            let report = admin::backup_status(&a.server)?;
            if a.json {
                say(&status::backup_json(&report).to_string())
            } else {
                say(&status::backup_line(&report))
            }
        }
        Command::BackupAbort(a) => {
            let report = admin::backup_abort(&a.server)?;
            say(&format!(
                "backup on {}: {}",
                a.server,
                status::backup_line(&report)
            ))
        }
        Command::BackupPause(a) => {
            let report = admin::backup_pause(&a.server)?;
            say(&format!(
                "backup on {}: {}",
                a.server,
                status::backup_line(&report)
            ))
        }
        Command::BackupResume(a) => {
            let report = admin::backup_resume(&a.server)?;
            say(&format!(
                "backup on {}: {}",
                a.server,
                status::backup_line(&report)
            ))
        }
        Command::VerifyBackup(a) => {
            let v = admin::verify_backup(&a.dir)?;
            say(&format!(
                "{}: valid backup of repository {} at commit {} ({} files, {} bytes, from {})",
                a.dir.display(),
                v.repository_id,
                v.snapshot_commit,
                v.files,
                v.bytes,
                v.source
            ))
        }
        Command::Follow(a) => {
            admin::follow(&a.server, &a.primary)?;
            say(&format!("{} now follows {}", a.server, a.primary))
        }
        Command::TakeOver(a) => {
            admin::take_over(&a.server)?;
            say(&format!("{} took over as primary", a.server))
        }
        Command::Remove(a) => {
            admin::remove(&a.server, &a.secondary)?;
            say(&format!(
                "{} removed {} from the node",
                a.server, a.secondary
            ))
        }
        Command::Shutdown(a) => {
            admin::shutdown(&a.server, !a.no_save, Duration::from_secs(a.wait_secs))?;
            let how = if a.no_save {
                "without saving"
            } else {
                "after saving"
            };
            say(&format!("{} stopped, {how}", a.server))
        }
        Command::Compact(a) => {
            let summary = compact::run(&a.from, &a.to, a.quiet)?;
            say(&summary.to_string())
        }
        Command::Flood(a) => {
            let limit = match (a.duration, a.count) {
                (Some(d), _) => FloodLimit::Duration(d),
                (None, Some(n)) => FloodLimit::Count(n),
                (None, None) => FloodLimit::Unlimited,
            };
            let opts = FloodOptions {
                node: a.node,
                name: a.name,
                limit,
                ack_log: a.ack_log,
                session: SessionOptions::default(),
            };
            match flood::run_until(&opts, flood::stop_on_signals()) {
                Ok(summary) => say(&summary.to_string()),
                Err(failure) => {
                    // The summary is owed even on failure; the error wins.
                    let _ = say(&failure.summary.to_string());
                    Err(failure.error)
                }
            }
        }
        Command::Bench(a) => {
            let opts = BenchOptions {
                node: a.node,
                engine: if a.threads {
                    BenchEngine::Threads
                } else {
                    BenchEngine::EventLoop
                },
                clients: a.clients,
                duration: a.duration,
                prefix: a.prefix,
                session: SessionOptions::default(),
            };
            let report = bench::run(&opts)?;
            if a.json {
                say(&report.to_json().to_string())
            } else {
                say(&report.to_text())
            }
        }
        Command::Digest(a) => {
            let (commit, digest) = inspect::digest(&a.server)?;
            say(&format!("{commit} {digest}"))
        }
        Command::Dump(a) => {
            inspect::for_each_element(&a.server, &a.collection, |v| {
                say(&inspect::render_element(v))
            })?;
            Ok(())
        }
    }
}
