//! Full online backups with real processes: taken under flooding clients,
//! steered (abort, pause, resume), refused with clear errors, pulled over
//! the network and resumed after the client was killed, and started as a
//! server of their own.
//!
//! Every backup here is slowed down with `--backup-rate` (or the request's
//! rate) on a repository of about a megabyte, so that the copy lasts a few
//! seconds and commits, pauses and kills really happen during it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use magma::client::{ClientError, ConnectOptions, Connection, Session};
use magma::protocol::{
    BackupReport, BackupState, CommitBody, RequestBody, ServerRole, SessionRole, WireError,
};
use magma::storage::backup::{Manifest, INCOMPLETE_FILE, MANIFEST_FILE};

use crate::harness::{digest, dump, verify_flood, wait_or_kill, wait_until, Cluster, Flood, CLI};
use crate::phase;

/// Bytes of incompressible-looking blobs loaded before each backup.
const BLOB_BYTES: usize = 128 * 1024;
const BLOBS: usize = 8;

/// What one `magma` invocation printed.
struct CliRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "magma failed ({}): {}{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Start `magma ARGS` with its output going to files under `dir`.
fn spawn_cli(dir: &Path, tag: &str, args: &[&str]) -> (Child, PathBuf, PathBuf) {
    let out = dir.join(format!("{tag}.out"));
    let err = dir.join(format!("{tag}.err"));
    let child = Command::new(CLI)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(File::create(&out).unwrap()))
        .stderr(Stdio::from(File::create(&err).unwrap()))
        .spawn()
        .unwrap_or_else(|e| panic!("harness: cannot spawn {CLI}: {e}"));
    (child, out, err)
}

/// Run `magma ARGS` to completion (bounded).
fn magma(dir: &Path, tag: &str, args: &[&str]) -> CliRun {
    let (child, out, err) = spawn_cli(dir, tag, args);
    let status = wait_or_kill(child, Duration::from_secs(120), &format!("magma {args:?}"));
    CliRun {
        status,
        stdout: fs::read_to_string(out).unwrap_or_default(),
        stderr: fs::read_to_string(err).unwrap_or_default(),
    }
}

/// `magma backup --detach` at `rate` bytes/s into `to` (output files
/// tagged `tag`); must be accepted.
fn start_detached_backup(root: &Path, tag: &str, addr: &str, to: &str, rate: u64) {
    let rate = rate.to_string();
    magma(
        root,
        tag,
        &[
            "backup", "--server", addr, "--to", to, "--detach", "--rate", &rate,
        ],
    )
    .ok();
}

/// Wait (60 s) for the running backup to complete, every byte copied; it
/// must stay running until then.
fn wait_completed(addr: &str) -> BackupReport {
    let done = wait_until(Duration::from_secs(60), "the backup to complete", || {
        let r = report(addr);
        assert!(
            matches!(r.state, BackupState::Running | BackupState::Completed),
            "{r:?}"
        );
        (r.state == BackupState::Completed).then_some(r)
    });
    assert_eq!(done.bytes_done, done.bytes_total);
    done
}

fn report(addr: &str) -> BackupReport {
    magma::client::AdminSession::connect(addr)
        .and_then(|mut a| a.backup_status())
        .unwrap_or_else(|e| panic!("backup_status of {addr}: {e}"))
}

/// Commit `BLOBS` large objects so the repository holds about a megabyte.
fn load_blobs(addr: &str) {
    let mut s = Session::connect(&[addr]).unwrap();
    for i in 0..BLOBS {
        let text: String = (0..BLOB_BYTES)
            .map(|j| char::from(b'a' + ((i * 31 + j * 7) % 26) as u8))
            .collect();
        s.commit(|tx| {
            tx.create("Blob", &text);
        })
        .unwrap();
    }
}

/// A commit sent on a plain application connection: its refusal, if any.
fn try_commit(addr: &str) -> Result<(), ClientError> {
    let mut c = Connection::connect(addr, SessionRole::Application, &ConnectOptions::default())?;
    let body = CommitBody {
        meta: vec![("probe".into(), Some(rmpv::Value::from(1)))],
        ..CommitBody::default()
    };
    c.call(RequestBody::Commit(body)).map(|_| ())
}

/// A server started on a backup whose primary is gone cannot take commits:
/// in restore mode it answers `restore_mode`; a build that makes backups
/// follow their node's primary answers `wrong_server` while it tries to.
fn assert_refuses_commits(addr: &str, role: ServerRole) {
    match (role, try_commit(addr)) {
        (ServerRole::Restore, Err(ClientError::Server(WireError::RestoreMode))) => {}
        (ServerRole::CatchingUp, Err(ClientError::Server(WireError::WrongServer { .. }))) => {}
        (role, other) => {
            panic!("a server on a backup (role {role:?}) answered a commit with {other:?}")
        }
    }
}

