//! What stands in for an OMA and an appliance where none is. `tunnelfleet demo` runs on them
//! with nothing installed; the tests reuse them beside the real peers (OpenSSH, etcd), never in
//! their place for the agent's SSH.
//!
//! # Layout
//! - [`embedded_oma`]: an embedded OMA (russh SSH server) serving `L`, `D` and `R` forwards to
//!   its own services only.
//! - [`services`]: small HTTP and echo services standing in for OMA/VMA APIs and NBD, and a
//!   webhook receiver.
//! - [`ports`]: free ports, never twice per process.
//! - [`wait`]: polling with a deadline.

#![forbid(unsafe_code)]

pub mod embedded_oma;
pub mod ports;
pub mod services;
pub mod wait;
