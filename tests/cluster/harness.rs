//! The process-level harness: real `magma-server` and `magma` processes on
//! loopback, each server on its own temporary directory and port, its
//! output in a log file that is printed when a test fails.
//!
//! Harness failures (a server that cannot start, a port that cannot be
//! found) panic with `harness:` in the message, apart from the assertions
//! the tests make about the servers.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use magma::client::{AdminSession, ConnectOptions};
use magma::protocol::ServerRole;

pub const SERVER: &str = env!("CARGO_BIN_EXE_magma-server");
pub const CLI: &str = env!("CARGO_BIN_EXE_magma");

/// Log a test phase so a failing run's output reads as a story.
#[macro_export]
macro_rules! phase {
    ($($arg:tt)*) => { eprintln!("--- {}", format!($($arg)*)) };
}

/// Poll `f` with backoff until it returns `Some`, at most `timeout`.
pub fn wait_until<T>(timeout: Duration, reason: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {reason}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Wait for a child to exit; past `timeout` kill it (no orphan outlives a
/// test) and fail.
pub fn wait_or_kill(mut child: Child, timeout: Duration, reason: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if start.elapsed() > timeout {
            child.kill().ok();
            child.wait().ok();
            panic!("timed out after {timeout:?} waiting for: {reason} (killed it)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("harness: no free port: {e}"))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One `magma-server` process, restartable on the same directory and port.
pub struct ServerProc {
    pub name: String,
    pub dir: PathBuf,
    pub addr: String,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// Extra environment (fault-injection hooks).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ServerProc {
    fn command(&self) -> Command {
        let mut cmd = Command::new(SERVER);
        cmd.arg("--dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(&self.addr)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("MAGMA_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        cmd
    }

    fn log_file(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("harness: log file {}: {e}", self.log.display()))
    }

    /// Spawn the process without waiting for it to serve.
    pub fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "harness: {} is already running",
            self.name
        );
        let mut log = self.log_file();
        writeln!(log, "===== starting {} =====", self.name).ok();
        let child = self
            .command()
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("harness: cannot spawn {SERVER}: {e}"));
        self.child = Some(child);
    }

    /// Spawn and wait until an admin ping succeeds.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let name = self.name.clone();
        let addr = self.addr.clone();
        let log = self.log.clone();
        wait_until(timeout, &format!("{name} answering on {addr}"), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "harness: {name} exited with {status} before serving; log:\n{}",
                    tail(&log, 40)
                );
            }
            let opts = ConnectOptions {
                connect_timeout: Duration::from_millis(500),
                ..ConnectOptions::default()
            };
            AdminSession::connect_with(&addr, &opts)
                .ok()
                .and_then(|mut a| a.ping().ok())
        });
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM and wait (bounded) for a graceful exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let c = self.child.take().expect("harness: server not running");
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        self.wait_child(c, Duration::from_secs(30))
    }

    /// Wait for a process that was asked to stop some other way.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.child.take().expect("harness: server not running");
        self.wait_child(c, timeout)
    }

    fn wait_child(&self, c: Child, timeout: Duration) -> ExitStatus {
        wait_or_kill(c, timeout, &format!("{} to exit", self.name))
    }

    pub fn admin(&self) -> AdminSession {
        AdminSession::connect(&self.addr)
            .unwrap_or_else(|e| panic!("admin session to {}: {e}", self.name))
    }

    /// Run the server binary in the foreground with extra arguments and
    /// return (status, combined output): for start-up refusals.
    pub fn run_to_exit(&self, timeout: Duration) -> (ExitStatus, String) {
        let out_path = self.log.with_extension("foreground");
        let out = File::create(&out_path).expect("output file");
        let child = self
            .command()
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn");
        let status = wait_or_kill(child, timeout, "the refused server to exit");
        (status, fs::read_to_string(&out_path).unwrap_or_default())
    }
}

