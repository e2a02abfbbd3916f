//! Several coordinators on one etcd: one leads, the others follow; the leader's writes are
//! fenced by its lease, so a leader whose lease is gone cannot land a write after another one
//! took over; a leader that leaves hands over within the lease's TTL.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod on_etcd;
