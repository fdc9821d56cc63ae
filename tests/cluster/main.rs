//! The process-level suite: real `magma-server` processes, real `magma`
//! flooding clients, SIGKILL and restarts, on loopback only.

mod harness;

mod t10_bad_input;
mod t10_basics;
mod t50_crash;
