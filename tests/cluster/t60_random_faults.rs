//! Randomised faults under flood on three servers, seeded and reproducible:
//! `MAGMA_FAULT_SEED=N` replays a run's sequence of faults and targets (the
//! timing is the machine's), `MAGMA_FAULT_ROUNDS=R` sets the number of
//! rounds (default 3, for CI).
//!
//! What the node guarantees under each fault (default `--sync-replicas 1`,
//! `group` flush), and what each round checks:
//!
//! * **kill -9 of the primary.** Every acknowledged commit survives (it was
//!   durable on the primary and on at least one secondary before the
//!   acknowledgement). The next commit reaching a secondary promotes the
//!   node's successor (its first secondary) under a new epoch; the other
//!   secondary follows it. Clients whose commit was in flight at the kill
//!   see an error (outcome unknown: applied or not, never twice); later
//!   commits go to the new primary. The former primary, restarted, rejoins
//!   as a secondary if its log is a prefix of the new primary's; otherwise
//!   (it had applied an in-flight commit) it is `deposed`, keeps the
//!   divergent commits in `divergent-*.records`, and the operator re-seeds
//!   it on a fresh directory with `--join NEW_PRIMARY`.
//! * **kill -9 of a secondary**, restarted at once or once the primary
//!   dropped it: invisible to clients; it catches up and rejoins.
//! * **`magma take-over` on a secondary**: the roles swap with nothing in
//!   flight; invisible to clients.
//! * **network cut of a secondary** (its proxy closes every connection to
//!   it and refuses new ones for 2 s, then heals): invisible to clients;
//!   the primary drops it after the replica timeout and it rejoins by
//!   itself. The cut is one-way, as seen from the server: nobody reaches
//!   it, but its own connections to the others go through their proxies,
//!   which stay up (one loopback address: a proxy cannot tell callers
//!   apart), so it may pull records and be re-added, then dropped again.
//!
//! After every round: the node is whole again (one primary, the other two
//! its secondaries, all three listing the same members), every
//! acknowledged append of every flooder so far is on every server once and
//! in order, nothing that was never sent is there, and all digests agree.
//! After a primary kill, what the stopped flooders had acknowledged is
//! checked on the new primary at once, before anything heals.
//!
//! Not tested here: a cut of the **primary**. A partitioned (not dead)
//! primary is the known non-partition-safe case of this release (status
//! says `partition_safe: false`): the successor promotes itself while the
//! old primary goes on, two primaries. Promotion by majority (witnesses)
//! is future work.
//!
//! On failure the panic message names the seed, the round and the fault,
//! and the whole cluster directory (logs, ack logs, repositories) is kept
//! in `$TMPDIR/magma-t60-seed-SEED-PID`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::time::{Duration, Instant};

use magma::client::{AdminSession, ConnectOptions};
use magma::protocol::{ServerRole, StatusReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{
    backup, verify_flood, wait_for_equal_digests, wait_for_members, wait_until, Cluster, Flood, CLI,
};
use crate::phase;
use crate::proxy::Proxy;

const JOIN: Duration = Duration::from_secs(60);
/// Back to one primary and two secondaries after a fault.
const WHOLE: Duration = Duration::from_secs(60);
const BASE_ARGS: &[&str] = &["--replica-timeout-ms", "1000"];
/// The deliberate duration of a network cut.
const CUT: Duration = Duration::from_secs(2);
/// Flooders replaced in one round before the test gives up.
const MAX_REPLACEMENTS: usize = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillPrimary,
    KillSecondary,
    TakeOver,
    CutSecondary,
}

/// What one round did, for the summary.
struct RoundReport {
    fault: String,
    elapsed: Duration,
    acks: usize,
    flood_errors: usize,
}

struct Rig {
    c: Cluster,
    /// `proxies[i]` fronts `c.servers[i]`.
    proxies: Vec<Proxy>,
    /// Indexes into `c.floods` of the flooders running now; every flooder
    /// ever started stays in `c.floods`, for its ack log and its stderr.
    live: Vec<usize>,
    started: usize,
    round: usize,
    /// Flooders that stopped with an error this round: (name, stderr tail).
    errors: Vec<(String, String)>,
    replaced: usize,
    seed: u64,
}

