//! `magma status` (and the backup-job report `backup-status` shares): the
//! human table and the `--json` document of a server's `StatusReport`.
//!
//! This module owns both renderings; the JSON field names are an interface
//! scripts rely on (DESIGN.md), so fields are only ever added. It asks
//! exactly one server, through an admin session, and never fails over.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::cli::error::CliError;
use crate::client::AdminSession;
use crate::protocol::{BackupReport, BackupState, ServerRole, StatusReport};

/// Ask `server` for its status.
pub fn fetch(server: &str) -> Result<StatusReport, CliError> {
    let mut admin = AdminSession::connect(server).map_err(CliError::at(server))?;
    admin.status().map_err(CliError::at(server))
}

/// The name of a role in output (`catching-up` with a hyphen).
pub fn role_name(role: ServerRole) -> &'static str {
    match role {
        ServerRole::Primary => "primary",
        ServerRole::Secondary => "secondary",
        ServerRole::CatchingUp => "catching-up",
        ServerRole::Restore => "restore",
        ServerRole::Witness => "witness",
        ServerRole::Deposed => "deposed",
    }
}

pub fn backup_state_name(state: BackupState) -> &'static str {
    state.name()
}

/// The `status --json` document. `epoch` is the string
/// `"<term>.<server id in hex>"`; `epoch_term` and `epoch_server` are its
/// parts as numbers (compare epochs by term, then server). Server ids are
/// random 64-bit numbers, which jq and JavaScript round: `server_id_hex`
/// and `epoch_server_hex` are exact. A member's figures the answering
/// server does not know are null.
pub fn to_json(r: &StatusReport) -> Value {
    let members: Vec<Value> = r
        .members
        .iter()
        .map(|m| {
            let figure = |n: u64| if m.known { json!(n) } else { Value::Null };
            json!({
                "addr": m.addr,
                "role": role_name(m.role),
                "commit": figure(m.commit),
                "durable": figure(m.durable),
                "lag_commits": figure(m.lag_commits),
                "lag_ms": figure(m.lag_ms),
            })
        })
        .collect();
    json!({
        "role": role_name(r.role),
        "commit": r.commit,
        "epoch": r.epoch.to_string(),
        "epoch_term": r.epoch.term,
        "epoch_server": r.epoch.server,
        "epoch_server_hex": format!("{:x}", r.epoch.server),
        "repository": r.repository,
        "server_id": r.server_id,
        "server_id_hex": format!("{:x}", r.server_id),
        "addr": r.addr,
        "partition_safe": r.partition_safe,
        "flush": r.flush,
        "sync_replicas": r.sync_replicas,
        "members": members,
        "backup": r.backup.as_ref().map(backup_json),
    })
}

/// A backup job as JSON (`backup` in status, and `backup-status --json`).
pub fn backup_json(b: &BackupReport) -> Value {
    json!({
        "state": backup_state_name(b.state),
        "target": b.target,
        "snapshot_commit": b.snapshot_commit,
        "current_file": b.current_file,
        "bytes_done": b.bytes_done,
        "bytes_total": b.bytes_total,
        "files_done": b.files_done,
        "files_total": b.files_total,
        "started_unix_ms": b.started_unix_ms,
        "elapsed_ms": b.elapsed_ms,
        "error": b.error,
    })
}

/// The human table.
pub fn to_table(r: &StatusReport) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<15}{v}");
    };
    line("server", format!("{} (id {:x})", r.addr, r.server_id));
    line("role", role_name(r.role).to_string());
    line("commit", r.commit.to_string());
    line("epoch", r.epoch.to_string());
    line("repository", r.repository.clone());
    line(
        "partition-safe",
        if r.partition_safe {
            "yes".to_string()
        } else {
            "no (failover follows the ping rule; add a witness)".to_string()
        },
    );
    line(
        "flush",
        format!("{}, sync-replicas {}", r.flush, r.sync_replicas),
    );
    line(
        "backup",
        r.backup
            .as_ref()
            .map_or_else(|| "none".to_string(), backup_line),
    );
    s.push_str("members\n");
    s.push_str(&members_table(r));
    s
}

