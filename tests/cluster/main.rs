//! The process-level suite: real `magma-server` processes, real `magma`
//! flooding clients, SIGKILL and restarts, on loopback only.

mod harness;
mod proxy;

mod t10_bad_input;
mod t10_basics;
mod t20_backup;
mod t30_replication;
mod t40_compaction;
mod t50_crash;
mod t50_failover;
mod t60_random_faults;
mod t70_conductor;
