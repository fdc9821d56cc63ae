//! The admin commands that change a server: shutdown, backup jobs, follow,
//! take-over, remove; and the offline verify-backup (compact has its own
//! module).
//!
//! Each command opens one admin session on the server named and sends one
//! request (backup without --detach then polls the job). This module must
//! never fail over, never retry a request the server refused, and never
//! pretend: a feature the server does not offer comes back as the server's
//! own `unavailable` error.
//! `verify-backup` reads the backup directory only, through
//! `storage::backup::verify`, never a server.

use std::path::Path;
use std::thread;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::error::CliError;
use crate::cli::status::{backup_line, backup_state_name};
use crate::client::AdminSession;
use crate::protocol::{BackupReport, BackupState};
use crate::storage::backup::{describe_problems, verify, Verified};

/// How often a followed backup job is polled.
const BACKUP_POLL: Duration = Duration::from_millis(200);

fn admin(server: &str) -> Result<AdminSession, CliError> {
    AdminSession::connect(server).map_err(CliError::at(server))
}

/// Stop `server`, saving first when `save`, and wait at most `wait` until
/// it has stopped.
pub fn shutdown(server: &str, save: bool, wait: Duration) -> Result<(), CliError> {
    let stopped = admin(server)?
        .shutdown_and_wait(save, wait)
        .map_err(CliError::at(server))?;
    if stopped {
        Ok(())
    } else {
        Err(CliError::StillRunning(format!(
            "{server} began to shut down but had not stopped after {} s; \
             its log says how far it got",
            wait.as_secs()
        )))
    }
}

/// A progress bar for `total` bytes on stderr (drawn only on a terminal):
/// bytes, rate, ETA and the current file.
pub(crate) fn byte_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Start a backup of `server` into `to` (on the server's machine), at most
/// `rate` bytes/s. With `follow`, poll it until it ends, drawing a progress
/// bar on a terminal; an aborted or failed job is an error.
pub fn backup(
    server: &str,
    to: &str,
    rate: Option<u64>,
    follow: bool,
) -> Result<BackupReport, CliError> {
    let mut session = admin(server)?;
    let report = session
        .backup_with_rate(to, rate)
        .map_err(CliError::at(server))?;
    if !follow {
        return Ok(report);
    }
    let bar = byte_bar(report.bytes_total);
    let mut report = report;
    loop {
        bar.set_length(report.bytes_total);
        bar.set_position(report.bytes_done);
        let file = report.current_file.clone().unwrap_or_default();
        bar.set_message(match report.state {
            BackupState::Paused => format!("paused at {file}"),
            _ => file,
        });
        match report.state {
            BackupState::Running | BackupState::Paused => {}
            BackupState::Completed => {
                bar.finish_and_clear();
                return Ok(report);
            }
            BackupState::Aborted | BackupState::Failed => {
                bar.abandon();
                return Err(CliError::Backup(format!(
                    "backup of {server} {}: {}",
                    backup_state_name(report.state),
                    backup_line(&report)
                )));
            }
        }
        thread::sleep(BACKUP_POLL);
        report = session.backup_status().map_err(CliError::at(server))?;
        // Another job may have replaced ours (ours ended and was followed
        // by a new one, which may have ended too): report on ours only.
        if report.target != to {
            return Err(CliError::Backup(format!(
                "the backup to {to} is no longer the job on {server} (now: {})",
                backup_line(&report)
            )));
        }
    }
}

pub fn backup_status(server: &str) -> Result<BackupReport, CliError> {
    admin(server)?.backup_status().map_err(CliError::at(server))
}

pub fn backup_abort(server: &str) -> Result<BackupReport, CliError> {
    admin(server)?.backup_abort().map_err(CliError::at(server))
}

pub fn backup_pause(server: &str) -> Result<BackupReport, CliError> {
    admin(server)?.backup_pause().map_err(CliError::at(server))
}

pub fn backup_resume(server: &str) -> Result<BackupReport, CliError> {
    admin(server)?.backup_resume().map_err(CliError::at(server))
}

/// Check the backup in `dir` (see `magma verify-backup --help`).
pub fn verify_backup(dir: &Path) -> Result<Verified, CliError> {
    verify(dir).map_err(|problems| CliError::InvalidBackup(describe_problems(dir, &problems)))
}

/// Make `server` a warm backup of `primary`.
pub fn follow(server: &str, primary: &str) -> Result<(), CliError> {
    admin(server)?.follow(primary).map_err(CliError::at(server))
}

/// Ask the secondary `server` to take over as primary.
pub fn take_over(server: &str) -> Result<(), CliError> {
    admin(server)?.take_over().map_err(CliError::at(server))
}

/// Ask the primary `server` to remove `secondary` from the node.
pub fn remove(server: &str, secondary: &str) -> Result<(), CliError> {
    admin(server)?
        .remove_secondary(secondary)
        .map_err(CliError::at(server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_commands_name_the_unreachable_server() {
        let e = take_over("127.0.0.1:1").unwrap_err();
        assert_eq!(e.kind(), "network");
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    }
}