impl Drop for Rig {
    /// On failure, keep the whole cluster directory (the temporary one
    /// goes with the cluster): logs, ack logs, flooders' stderr, every
    /// server's repository and the directories moved aside, for `strings`
    /// and for starting a server on a copy.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for f in &mut self.c.floods {
            f.kill();
        }
        for s in &mut self.c.servers {
            s.kill();
        }
        let keep = std::env::temp_dir().join(format!(
            "magma-t60-seed-{}-{}",
            self.seed,
            std::process::id()
        ));
        let mut dirs = vec![(self.c.root.path().to_path_buf(), keep.clone())];
        while let Some((from, to)) = dirs.pop() {
            std::fs::create_dir_all(&to).ok();
            for e in std::fs::read_dir(&from).into_iter().flatten().flatten() {
                let (path, target) = (e.path(), to.join(e.file_name()));
                if path.is_dir() {
                    dirs.push((path, target));
                } else {
                    std::fs::copy(&path, &target).ok();
                }
            }
        }
        eprintln!("the cluster directory is kept in {}", keep.display());
    }
}

fn try_status(addr: &str) -> Option<StatusReport> {
    let opts = ConnectOptions {
        connect_timeout: Duration::from_millis(500),
        read_timeout: Some(Duration::from_secs(5)),
        ..ConnectOptions::default()
    };
    AdminSession::connect_with(addr, &opts)
        .and_then(|mut a| a.status())
        .ok()
}

