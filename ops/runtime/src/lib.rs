//! What both tunnelfleet daemons (agent and coordinator) share at run time, and nothing else:
//! no SSH sessions, no profile logic, so the coordinator links none of the agent's machinery.
//!
//! # Layout
//! - [`backoff`]: exponential backoff with full jitter (agents reconnecting, store changes
//!   that lost a race).
//! - [`shutdown`]: SIGTERM and SIGINT as one cancellation token.
//! - [`systemd`]: `Type=notify` readiness, the watchdog, STOPPING.
//! - [`telemetry`]: logging setup (human or JSON) and OTLP span export.
//! - [`metrics`]: the Prometheus registry fed by OpenTelemetry behind each `/metrics`.
//! - [`serve`]: HTTP listeners with bounds: connections overall and per address, TLS
//!   handshake, request head and whole-request timeouts.
//! - [`frames`]: control-link frames read off a QUIC stream (both ends).
//! - [`pem`]: certificates and keys from PEM files, and the ring crypto provider.
//! - [`secret`]: key and secret files refused when group or others can read them.
//! - [`sshkey`]: ed25519 OpenSSH keys made and shown (the SSH user CA, an agent's own key).
//! - [`clock`]: wall-clock milliseconds for records and reports.
//! - [`banner`]: the SSH identification line (OMA probes, `net check`).
//! - [`memory`]: free memory handed back to the system after a peak (glibc's `malloc_trim`).

pub mod backoff;
pub mod banner;
pub mod clock;
pub mod frames;
pub mod memory;
pub mod metrics;
pub mod pem;
pub mod secret;
pub mod serve;
pub mod shutdown;
pub mod sshkey;
pub mod systemd;
pub mod telemetry;
