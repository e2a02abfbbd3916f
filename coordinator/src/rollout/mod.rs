//! Staged rollouts of profile changes: the new version goes to canaries first, then in waves,
//! each stage promoted only once every one of its agents has applied it, has every session up,
//! every forward bound and every health check passing, for the whole wait. Any failure halts:
//! the failed agents get the previous version back at once, later stages never get the new
//! one, a `rollout_halted` alert says who and why; `rollout resume` or `rollout abort` decide.
//!
//! # Layout
//! - [`plan`]: which agents are canaries and which go in which wave (spread over sites), no IO.
//! - [`judge`]: one agent of a stage from what the coordinator knows of it: good, not yet, or
//!   failed and why; no IO, no clock of its own.
//! - [`driver`]: the task that promotes, halts and finishes rollouts, and the operator's
//!   `start`, `resume` and `abort`.
//!
//! Durable: the stage reached is written before any agent of it is pushed the new version, so
//! after a restart no agent beyond it gets it; the wait of the stage in progress starts again
//! (it is only ever waited in full, while watched).

pub mod driver;
pub mod judge;
pub mod plan;

pub use driver::{Rollouts, StartError, StartRequest};
pub use plan::{Canary, plan_stages};