/// `magma dump`; `None` if the collection does not exist there.
fn dump_opt(addr: &str, name: &str) -> Option<Vec<String>> {
    let out = Command::new(CLI)
        .args(["dump", "--server", addr, "--collection", name])
        .output()
        .unwrap_or_else(|e| panic!("harness: cannot run {CLI} dump: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains(&format!("no collection \"{name}\"")) {
        return None;
    }
    assert!(
        out.status.success(),
        "magma dump {name} from {addr} failed: {stderr}"
    );
    Some(
        String::from_utf8(out.stdout)
            .expect("dump prints UTF-8")
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

impl Rig {
    fn addr(&self, i: usize) -> String {
        self.c.servers[i].addr.clone()
    }

    fn proxy(&self, i: usize) -> String {
        self.proxies[i].addr.clone()
    }

    fn proxy_addrs(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.addr.clone()).collect()
    }

    fn role(&self, i: usize) -> Option<ServerRole> {
        try_status(&self.addr(i)).map(|s| s.role)
    }

    /// Start server `i` and wait until it answers. A listen port taken
    /// meanwhile (the harness picks free ports ahead of time; another
    /// socket may grab one) is a harness hiccup: pick another port, point
    /// the proxy there, try again.
    fn start(&mut self, i: usize) {
        for attempt in 1..=3 {
            self.c.servers[i].spawn();
            let addr = self.addr(i);
            let serving = wait_until(
                Duration::from_secs(60),
                &format!("{} answering on {addr}", self.c.servers[i].name),
                || {
                    if !self.c.servers[i].is_running() {
                        return Some(false);
                    }
                    let opts = ConnectOptions {
                        connect_timeout: Duration::from_millis(500),
                        read_timeout: Some(Duration::from_secs(5)),
                        ..ConnectOptions::default()
                    };
                    AdminSession::connect_with(&addr, &opts)
                        .and_then(|mut a| a.ping())
                        .ok()
                        .map(|_| true)
                },
            );
            if serving {
                return;
            }
            self.c.servers[i].kill(); // reap
            let log = std::fs::read_to_string(&self.c.servers[i].log).unwrap_or_default();
            let last_start = log.rsplit("===== starting").next().unwrap_or_default();
            if !last_start.contains("Address already in use") || attempt == 3 {
                panic!(
                    "harness: {} exited before serving; its last start:\n{last_start}",
                    self.c.servers[i].name
                );
            }
            let fresh = format!("127.0.0.1:{}", crate::harness::free_port());
            eprintln!(
                "harness: {addr} was taken; {} listens on {fresh}",
                self.c.servers[i].name
            );
            self.proxies[i].set_target(&fresh);
            self.c.servers[i].addr = fresh;
        }
    }

    /// Declare server `name` behind its own proxy, advertising the proxy.
    fn add(&mut self, name: &str, dir: Option<&std::path::Path>) -> usize {
        let i = match dir {
            Some(d) => self.c.add_server_on(name, d, BASE_ARGS),
            None => self.c.add_server(name, BASE_ARGS),
        };
        let p = Proxy::start(&self.c.servers[i].addr);
        self.c.servers[i]
            .args
            .extend(["--advertise".to_string(), p.addr.clone()]);
        self.proxies.push(p);
        i
    }

    fn start_flood(&mut self) {
        self.started += 1;
        let name = format!("r{:02}-f{}", self.round, self.started);
        let nodes = self.proxy_addrs();
        let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let f = Flood::start(self.c.root.path(), &nodes, &name, &[]);
        self.c.floods.push(f);
        self.live.push(self.c.floods.len() - 1);
    }

    /// Replace every flooder that stopped (on an error: they have no limit).
    fn tend(&mut self) {
        let mut still = Vec::new();
        for i in std::mem::take(&mut self.live) {
            let f = &mut self.c.floods[i];
            if f.running() {
                still.push(i);
                continue;
            }
            let end = f.wait(Duration::from_secs(10));
            let last: Vec<&str> = end.stderr.lines().rev().take(3).collect();
            eprintln!(
                "flood {} stopped ({}) after {} acks: {}",
                f.name,
                end.status,
                f.acked().len(),
                last.join(" | ")
            );
            self.errors.push((f.name.clone(), end.stderr));
            self.replaced += 1;
            assert!(
                self.replaced <= MAX_REPLACEMENTS,
                "flooders keep failing: {} replaced this round",
                self.replaced
            );
        }
        self.live = still;
        while self.live.len() < 2 {
            self.start_flood();
        }
    }

    fn acks(&self) -> HashMap<String, usize> {
        self.live
            .iter()
            .map(|&i| {
                (
                    self.c.floods[i].name.clone(),
                    self.c.floods[i].acked().len(),
                )
            })
            .collect()
    }

    /// Each server's view, one line each, for failure messages.
    fn describe(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.c.servers.iter().enumerate() {
            let view = match try_status(&s.addr) {
                Some(st) => {
                    let members: Vec<String> = st
                        .members
                        .iter()
                        .map(|m| {
                            let name = (0..self.proxies.len())
                                .find(|&k| self.proxies[k].addr == m.addr)
                                .map_or(m.addr.as_str(), |k| self.c.servers[k].name.as_str());
                            format!("{name}:{:?}", m.role)
                        })
                        .collect();
                    format!(
                        "{:?} at commit {}, epoch {}, members [{}]",
                        st.role,
                        st.commit,
                        st.epoch,
                        members.join(", ")
                    )
                }
                None => "no answer".to_string(),
            };
            out.push_str(&format!(
                "\n      {} (via {}): {view}",
                s.name, self.proxies[i].addr
            ));
        }
        out
    }

    /// Poll `f` (tending the flooders) until it returns `Some`, at most
    /// `timeout`; on timeout fail with every server's view.
    fn wait_node<T>(
        &mut self,
        timeout: Duration,
        why: &str,
        mut f: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            self.tend();
            if let Some(v) = f(self) {
                return v;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for: {why}; the node:{}",
                    self.describe()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Every running flooder (or its replacement) got `n` more acks.
    fn wait_progress(&mut self, n: usize, why: &str) {
        let before = self.acks();
        self.wait_node(Duration::from_secs(60), why, |r| {
            r.live
                .iter()
                .all(|&i| {
                    let f = &r.c.floods[i];
                    f.acked().len() >= before.get(&f.name).copied().unwrap_or(0) + n
                })
                .then_some(())
        });
    }

    /// One primary, the other two its secondaries, all three listing the
    /// same members (the three proxies) with the same primary. Returns the
    /// primary's index.
    fn whole(&self) -> Option<usize> {
        let st: Vec<StatusReport> = (0..self.c.servers.len())
            .map(|i| try_status(&self.addr(i)))
            .collect::<Option<_>>()?;
        let primaries: Vec<usize> = (0..st.len())
            .filter(|&i| st[i].role == ServerRole::Primary)
            .collect();
        let [p] = primaries[..] else { return None };
        let mut all = self.proxy_addrs();
        all.sort();
        let agree = st.iter().enumerate().all(|(i, s)| {
            let mut members: Vec<String> = s.members.iter().map(|m| m.addr.clone()).collect();
            members.sort();
            let named: Vec<&str> = s
                .members
                .iter()
                .filter(|m| m.role == ServerRole::Primary)
                .map(|m| m.addr.as_str())
                .collect();
            (i == p || s.role == ServerRole::Secondary)
                && members == all
                && named == [self.proxies[p].addr.as_str()]
        });
        agree.then_some(p)
    }

    fn wait_whole(&mut self, why: &str) -> usize {
        self.wait_node(WHOLE, why, |r| r.whole())
    }

    /// Stop every flooder, then check every acknowledged append of every
    /// flooder so far on every server, and equal digests.
    fn quiesce_and_verify(&mut self) {
        for i in std::mem::take(&mut self.live) {
            self.c.floods[i].kill();
        }
        let addrs: Vec<String> = (0..self.c.servers.len()).map(|i| self.addr(i)).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        wait_for_equal_digests(&refs, Duration::from_secs(30));
        for f in &self.c.floods {
            for i in 0..addrs.len() {
                self.verify_on(i, f);
            }
        }
    }

    /// Every acknowledged append of `f` is on server `i`, once, in order,
    /// and nothing it never sent (`f` must have stopped: a running
    /// flooder's acks would race the dump).
    fn verify_on(&self, i: usize, f: &Flood) {
        let acked = f.acked();
        match dump_opt(&self.addr(i), &f.name) {
            Some(elements) => verify_flood(&elements, &f.name, &acked, 1),
            None => assert!(
                acked.is_empty(),
                "{}: collection {} missing with {} acknowledged appends",
                self.c.servers[i].name,
                f.name,
                acked.len()
            ),
        }
    }

    /// What every flooder that stopped had acknowledged is on server `i`.
    fn verify_stopped_on(&self, i: usize) {
        for (k, f) in self.c.floods.iter().enumerate() {
            if !self.live.contains(&k) {
                self.verify_on(i, f);
            }
        }
    }

    /// Restart a former primary after the node promoted `new_primary`: it
    /// rejoins, or diverged and the operator re-seeds it. True if diverged.
    fn restart_former_primary(&mut self, p: usize, new_primary: usize) -> bool {
        self.start(p);
        let a = self.addr(p);
        let dir = self.c.servers[p].dir.clone();
        let diverged = self.wait_node(JOIN, "the former primary to rejoin or diverge", |_| {
            let has_file = || {
                dir.read_dir().ok().is_some_and(|mut d| {
                    d.any(|e| {
                        e.ok().is_some_and(|e| {
                            e.file_name().to_string_lossy().starts_with("divergent-")
                        })
                    })
                })
            };
            match try_status(&a)?.role {
                ServerRole::Secondary => Some(false),
                ServerRole::Deposed if has_file() => Some(true),
                _ => None,
            }
        });
        if diverged {
            let np = self.proxy(new_primary);
            phase!(
                "{} diverged: move its directory aside, re-seed it with --join {np}",
                self.c.servers[p].name
            );
            self.c.servers[p].kill();
            let aside = self.c.root.path().join(format!(
                "{}-diverged-r{:02}",
                self.c.servers[p].name, self.round
            ));
            std::fs::rename(&dir, &aside)
                .unwrap_or_else(|e| panic!("harness: moving {} aside: {e}", dir.display()));
            let base = self.c.servers[p].args.clone();
            self.c.servers[p]
                .args
                .extend(["--join".to_string(), np.clone()]);
            self.start(p);
            // Later restarts open the repository it now holds.
            self.c.servers[p].args = base;
        }
        diverged
    }

    fn run_round(&mut self, rng: &mut StdRng, at: &RefCell<String>) -> RoundReport {
        let started = Instant::now();
        self.errors.clear();
        self.replaced = 0;
        let p = self.wait_whole("the node to be whole before the round");
        let secondaries: Vec<usize> = (0..self.c.servers.len()).filter(|&i| i != p).collect();
        // Draw everything each round, whatever the fault: the seed fixes
        // the whole sequence.
        let fault = match rng.gen_range(0..4) {
            0 => Fault::KillPrimary,
            1 => Fault::KillSecondary,
            2 => Fault::TakeOver,
            _ => Fault::CutSecondary,
        };
        let s = secondaries[rng.gen_range(0..secondaries.len())];
        let at_once = rng.gen_bool(0.5);
        let (pn, sn) = (
            self.c.servers[p].name.clone(),
            self.c.servers[s].name.clone(),
        );
        let mut what = match fault {
            Fault::KillPrimary => format!("kill -9 the primary {pn}"),
            Fault::KillSecondary if at_once => format!("kill -9 secondary {sn}, restart at once"),
            Fault::KillSecondary => format!("kill -9 secondary {sn}, restart once removed"),
            Fault::TakeOver => format!("take-over by secondary {sn} from {pn}"),
            Fault::CutSecondary => format!("cut secondary {sn} for {CUT:?}"),
        };
        *at.borrow_mut() = format!("round {} ({what})", self.round);
        phase!("round {}: {what}", self.round);

        self.tend();
        self.wait_progress(50, "flooders under way");
        let acks_before: usize = self.c.floods.iter().map(|f| f.acked().len()).sum();

        match fault {
            Fault::KillPrimary => {
                self.c.servers[p].kill();
                // The next commit reaching a secondary promotes the
                // successor; flooders in flight stop and are replaced.
                let np = self.wait_node(Duration::from_secs(30), "a secondary to take over", |r| {
                    secondaries
                        .iter()
                        .copied()
                        .find(|&i| r.role(i) == Some(ServerRole::Primary))
                });
                phase!("{} is primary", self.c.servers[np].name);
                // Before anything heals: what the stopped flooders had
                // acknowledged is on the new primary.
                self.verify_stopped_on(np);
                phase!("restart {pn}");
                if self.restart_former_primary(p, np) {
                    what.push_str(" (diverged, re-seeded)");
                }
            }
            Fault::KillSecondary => {
                self.c.servers[s].kill();
                if !at_once {
                    let mut want = vec![
                        self.proxy(p),
                        self.proxy(secondaries[0] + secondaries[1] - s),
                    ];
                    want.sort();
                    let pa = self.addr(p);
                    self.wait_node(Duration::from_secs(30), "the primary to drop it", |_| {
                        let mut got: Vec<String> = try_status(&pa)?
                            .members
                            .into_iter()
                            .map(|m| m.addr)
                            .collect();
                        got.sort();
                        (got == want).then_some(())
                    });
                }
                self.start(s);
            }
            Fault::TakeOver => {
                let out = Command::new(CLI)
                    .args(["take-over", "--server", &self.proxy(s)])
                    .output()
                    .unwrap_or_else(|e| panic!("harness: cannot run {CLI} take-over: {e}"));
                assert!(
                    out.status.success(),
                    "take-over by {sn} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Fault::CutSecondary => {
                self.proxies[s].cut();
                assert_eq!(self.proxies[s].connections(), 0, "harness: cut left links");
                // The fault's duration, deliberately fixed.
                std::thread::sleep(CUT);
                let members = try_status(&self.addr(p)).map(|st| st.members.len());
                phase!("heal {sn} (the primary lists {members:?} members)");
                self.proxies[s].heal();
            }
        }

        let np = self.wait_whole("the node to be whole again");
        match fault {
            Fault::KillPrimary => assert_ne!(np, p, "the killed primary is primary again"),
            Fault::TakeOver => assert_eq!(np, s, "{sn} took over but is not primary"),
            _ => assert_eq!(np, p, "the primary changed without a primary fault"),
        }
        self.wait_progress(100, "flooding to go on in the whole node");
        if fault != Fault::KillPrimary {
            assert!(
                self.errors.is_empty(),
                "a flooder saw an error under a fault clients must not notice: {:?}",
                self.errors
            );
        }
        let flood_errors = self.errors.len();
        self.quiesce_and_verify();
        let acks: usize = self.c.floods.iter().map(|f| f.acked().len()).sum();
        RoundReport {
            fault: what,
            elapsed: started.elapsed(),
            acks: acks - acks_before,
            flood_errors,
        }
    }
}

fn run(seed: u64, rounds: usize, at: &RefCell<String>) {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rig = Rig {
        c: Cluster::new(),
        proxies: Vec::new(),
        live: Vec::new(),
        started: 0,
        round: 0,
        errors: Vec::new(),
        replaced: 0,
        seed,
    };

    phase!("three servers, each behind its own proxy");
    let s1 = rig.add("s1", None);
    rig.start(s1);
    let a1 = rig.addr(s1);
    let (b2, b3) = (rig.c.root.path().join("b2"), rig.c.root.path().join("b3"));
    backup(&a1, &b2);
    backup(&a1, &b3);
    let s2 = rig.add("s2", Some(&b2));
    let s3 = rig.add("s3", Some(&b3));
    let (p1, p2, p3) = (rig.proxy(s1), rig.proxy(s2), rig.proxy(s3));
    // One at a time: the node's order (s1, s2, s3), hence the successor,
    // is the same on every run.
    rig.start(s2);
    wait_for_members(&a1, &[&p1, &p2], JOIN);
    rig.start(s3);
    wait_for_members(&a1, &[&p1, &p2, &p3], JOIN);
    rig.wait_whole("the node to form");
    let setup = t0.elapsed();

    let mut reports = Vec::new();
    for r in 1..=rounds {
        rig.round = r;
        reports.push(rig.run_round(&mut rng, at));
        let last = reports.last().unwrap();
        eprintln!(
            "round {r} survived: {} in {:.1} s, {} acks, {} flooder errors",
            last.fault,
            last.elapsed.as_secs_f64(),
            last.acks,
            last.flood_errors
        );
    }
    eprintln!(
        "MAGMA_FAULT_SEED={seed}: {rounds} rounds survived in {:.1} s (set-up {:.1} s):",
        t0.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
    for (i, r) in reports.iter().enumerate() {
        eprintln!(
            "  {:>2}. {:<48} {:>5.1} s {:>6} acks",
            i + 1,
            r.fault,
            r.elapsed.as_secs_f64(),
            r.acks
        );
    }
}

#[test]
fn t60_random_faults_keep_every_acknowledged_commit() {
    let seed: u64 = match std::env::var("MAGMA_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("harness: MAGMA_FAULT_SEED={s:?}: {e}")),
        Err(_) => rand::random(),
    };
    let rounds: usize = match std::env::var("MAGMA_FAULT_ROUNDS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("harness: MAGMA_FAULT_ROUNDS={s:?}: {e}")),
        Err(_) => 3,
    };
    eprintln!("MAGMA_FAULT_SEED={seed} MAGMA_FAULT_ROUNDS={rounds}");
    let at = RefCell::new("set-up".to_string());
    if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(seed, rounds, &at))) {
        let msg = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let at = at.borrow();
        eprintln!(
            "FAILED in {at}; reproduce with MAGMA_FAULT_SEED={seed} MAGMA_FAULT_ROUNDS={rounds}"
        );
        panic!("{msg}\n    in {at}; reproduce with MAGMA_FAULT_SEED={seed} MAGMA_FAULT_ROUNDS={rounds}");
    }
}

#[test]
fn t60_the_proxy_forwards_cuts_and_heals() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    let echo = TcpListener::bind("127.0.0.1:0").expect("harness: echo listener");
    let target = echo.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut s in echo.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(&target);
    let round_trip = |s: &mut TcpStream| -> bool {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    };
    let mut a = TcpStream::connect(&proxy.addr).unwrap();
    assert!(round_trip(&mut a), "forwarding");
    wait_until(Duration::from_secs(5), "the link registered", || {
        (proxy.connections() == 1).then_some(())
    });

    proxy.cut();
    assert_eq!(proxy.connections(), 0);
    assert!(!round_trip(&mut a), "a cut closes open connections");
    let mut b = TcpStream::connect(&proxy.addr).unwrap();
    assert!(!round_trip(&mut b), "a cut closes new connections");

    proxy.heal();
    let mut c = TcpStream::connect(&proxy.addr).unwrap();
    assert!(round_trip(&mut c), "forwarding after heal");
    drop(proxy);
}