fn hello_role(addr: &str) -> ServerRole {
    magma::client::AdminSession::connect(addr)
        .unwrap()
        .hello()
        .role
}

fn snapshot_commit(dir: &Path) -> u64 {
    Manifest::read(dir).unwrap().snapshot_commit
}

fn acked_total(floods: &[Flood]) -> usize {
    floods.iter().map(|f| f.acked().len()).sum()
}

#[test]
fn t20_backup_under_flood_is_the_acknowledged_prefix_at_its_commit() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &["--backup-rate", "250000"]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let root = c.root.path().to_path_buf();
    load_blobs(&addr);

    phase!("two flooding clients; wait until both are acknowledged");
    let names = ["f1", "f2"];
    let mut floods: Vec<Flood> = names
        .iter()
        .map(|n| Flood::start(&root, &[addr.as_str()], n, &["--duration", "12"]))
        .collect();
    wait_until(Duration::from_secs(30), "both floods acknowledged", || {
        floods.iter().all(|f| f.acked().len() >= 20).then_some(())
    });
    let before: Vec<u64> = floods
        .iter()
        .map(|f| f.acked().into_iter().max().unwrap_or(0))
        .collect();

    phase!("backup --detach; count the acks while the job runs");
    let target = root.join("b1");
    let to = target.to_str().unwrap();
    let started = magma(
        &root,
        "backup",
        &["backup", "--server", &addr, "--to", to, "--detach"],
    );
    assert!(
        started.ok().stdout.contains("started"),
        "{}",
        started.stdout
    );
    let mut while_running: Option<(usize, usize)> = None;
    let last = wait_until(Duration::from_secs(60), "the backup to complete", || {
        let r = report(&addr);
        let acks = acked_total(&floods);
        match r.state {
            BackupState::Running => {
                let span = while_running.get_or_insert((acks, acks));
                span.1 = acks;
                None
            }
            BackupState::Completed => Some(r),
            other => panic!("backup ended {other:?}: {r:?}"),
        }
    });
    let (first, latest) = while_running.expect("the job was seen running");
    let during = latest - first;
    eprintln!(
        "backup: commit {}, {} bytes in {} ms; {during} commits acknowledged while it ran",
        last.snapshot_commit, last.bytes_done, last.elapsed_ms
    );
    assert!(
        during > 0,
        "no commit was acknowledged while the backup ran"
    );
    assert_eq!(last.bytes_done, last.bytes_total);
    assert!(last.bytes_total > (BLOBS * BLOB_BYTES) as u64);

    phase!("verify-backup passes");
    let v = magma(&root, "verify", &["verify-backup", to]);
    assert!(v.ok().stdout.contains("valid backup"), "{}", v.stdout);
    assert_eq!(snapshot_commit(&target), last.snapshot_commit);

    phase!("floods finish; nothing acknowledged is missing on the primary");
    for f in &mut floods {
        let end = f.wait(Duration::from_secs(60));
        assert!(end.status.success(), "flood {}: {}", f.name, end.stderr);
    }
    for (f, n) in floods.iter().zip(names) {
        verify_flood(&dump(&addr, n), n, &f.acked(), 0);
    }

    phase!("stop the primary; a server on the backup holds exactly the snapshot");
    assert!(c.servers[s].terminate().success());
    let b = c.add_server("b1-server", &[]);
    c.servers[b].dir = target.clone();
    c.servers[b].start();
    let baddr = c.servers[b].addr.clone();
    let role = hello_role(&baddr);
    assert_refuses_commits(&baddr, role);
    let line = digest(&baddr);
    assert_eq!(
        line.split(' ').next().unwrap(),
        last.snapshot_commit.to_string(),
        "digest of the backup server: {line}"
    );
    for ((f, n), acked_before) in floods.iter().zip(names).zip(before) {
        let elements = dump(&baddr, n);
        let k = elements.len() as u64;
        let prefix: Vec<u64> = f.acked().into_iter().filter(|&q| q <= k).collect();
        verify_flood(&elements, n, &prefix, 1);
        assert!(
            k >= acked_before,
            "{n}: the backup holds {k} elements, but {acked_before} were acknowledged before it started"
        );
    }
    if role == ServerRole::Restore {
        let status = magma(&root, "status", &["status", "--server", &baddr, "--json"]);
        assert!(
            status.ok().stdout.contains("\"role\":\"restore\""),
            "{}",
            status.stdout
        );
    }
}