fn members_table(r: &StatusReport) -> String {
    let header = ["ADDR", "ROLE", "COMMIT", "DURABLE", "LAG_COMMITS", "LAG_MS"];
    let rows: Vec<[String; 6]> = r
        .members
        .iter()
        .map(|m| {
            let figure = |n: u64| if m.known { n.to_string() } else { "-".into() };
            [
                m.addr.clone(),
                role_name(m.role).to_string(),
                figure(m.commit),
                figure(m.durable),
                figure(m.lag_commits),
                figure(m.lag_ms),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut push = |cells: [&str; 6]| {
        out.push(' ');
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Names to the left, numbers to the right.
            if i < 2 {
                let _ = write!(out, " {cell:<w$}");
            } else {
                let _ = write!(out, "  {cell:>w$}");
            }
            if i == 0 {
                out.push(' ');
            }
        }
        out.push('\n');
    };
    push(header);
    for row in &rows {
        push(row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("  (none known)\n");
    }
    out
}

/// One line describing a backup job.
pub fn backup_line(b: &BackupReport) -> String {
    let mut s = format!(
        "{} to {} (snapshot commit {}): {} of {}",
        backup_state_name(b.state),
        b.target,
        b.snapshot_commit,
        bytes(b.bytes_done),
        bytes(b.bytes_total),
    );
    if b.bytes_total > 0 {
        let pct = b.bytes_done as f64 * 100.0 / b.bytes_total as f64;
        let _ = write!(s, " ({pct:.0}%)");
    }
    let _ = write!(
        s,
        ", files {}/{}, {:.1} s",
        b.files_done,
        b.files_total,
        b.elapsed_ms as f64 / 1000.0
    );
    if let (Some(f), false) = (&b.current_file, b.state.is_final()) {
        let _ = write!(s, ", copying {f}");
    }
    if let Some(e) = &b.error {
        let _ = write!(s, ", error: {e}");
    }
    s
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MemberStatus, WireError};
    use crate::types::Epoch;

    fn report() -> StatusReport {
        StatusReport {
            role: ServerRole::Primary,
            commit: 1234,
            epoch: Epoch {
                term: 3,
                server: 0x1f,
            },
            repository: "9f0c00000000000000000000000000e1".into(),
            server_id: 0x1f,
            addr: "127.0.0.1:20001".into(),
            partition_safe: false,
            members: vec![
                MemberStatus {
                    addr: "127.0.0.1:20001".into(),
                    role: ServerRole::Primary,
                    commit: 1234,
                    durable: 1234,
                    lag_commits: 0,
                    lag_ms: 0,
                    known: true,
                },
                MemberStatus {
                    addr: "127.0.0.1:20002".into(),
                    role: ServerRole::CatchingUp,
                    commit: 1200,
                    durable: 1100,
                    lag_commits: 34,
                    lag_ms: 120,
                    known: true,
                },
            ],
            backup: None,
            flush: "group".into(),
            sync_replicas: 1,
        }
    }

    fn backup() -> BackupReport {
        BackupReport {
            state: BackupState::Running,
            target: "/backups/b1".into(),
            snapshot_commit: 1200,
            current_file: Some("data/objects.0".into()),
            bytes_done: 3 * 1024 * 1024,
            bytes_total: 12 * 1024 * 1024,
            files_done: 2,
            files_total: 5,
            started_unix_ms: 1_700_000_000_000,
            elapsed_ms: 2500,
            error: None,
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let j = to_json(&report());
        assert_eq!(j["role"], "primary");
        assert_eq!(j["commit"], 1234);
        assert_eq!(j["epoch"], "3.1f");
        assert_eq!(j["epoch_term"], 3);
        assert_eq!(j["epoch_server"], 31);
        assert_eq!(j["repository"], "9f0c00000000000000000000000000e1");
        assert_eq!(j["partition_safe"], false);
        assert_eq!(j["backup"], Value::Null);
        let m = &j["members"][1];
        assert_eq!(m["addr"], "127.0.0.1:20002");
        assert_eq!(m["role"], "catching-up");
        assert_eq!(m["commit"], 1200);
        assert_eq!(m["durable"], 1100);
        assert_eq!(m["lag_commits"], 34);
        assert_eq!(m["lag_ms"], 120);
        assert_eq!(j["members"].as_array().unwrap().len(), 2);
        assert_eq!(j["server_id_hex"], "1f");
        assert_eq!(j["epoch_server_hex"], "1f");
    }

    #[test]
    fn figures_the_server_does_not_know_are_null_and_dashes() {
        let mut r = report();
        r.members[1].known = false;
        let m = &to_json(&r)["members"][1];
        for k in ["commit", "durable", "lag_commits", "lag_ms"] {
            assert_eq!(m[k], Value::Null, "{k}");
        }
        let t = members_table(&r);
        let row = t.lines().nth(2).unwrap();
        assert!(
            row.contains("catching-up") && row.trim_end().ends_with('-'),
            "{t}"
        );
        assert_eq!(row.matches(" -").count(), 4, "{t}");
    }

    #[test]
    fn json_backup_is_the_job_state() {
        let mut r = report();
        r.backup = Some(backup());
        let b = &to_json(&r)["backup"];
        assert_eq!(b["state"], "running");
        assert_eq!(b["current_file"], "data/objects.0");
        assert_eq!(b["bytes_done"], 3 * 1024 * 1024);
        assert_eq!(b["bytes_total"], 12 * 1024 * 1024);
        assert_eq!(b["error"], Value::Null);
    }

    #[test]
    fn role_names_match_the_wire_names() {
        for role in [
            ServerRole::Primary,
            ServerRole::Secondary,
            ServerRole::CatchingUp,
            ServerRole::Restore,
            ServerRole::Witness,
            ServerRole::Deposed,
        ] {
            assert_eq!(serde_json::to_value(role).unwrap(), role_name(role));
        }
    }

    #[test]
    fn table_lists_members_aligned() {
        let t = to_table(&report());
        assert!(t.contains("role           primary\n"), "{t}");
        assert!(t.contains("epoch          3.1f\n"), "{t}");
        assert!(t.contains("backup         none\n"), "{t}");
        let lines: Vec<&str> = t.lines().skip_while(|l| *l != "members").collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].contains("ADDR") && lines[1].contains("LAG_MS"));
        assert!(lines[1].contains("COMMIT  DURABLE"), "{t}");
        assert!(lines[3].contains(" 1200     1100 "), "{t}");
        assert!(lines[3].contains("catching-up") && lines[3].trim_end().ends_with("120"));
        assert_eq!(lines[2].len(), lines[3].len(), "{t}");
    }

    #[test]
    fn backup_line_shows_progress() {
        let l = backup_line(&backup());
        assert!(l.starts_with("running to /backups/b1"), "{l}");
        assert!(l.contains("3.0 MiB of 12.0 MiB (25%)"), "{l}");
        assert!(l.contains("copying data/objects.0"), "{l}");
        assert_eq!(bytes(10), "10 B");
        // A job that ended copies nothing any more.
        let ended = BackupReport {
            state: BackupState::Completed,
            ..backup()
        };
        let l = backup_line(&ended);
        assert!(l.starts_with("completed") && !l.contains("copying"), "{l}");
    }

    #[test]
    fn a_wrong_server_error_names_the_primary_plainly() {
        let named = WireError::WrongServer {
            primary: Some("db1:51969".into()),
        };
        assert_eq!(named.to_string(), "wrong server; the primary is db1:51969");
        let unknown = WireError::WrongServer { primary: None };
        assert_eq!(unknown.to_string(), "wrong server; the primary is unknown");
    }
}
