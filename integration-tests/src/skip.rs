//! Skips that show. A test that cannot run here (no sshd, not root) says so on the process's
//! real stderr, which the test harness does not capture, so the line appears in the run's
//! output beside `ok` instead of vanishing with the passing test's captured output. Under CI a
//! missing component is a failure instead (see each `available`).

use std::io::Write;

/// Reports that the running test (the harness names its thread after it; `what` is the
/// caller's label) was skipped and why, where the run's reader sees it.
pub fn skipped(what: &str, why: &str) {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or(what);
    // `eprintln!` goes to the harness's capture buffer (shown only for failures); a write to
    // the stderr handle itself is not captured.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test} ({what}): {why}");
}