#[test]
fn t20_refusals_and_abort_leave_the_target_unmistakably_incomplete() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &[]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let root = c.root.path().to_path_buf();
    load_blobs(&addr);

    phase!("a slow backup (rate from the request)");
    let target = root.join("slow");
    let to = target.to_str().unwrap();
    start_detached_backup(&root, "start", &addr, to, 100000);
    wait_until(Duration::from_secs(30), "the backup copying", || {
        let r = report(&addr);
        (r.state == BackupState::Running && r.bytes_done > 0).then_some(())
    });

    phase!("each refusal names its reason");
    let refused = |tag: &str, to: &str, why: &str| {
        let r = magma(
            &root,
            tag,
            &["backup", "--server", &addr, "--to", to, "--detach"],
        );
        assert_eq!(r.status.code(), Some(1), "{tag}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.starts_with("error: backup: "),
            "{tag}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains(why),
            "{tag}: expected {why:?} in {}",
            r.stderr
        );
    };
    let other = root.join("other");
    refused("second", other.to_str().unwrap(), "already running");
    assert!(!other.exists(), "a refused backup created its target");
    assert_eq!(report(&addr).target, to, "the running job was disturbed");
    // The rest are refused for the target alone; stop the job first.
    let aborted = magma(&root, "abort", &["backup-abort", "--server", &addr]);
    assert!(
        aborted.ok().stdout.contains("aborted"),
        "{}",
        aborted.stdout
    );
    fs::create_dir(root.join("exists")).unwrap();
    refused(
        "exists",
        root.join("exists").to_str().unwrap(),
        "already exists",
    );
    let live = c.servers[s].dir.clone();
    refused("live", live.to_str().unwrap(), "live repository");
    refused(
        "inside-live",
        live.join("b").to_str().unwrap(),
        "live repository",
    );
    fs::write(root.join("a-file"), b"not a directory").unwrap();
    refused(
        "under-file",
        root.join("a-file/sub").to_str().unwrap(),
        "not a directory",
    );
    refused("relative", "relative/dir", "absolute");

    phase!("backup requests on an application session are refused");
    let mut app =
        Connection::connect(&addr, SessionRole::Application, &ConnectOptions::default()).unwrap();
    for body in [
        RequestBody::Backup {
            to: root.join("app").display().to_string(),
            rate: None,
        },
        RequestBody::BackupStatus,
        RequestBody::BackupPullStart {
            rate: None,
            to: None,
        },
    ] {
        match app.call(body) {
            Err(ClientError::Server(WireError::NotAdmin)) => {}
            other => panic!("an application session's backup request got {other:?}"),
        }
    }

    phase!("the aborted target has no manifest and says why");
    let r = report(&addr);
    assert_eq!(r.state, BackupState::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("aborted"),
        "{r:?}"
    );
    assert!(r.bytes_done < r.bytes_total, "{r:?}");
    assert!(!target.join(MANIFEST_FILE).exists());
    let marker = fs::read_to_string(target.join(INCOMPLETE_FILE)).unwrap();
    assert!(marker.contains("aborted by an operator"), "{marker}");
    let v = magma(&root, "verify", &["verify-backup", to]);
    assert_eq!(v.status.code(), Some(1), "{}{}", v.stdout, v.stderr);
    assert!(
        v.stderr.starts_with("error: invalid_backup: "),
        "{}",
        v.stderr
    );
    assert!(v.stderr.contains("incomplete"), "{}", v.stderr);
    assert!(v.stderr.contains("aborted by an operator"), "{}", v.stderr);
    let abort_again = magma(&root, "abort2", &["backup-abort", "--server", &addr]);
    assert!(
        abort_again.stderr.contains("no backup is running"),
        "{}",
        abort_again.stderr
    );

    phase!("the server is unharmed: a new backup completes and verifies");
    let fresh = root.join("fresh");
    magma(
        &root,
        "fresh",
        &["backup", "--server", &addr, "--to", fresh.to_str().unwrap()],
    )
    .ok();
    magma(
        &root,
        "verify-fresh",
        &["verify-backup", fresh.to_str().unwrap()],
    )
    .ok();

    phase!("a shutdown aborts a running backup, leaving it marked incomplete");
    let cut = root.join("cut-by-shutdown");
    let cut_to = cut.to_str().unwrap();
    start_detached_backup(&root, "cut", &addr, cut_to, 50000);
    wait_until(Duration::from_secs(30), "the backup copying", || {
        (report(&addr).bytes_done > 0).then_some(())
    });
    c.servers[s].admin().shutdown(true).unwrap();
    assert!(c.servers[s].wait_exit(Duration::from_secs(30)).success());
    assert!(!cut.join(MANIFEST_FILE).exists());
    let marker = fs::read_to_string(cut.join(INCOMPLETE_FILE)).unwrap();
    assert!(marker.contains("the server shut down"), "{marker}");
}