/// A set of servers under one temporary directory. Dropping it kills every
/// process still running and, if the test is failing, prints their logs.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub servers: Vec<ServerProc>,
    pub floods: Vec<Flood>,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster {
            root: tempfile::Builder::new()
                .prefix("magma-cluster-")
                .tempdir()
                .expect("harness: temp dir"),
            servers: Vec::new(),
            floods: Vec::new(),
        }
    }

    /// Declare a server (not started) with its own directory and port.
    pub fn add_server(&mut self, name: &str, args: &[&str]) -> usize {
        let dir = self.root.path().join(name);
        self.add_server_on(name, &dir, args)
    }

    /// A server on a given directory (e.g. a backup).
    pub fn add_server_on(&mut self, name: &str, dir: &Path, args: &[&str]) -> usize {
        let addr = format!("127.0.0.1:{}", free_port());
        self.servers.push(ServerProc {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            log: self.root.path().join(format!("{name}.log")),
            addr,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
        });
        self.servers.len() - 1
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for f in &mut self.floods {
            f.kill();
        }
        for s in &mut self.servers {
            s.kill();
        }
        if std::thread::panicking() {
            for s in &self.servers {
                // Connection open/close lines drown the story: leave them out.
                let text = fs::read_to_string(&s.log).unwrap_or_default();
                let story: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("magma::actors::session::connection"))
                    .collect();
                eprintln!(
                    "===== log of {} ({}), connection lines omitted =====\n{}",
                    s.name,
                    s.addr,
                    story[story.len().saturating_sub(150)..].join("\n")
                );
            }
            for f in &self.floods {
                eprintln!(
                    "===== stderr of flood {} =====\n{}",
                    f.name,
                    tail(&f.stderr, 50)
                );
            }
        }
    }
}

/// A `magma flood` process and its ack log.
pub struct Flood {
    pub name: String,
    pub ack_log: PathBuf,
    pub stderr: PathBuf,
    child: Option<Child>,
}

/// How a flood ended.
pub struct FloodEnd {
    pub status: ExitStatus,
    pub stderr: String,
}

