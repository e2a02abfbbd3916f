//! `tunnelfleet demo` as a test: it must run with nothing set up, fail over, and clean up.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_fails_over_and_leaves_nothing_behind() {
    let before: Vec<_> = demo_dirs();
    let mut out = Vec::new();
    let report = tunnelfleet_ops::demo::run(&mut out).await.expect("demo");
    let text = String::from_utf8(out).unwrap();
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
    // Failover and failback counted, both webhook deliveries too, as Prometheus sees them.
    assert!(
        text.contains("tunnelfleet_oma_failovers_total{group=\"oma\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tunnelfleet_hook_deliveries_total{hook=\"ops-webhook\"} 2"),
        "{text}"
    );
    assert_eq!(report.alerts_delivered, 2, "{text}");
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