#[test]
fn t20_pause_stops_progress_and_resume_completes_a_backup_equal_to_the_primary() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &["--backup-rate", "300000"]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let root = c.root.path().to_path_buf();
    load_blobs(&addr);
    let mut flood = Flood::start(&root, &[addr.as_str()], "g", &["--count", "300"]);
    assert!(flood.wait(Duration::from_secs(60)).status.success());
    let primary_digest = digest(&addr);

    phase!("start, then pause while copying");
    let target = root.join("b");
    let to = target.to_str().unwrap();
    magma(
        &root,
        "start",
        &["backup", "--server", &addr, "--to", to, "--detach"],
    )
    .ok();
    wait_until(Duration::from_secs(30), "the backup copying", || {
        (report(&addr).bytes_done > 0).then_some(())
    });
    let paused = magma(&root, "pause", &["backup-pause", "--server", &addr]);
    assert!(paused.ok().stdout.contains("paused"), "{}", paused.stdout);

    phase!("paused: bytes_done stops changing");
    // A chunk in flight when the pause arrived may still land: wait for two
    // equal readings, then watch it stay put.
    let mut prev = report(&addr).bytes_done;
    let settled = wait_until(Duration::from_secs(10), "progress to settle", || {
        std::thread::sleep(Duration::from_millis(300));
        let now = report(&addr).bytes_done;
        let same = now == prev;
        prev = now;
        same.then_some(now)
    });
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(250));
        let r = report(&addr);
        assert_eq!(r.state, BackupState::Paused, "{r:?}");
        assert_eq!(r.bytes_done, settled, "progress moved while paused: {r:?}");
    }
    assert!(settled < report(&addr).bytes_total);
    let status = magma(&root, "status", &["status", "--server", &addr, "--json"]);
    assert!(
        status.ok().stdout.contains("\"state\":\"paused\""),
        "{}",
        status.stdout
    );

    phase!("resume: it completes and verifies");
    let resumed = magma(&root, "resume", &["backup-resume", "--server", &addr]);
    assert!(
        resumed.ok().stdout.contains("running"),
        "{}",
        resumed.stdout
    );
    wait_completed(&addr);
    magma(&root, "verify", &["verify-backup", to]).ok();

    phase!("a quiet primary's backup holds exactly its content");
    assert!(c.servers[s].terminate().success());
    let b = c.add_server("b-server", &[]);
    c.servers[b].dir = target.clone();
    c.servers[b].start();
    assert_eq!(digest(&c.servers[b].addr), primary_digest);
    verify_flood(&dump(&c.servers[b].addr, "g"), "g", &flood.acked(), 0);
}

