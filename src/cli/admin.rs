//! The admin commands that change a server: shutdown, backup jobs, follow,
//! take-over, remove; and the offline tools (verify-backup, compact).
//!
//! Each command opens one admin session on the server named and sends one
//! request (backup without --detach then polls the job). This module must
//! never fail over, never retry a request the server refused, and never
//! pretend: a feature the server does not offer comes back as the server's
//! own `unavailable` error, and the offline tools, which do not exist in
//! this release, say so.

use std::thread;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::error::CliError;
use crate::cli::status::{backup_line, backup_state_name};
use crate::client::AdminSession;
use crate::protocol::{BackupReport, BackupState};

/// How often a followed backup job is polled.
const BACKUP_POLL: Duration = Duration::from_millis(250);

fn admin(server: &str) -> Result<AdminSession, CliError> {
    AdminSession::connect(server).map_err(CliError::at(server))
}

/// Stop `server`, saving first when `save`.
pub fn shutdown(server: &str, save: bool) -> Result<(), CliError> {
    admin(server)?.shutdown(save).map_err(CliError::at(server))
}

/// Start a backup of `server` into `to` (on the server's machine). With
/// `follow`, poll it until it ends, drawing a progress bar on a terminal;
/// an aborted or failed job is an error.
pub fn backup(server: &str, to: &str, follow: bool) -> Result<BackupReport, CliError> {
    let mut session = admin(server)?;
    let report = session.backup(to).map_err(CliError::at(server))?;
    if !follow {
        return Ok(report);
    }
    let bar = ProgressBar::new(report.bytes_total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    let mut report = report;
    loop {
        bar.set_length(report.bytes_total);
        bar.set_position(report.bytes_done);
        bar.set_message(report.current_file.clone().unwrap_or_default());
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
    }
}

pub fn backup_status(server: &str) -> Result<BackupReport, CliError> {
    admin(server)?.backup_status().map_err(CliError::at(server))
}

pub fn backup_abort(server: &str) -> Result<(), CliError> {
    admin(server)?.backup_abort().map_err(CliError::at(server))
}

pub fn backup_pause(server: &str) -> Result<(), CliError> {
    admin(server)?.backup_pause().map_err(CliError::at(server))
}

pub fn backup_resume(server: &str) -> Result<(), CliError> {
    admin(server)?.backup_resume().map_err(CliError::at(server))
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

/// The error of an offline tool that this release does not have.
pub fn not_in_this_release(command: &str) -> CliError {
    CliError::Unavailable(format!("{command} arrives with the backup release"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::error::EXIT_USAGE;

    #[test]
    fn offline_tools_are_unavailable_with_exit_2() {
        let e = not_in_this_release("compact");
        assert_eq!(e.kind(), "unavailable");
        assert_eq!(e.exit_code(), EXIT_USAGE);
        assert_eq!(e.to_string(), "compact arrives with the backup release");
    }

    #[test]
    fn admin_commands_name_the_unreachable_server() {
        let e = take_over("127.0.0.1:1").unwrap_err();
        assert_eq!(e.kind(), "network");
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    }
}
