//! What only the sled store has: stores written by older and newer coordinators (the schema
//! check, migrations, indexes built at open), made with sled itself. The tests every engine
//! passes are in integration-tests (`tests/store.rs`), on sled and on etcd.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use tunnelfleet_coordinator::store::Store;

/// Opens the store once the previous handle in this process has released sled's file lock
/// (its background flusher lets go a moment after the drop).
fn open_when_released(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    }
}

#[tokio::test]
async fn a_store_from_a_newer_coordinator_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"schema_version", &99u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let e = loop {
        // The handle above lets go of sled's file lock a moment after its drop.
        let e = Store::open(dir.path()).err().unwrap().to_string();
        if !e.contains("could not acquire lock") || std::time::Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(
        e.contains("schema version 99") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

/// A profile as a protocol-3 coordinator stored it (durations as `*_ms`).
const V3_PROFILE: &str = r#"{"name":"oma","group":null,"description":"","endpoints":["oma-a:443"],"user":"vma","identity_file":"/etc/tunnelfleet/id","known_hosts":"/etc/tunnelfleet/known_hosts","host_key_fingerprints":[],"trust_on_first_use":false,"forwards":["L 8082:localhost:8082"],"connect_timeout_ms":15000,"keepalive_interval_ms":2000,"keepalive_count":3,"reconnect_min_ms":500,"reconnect_max_ms":30000,"failover_after":3,"health":{"http":"http://localhost:8082/health","tcp":null,"interval_ms":60000,"timeout_ms":5000,"threshold":3},"jump":[]}"#;

#[tokio::test]
async fn a_schema_1_store_is_migrated_profiles_and_history_alike() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"schema_version", &1u64.to_be_bytes())
            .unwrap();
        db.open_tree("profiles")
            .unwrap()
            .insert(b"oma", V3_PROFILE.as_bytes())
            .unwrap();
        let rev = format!(
            r#"{{"version":7,"at_unix_ms":1,"what":"profile oma applied","profiles":[{V3_PROFILE}],"assignments":[]}}"#
        );
        db.open_tree("history")
            .unwrap()
            .insert(7u64.to_be_bytes(), rev.as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let store = open_when_released(dir.path());
    let p = &store.profiles().unwrap()[0];
    assert_eq!(p.keepalive_interval, std::time::Duration::from_secs(2));
    assert_eq!(
        p.health.as_ref().unwrap().interval,
        std::time::Duration::from_secs(60)
    );
    assert_eq!(&store.revision(7).unwrap().profiles[0], p);
    drop(store);
    // Opened again: already schema 2, nothing to do, same data.
    let store = open_when_released(dir.path());
    assert_eq!(&store.profiles().unwrap()[0], p);
}

/// Firing alerts are read through their own index: resolved ones drop out of it, a reopen
/// keeps it, and a store written before the index existed gets it built at open.
#[tokio::test]
async fn firing_alerts_are_read_through_an_index_kept_across_reopen_and_built_for_old_stores() {
    use tunnelfleet_coordinator::store::{Alert, AlertKind};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let a = Alert::firing(
            AlertKind::TunnelHealth,
            format!("vma-{i}/oma"),
            "failing".into(),
            vec![format!("vma-{i}")],
        );
        ids.push(store.fire_alert(a, &[]).await.unwrap().id);
    }
    store.resolve_alert(ids[1], &[]).await.unwrap();
    store.resolve_alert(ids[3], &[]).await.unwrap();
    store.ack_alert(ids[2], "ops").await.unwrap();
    let firing =
        |s: &Store| -> Vec<u64> { s.alerts(false).unwrap().iter().map(|a| a.id).collect() };
    assert_eq!(firing(&store), vec![ids[4], ids[2], ids[0]]);
    assert_eq!(store.alerts(true).unwrap().len(), 5);
    drop(store);
    let store = open_when_released(dir.path());
    assert_eq!(firing(&store), vec![ids[4], ids[2], ids[0]]);
    drop(store);

    // As a store of the previous version left it: no index, no marker.
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        db.drop_tree("firing").unwrap();
        db.open_tree("meta")
            .unwrap()
            .remove("firing_indexed")
            .unwrap();
        db.flush().unwrap();
    }
    let store = open_when_released(dir.path());
    assert_eq!(firing(&store), vec![ids[4], ids[2], ids[0]]);
}