#[test]
fn t20_pull_under_flood_verifies_and_resumes_after_the_client_is_killed() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &["--backup-rate", "250000"]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let root = c.root.path().to_path_buf();
    load_blobs(&addr);
    let mut flood = Flood::start(&root, &[addr.as_str()], "p", &["--duration", "15"]);
    wait_until(Duration::from_secs(30), "the flood acknowledged", || {
        (flood.acked().len() >= 20).then_some(())
    });

    phase!("pull a backup here while the flood runs");
    let p1 = root.join("pulled/p1");
    let out = magma(
        &root,
        "pull1",
        &[
            "backup",
            "--server",
            &addr,
            "--to",
            p1.to_str().unwrap(),
            "--pull",
        ],
    );
    assert!(out.ok().stdout.contains("verified"), "{}", out.stdout);
    magma(&root, "verify1", &["verify-backup", p1.to_str().unwrap()]).ok();
    assert!(report(&addr).target.contains("pull"));

    phase!("kill a second pull midway, then run the same command again");
    let p2 = root.join("pulled/p2");
    let args = [
        "backup",
        "--server",
        addr.as_str(),
        "--to",
        p2.to_str().unwrap(),
        "--pull",
    ];
    let (mut child, _, _) = spawn_cli(&root, "pull2-killed", &args);
    wait_until(
        Duration::from_secs(30),
        "the pull to have received data",
        || {
            let got = fs::metadata(p2.join("objects.dat"))
                .map(|m| m.len())
                .unwrap_or(0);
            (p2.join("PULL-STATE").exists() && got > 0).then_some(())
        },
    );
    let running = report(&addr);
    assert_eq!(running.state, BackupState::Running, "{running:?}");
    assert!(
        running.bytes_done < running.bytes_total,
        "the pull finished too fast: {running:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!p2.join(MANIFEST_FILE).exists());
    let half = magma(
        &root,
        "verify-half",
        &["verify-backup", p2.to_str().unwrap()],
    );
    assert!(half.stderr.contains("incomplete"), "{}", half.stderr);
    let again = magma(&root, "pull2", &args);
    assert!(again.ok().stdout.contains("resumed"), "{}", again.stdout);
    magma(&root, "verify2", &["verify-backup", p2.to_str().unwrap()]).ok();
    let refused = magma(&root, "pull3", &args);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        refused.stderr.contains("complete backup"),
        "{}",
        refused.stderr
    );

    phase!("flood ends; a server on the pulled backup holds its snapshot");
    let end = flood.wait(Duration::from_secs(60));
    assert!(end.status.success(), "{}", end.stderr);
    verify_flood(&dump(&addr, "p"), "p", &flood.acked(), 0);
    assert!(c.servers[s].terminate().success());
    for (name, dir) in [("p1-server", &p1), ("p2-server", &p2)] {
        let commit = snapshot_commit(dir);
        let b = c.add_server(name, &[]);
        c.servers[b].dir = dir.to_path_buf();
        c.servers[b].start();
        let baddr = c.servers[b].addr.clone();
        assert_refuses_commits(&baddr, hello_role(&baddr));
        let line = digest(&baddr);
        assert_eq!(
            line.split(' ').next().unwrap(),
            commit.to_string(),
            "{name}: {line}"
        );
        let elements = dump(&baddr, "p");
        let k = elements.len() as u64;
        let prefix: Vec<u64> = flood.acked().into_iter().filter(|&q| q <= k).collect();
        verify_flood(&elements, "p", &prefix, 1);
        c.servers[b].kill();
    }
}

/// The backup's debug lines about yielding to commits, in order: `true`
/// when it started yielding, `false` when it went back.
fn yield_transitions(log: &Path) -> Vec<bool> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            if l.contains("commits are flowing, yielding") {
                Some(true)
            } else if l.contains("the commit path is idle") {
                Some(false)
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn t20_a_backup_yields_to_flowing_commits_then_speeds_up_and_verifies() {
    let mut c = Cluster::new();
    // The busy rate far below the request's rate, so yielding is visible
    // on a small repository; no timing is asserted, only the transitions.
    let s = c.add_server("s1", &["--backup-busy-rate", "100000"]);
    c.servers[s]
        .env
        .push(("RUST_LOG".into(), "info,magma::actors::backup=debug".into()));
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let log = c.servers[s].log.clone();
    let root = c.root.path().to_path_buf();
    load_blobs(&addr);

    phase!("a flood; a backup at 1 MB/s yields to it");
    let mut flood = Flood::start(&root, &[addr.as_str()], "y", &["--duration", "60"]);
    wait_until(Duration::from_secs(30), "the flood acknowledged", || {
        (flood.acked().len() >= 20).then_some(())
    });
    let target = root.join("yb");
    let to = target.to_str().unwrap();
    start_detached_backup(&root, "start", &addr, to, 1000000);
    wait_until(Duration::from_secs(30), "the backup to yield", || {
        (yield_transitions(&log).first() == Some(&true)).then_some(())
    });
    let r = report(&addr);
    assert_eq!(r.state, BackupState::Running, "{r:?}");

    phase!("the flood stops: the backup goes back to its own rate and completes");
    flood.kill();
    let done = wait_completed(&addr);
    let transitions = yield_transitions(&log);
    eprintln!(
        "backup: {} bytes in {} ms; yielding transitions {transitions:?}",
        done.bytes_done, done.elapsed_ms
    );
    // One line per change of state, never one per chunk: they alternate.
    assert!(
        transitions
            .iter()
            .enumerate()
            .all(|(i, &y)| y == (i % 2 == 0)),
        "{transitions:?}"
    );
    assert_eq!(
        transitions.last(),
        Some(&false),
        "the idle commit path was never noticed: {transitions:?}"
    );
    assert!(fs::read_to_string(&log)
        .unwrap()
        .contains("the commit path is idle, back to 1000000 bytes/s"));
    magma(&root, "verify", &["verify-backup", to]).ok();
}