impl Flood {
    pub fn start(dir: &Path, nodes: &[&str], name: &str, extra: &[&str]) -> Flood {
        let ack_log = dir.join(format!("{name}.acks"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(CLI)
            .arg("flood")
            .arg("--node")
            .arg(nodes.join(","))
            .arg("--name")
            .arg(name)
            .arg("--ack-log")
            .arg(&ack_log)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("MAGMA_TEST_FLOOD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&stderr).expect("stderr file")))
            .spawn()
            .unwrap_or_else(|e| panic!("harness: cannot spawn {CLI} flood: {e}"));
        Flood {
            name: name.to_string(),
            ack_log,
            stderr,
            child: Some(child),
        }
    }

    /// Acknowledged sequence numbers so far, in the order written.
    pub fn acked(&self) -> Vec<u64> {
        let Ok(f) = File::open(&self.ack_log) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn wait(&mut self, timeout: Duration) -> FloodEnd {
        let c = self.child.take().expect("harness: flood not running");
        let status = wait_or_kill(c, timeout, &format!("flood {} to finish", self.name));
        let mut stderr = String::new();
        File::open(&self.stderr)
            .and_then(|mut f| f.read_to_string(&mut stderr))
            .ok();
        FloodEnd { status, stderr }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for Flood {
    /// A flood a failing test holds outside the cluster's list still says
    /// what it saw.
    fn drop(&mut self) {
        let running = self.child.is_some();
        self.kill();
        if running && std::thread::panicking() {
            eprintln!(
                "===== stderr of flood {} (killed by the failing test) =====\n{}",
                self.name,
                tail(&self.stderr, 50)
            );
        }
    }
}

/// `magma dump` of one collection from exactly one server.
pub fn dump(addr: &str, collection: &str) -> Vec<String> {
    let out = Command::new(CLI)
        .args(["dump", "--server", addr, "--collection", collection])
        .output()
        .unwrap_or_else(|e| panic!("harness: cannot run {CLI} dump: {e}"));
    assert!(
        out.status.success(),
        "magma dump {collection} from {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("dump prints UTF-8")
        .lines()
        .map(str::to_string)
        .collect()
}

/// `magma digest` of one server: `<commit> <hex>`.
pub fn digest(addr: &str) -> String {
    let out = Command::new(CLI)
        .args(["digest", "--server", addr])
        .output()
        .unwrap_or_else(|e| panic!("harness: cannot run {CLI} digest: {e}"));
    assert!(
        out.status.success(),
        "magma digest {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The flood oracle: the collection is exactly `name-1 ..= name-M` in
/// order (so every element is present once, in order, and nothing appears
/// that was never sent), every acknowledged seq is within it, and at most
/// `in_flight` elements beyond the last acknowledgement exist (commits whose
/// outcome the client never learned).
pub fn verify_flood(elements: &[String], name: &str, acked: &[u64], in_flight: u64) {
    for (i, e) in elements.iter().enumerate() {
        let expected = format!("{name}-{:09}", i + 1);
        assert_eq!(
            e, &expected,
            "collection {name}: element {i} is {e:?}, expected {expected:?}"
        );
    }
    let m = elements.len() as u64;
    let max_acked = acked.iter().copied().max().unwrap_or(0);
    assert!(
        max_acked <= m,
        "collection {name}: acknowledged seq {max_acked} is missing (collection holds {m})"
    );
    let mut sorted = acked.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        acked.len(),
        "collection {name}: a seq was acknowledged twice"
    );
    assert!(
        m <= max_acked + in_flight,
        "collection {name}: {m} elements but only {max_acked} acknowledged (+{in_flight} in flight)"
    );
}

impl ServerProc {
    /// A second, not-started server description on the same directory.
    pub fn clone_for_dir(&self) -> ServerProc {
        ServerProc {
            name: format!("{}-twin", self.name),
            dir: self.dir.clone(),
            addr: self.addr.clone(),
            log: self.log.with_extension("twin.log"),
            args: self.args.clone(),
            env: self.env.clone(),
            child: None,
        }
    }
}

/// `magma backup --server ADDR --to DIR`, waiting for it to complete.
pub fn backup(addr: &str, to: &Path) {
    let out = Command::new(CLI)
        .args(["backup", "--server", addr, "--to"])
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("harness: cannot run {CLI} backup: {e}"));
    assert!(
        out.status.success(),
        "magma backup from {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The status report of one server.
pub fn status(addr: &str) -> magma::protocol::StatusReport {
    AdminSession::connect(addr)
        .and_then(|mut a| a.status())
        .unwrap_or_else(|e| panic!("status of {addr}: {e}"))
}

/// Wait until `primary` lists exactly `members` (addresses).
pub fn wait_for_members(primary: &str, members: &[&str], timeout: Duration) {
    let mut want: Vec<String> = members.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_until(
        timeout,
        &format!("{primary} to list members {want:?}"),
        || {
            let s = AdminSession::connect(primary)
                .and_then(|mut a| a.status())
                .ok()?;
            let mut got: Vec<String> = s.members.iter().map(|m| m.addr.clone()).collect();
            got.sort();
            (got == want).then_some(())
        },
    );
}

/// s1 primary and s2 joined from a backup of it, both started with `args`;
/// returns their indices and addresses once s2 is a member.
pub fn pair(c: &mut Cluster, args: &[&str]) -> (usize, usize, String, String) {
    pair_with(c, args, args, &[])
}

/// [`pair`] with each server's own arguments, and environment for s2
/// (a fault-injection hook).
pub fn pair_with(
    c: &mut Cluster,
    args1: &[&str],
    args2: &[&str],
    env2: &[(&str, &str)],
) -> (usize, usize, String, String) {
    let s1 = c.add_server("s1", args1);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    let b = c.root.path().join("b2");
    backup(&a1, &b);
    let s2 = c.add_server_on("s2", &b, args2);
    c.servers[s2]
        .env
        .extend(env2.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], Duration::from_secs(90));
    // The primary lists s2 as soon as it committed the node change; s2
    // knows itself a member only once that record reached it. A take-over
    // asked of it before then is refused.
    wait_for_role(&a2, ServerRole::Secondary, Duration::from_secs(30));
    (s1, s2, a1, a2)
}

/// One more secondary, `name`, started with `args` on a backup of
/// `primary`; returns its index and address once the primary lists it
/// among `members` (the whole node after it joined) and it knows itself
/// a secondary.
pub fn add_secondary(
    c: &mut Cluster,
    name: &str,
    primary: &str,
    members: &[&str],
    args: &[&str],
) -> (usize, String) {
    let b = c.root.path().join(format!("backup-of-{name}"));
    backup(primary, &b);
    let s = c.add_server_on(name, &b, args);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let mut all: Vec<&str> = members.to_vec();
    all.push(&addr);
    wait_for_members(primary, &all, Duration::from_secs(90));
    wait_for_role(&addr, ServerRole::Secondary, Duration::from_secs(30));
    (s, addr)
}

/// Wait until the server at `addr` reports `role` itself (its status;
/// a server that does not answer yet is asked again).
pub fn wait_for_role(addr: &str, role: ServerRole, timeout: Duration) {
    wait_until(
        timeout,
        &format!("{addr} to report itself {role:?}"),
        || {
            let s = AdminSession::connect(addr)
                .and_then(|mut a| a.status())
                .ok()?;
            (s.role == role).then_some(())
        },
    );
}

/// Wait until every server prints the same digest line.
pub fn wait_for_equal_digests(addrs: &[&str], timeout: Duration) -> String {
    wait_until(timeout, &format!("equal digests on {addrs:?}"), || {
        let lines: Vec<String> = addrs.iter().map(|a| digest(a)).collect();
        lines
            .windows(2)
            .all(|w| w[0] == w[1])
            .then(|| lines[0].clone())
    })
}

impl Flood {
    /// Still running (no error reached the application so far)?
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }
}

impl ServerProc {
    /// SIGSTOP: the process stays, answers nothing (a hung server).
    pub fn freeze(&mut self) {
        let c = self.child.as_ref().expect("harness: server not running");
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGSTOP);
        }
    }

    /// The process's resident memory now, in bytes (Linux `/proc`).
    pub fn resident_bytes(&self) -> u64 {
        let c = self.child.as_ref().expect("harness: server not running");
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.id()))
            .unwrap_or_else(|e| panic!("harness: /proc status of {}: {e}", self.name));
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("harness: no VmRSS for {}", self.name));
        kib * 1024
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&mut self) {
        let c = self.child.as_ref().expect("harness: server not running");
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGCONT);
        }
    }
}

