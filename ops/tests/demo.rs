//! `tunnelfleet demo` as a test: it must run with nothing set up, fail over, and clean up.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_fails_over_and_leaves_nothing_behind() {
    let before: Vec<_> = demo_dirs();
    // The components' logs, shown with the narration if the demo fails.
    let logs = std::env::temp_dir().join(format!("demo-test-{}.log", std::process::id()));
    let _telemetry = tunnelfleet_runtime::telemetry::init_to_file(
        std::fs::File::create(&logs).unwrap(),
        "info",
        "tunnelfleet-demo-test",
    );
    let mut out = Vec::new();
    let result = tunnelfleet_ops::demo::run(&mut out).await;
    let text = String::from_utf8(out).unwrap();
    let report = result.unwrap_or_else(|e| {
        let log = std::fs::read_to_string(&logs).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(300).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "demo: {e:?}\n--- what it said ---\n{text}\n--- its last log lines ({}) ---\n{}",
            logs.display(),
            tail.join("\n")
        )
    });
    let _ = std::fs::remove_file(&logs);
    assert!(text.contains("\"oma-a api ok\""), "{text}");
    assert!(text.contains("\"oma-b api ok\""), "{text}");
    assert!(
        text.contains("reverse GET /health -> \"vma api ok\""),
        "{text}"
    );
    // Failed over to the standby, and back to the primary after the stable period.
    assert!(text.contains("standby #1, ACTIVE"), "{text}");
    assert!(
        text.contains(&format!("endpoint {} (primary)", report.final_endpoint)),
        "{text}"
    );
    assert!(report.nbd_bytes > 0);
    assert!(report.failover_s > 0.0);
    assert_eq!(report.agents, 3);
    assert!(text.contains("FIRING [oma_down]"), "{text}");
    assert!(text.contains("RESOLVED [oma_down]"), "{text}");
    // Two incidents (silent, then loud), each failed over and back: four group moves; three
    // alerts (the halted rollout and the two incidents), each fired and resolved: six
    // deliveries, as Prometheus sees them and as the closing summary says.
    assert_eq!(report.failovers, 4, "{text}");
    assert!(
        text.contains("tunnelfleet_oma_failovers_total{group=\"oma\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("tunnelfleet_hook_deliveries_total{hook=\"ops-webhook\"} 6"),
        "{text}"
    );
    assert_eq!(report.alerts_delivered, 6, "{text}");
    // The bad change halted at its canary, which came back; the others never had it.
    assert_eq!(report.rollout_halted_at, ["vma-1"], "{text}");
    assert!(
        text.contains("(HALTED)") && text.contains("never received the bad one"),
        "{text}"
    );
    // The silent failure is noticed by timeouts, the loud one at once.
    assert!(report.failover_s > report.loud_failover_s, "{text}");
    // The summary agrees with what happened.
    let done = text.lines().find(|l| l.starts_with("done:")).unwrap();
    assert!(
        done.contains(&format!("on version {}", report.version))
            && done.contains("4 group moves")
            && done.contains("6 webhook deliveries"),
        "{done}"
    );
    assert!(text.contains("fleet page   http://127.0.0.1:"), "{text}");
    // The story is plain text: no terminal escapes.
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.contains("acknowledged by every agent"), "{text}");
    assert!(
        text.contains("the open NBD connection still echoes"),
        "{text}"
    );
    assert_eq!(demo_dirs(), before, "the demo left its temp dir behind");
}

fn demo_dirs() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tunnelfleet-demo-"))
        })
        .collect();
    v.sort();
    v
}