impl ServerProc {
    /// Does the server's log mention `text`?
    pub fn log_contains(&self, text: &str) -> bool {
        fs::read_to_string(&self.log)
            .map(|t| t.contains(text))
            .unwrap_or(false)
    }

    /// Does the log of the server's last start mention `text`? (One log
    /// file gets every start of a server, each after a marker line.)
    pub fn last_run_log_contains(&self, text: &str) -> bool {
        let marker = format!("===== starting {} =====", self.name);
        fs::read_to_string(&self.log)
            .map(|t| t.rsplit(&marker).next().unwrap_or("").contains(text))
            .unwrap_or(false)
    }
}

/// Wait until every flood acknowledged `more` appends beyond what it had.
pub fn wait_for_more_acks(floods: &[Flood], more: usize, timeout: Duration, what: &str) {
    let base: Vec<usize> = floods.iter().map(|f| f.acked().len()).collect();
    wait_until(timeout, what, || {
        floods
            .iter()
            .zip(&base)
            .all(|(f, b)| f.acked().len() >= b + more)
            .then_some(())
    });
}

/// End floods that must not have seen an error (`during`: when), wait until
/// `servers` hold identical content, and check on each of them every
/// acknowledged append of every flood (one more, unacknowledged, may be
/// there: the commit in flight at the kill).
pub fn stop_floods_and_verify(floods: &mut [Flood], servers: &[&str], during: &str) {
    for f in floods.iter_mut() {
        if f.running() {
            f.kill();
            continue;
        }
        // It ended by itself: at its --duration (a slow run), or at an error.
        let end = f.wait(Duration::from_secs(10));
        assert!(
            end.status.success(),
            "flood {} saw an error {during}: {}",
            f.name,
            end.stderr
        );
    }
    wait_for_equal_digests(servers, Duration::from_secs(30));
    for f in floods.iter() {
        for a in servers {
            verify_flood(&dump(a, &f.name), &f.name, &f.acked(), 1);
        }
    }
}

/// After the primary was killed: a flood whose commit was in flight stops
/// with an `error: ...` line (outcome unknown); one whose next commit found
/// the primary gone went to the successor and goes on (it is then killed).
pub fn stop_or_move_on(floods: &mut [Flood], timeout: Duration) {
    for f in floods.iter_mut() {
        let n = f.acked().len();
        let stopped = wait_until(timeout, "each flooder to stop or move on", || {
            if !f.running() {
                Some(true)
            } else if f.acked().len() > n + 50 {
                Some(false)
            } else {
                None
            }
        });
        if stopped {
            let end = f.wait(Duration::from_secs(10));
            assert!(
                !end.status.success(),
                "flood {} stopped without an error",
                f.name
            );
            assert!(end.stderr.contains("error: "), "{}", end.stderr);
        } else {
            f.kill();
        }
    }
}
