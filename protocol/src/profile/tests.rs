//! The profile model: defaults, the wire, groups, sets.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use super::*;

fn seed() -> ProfileSpec {
    toml::from_str(
        r#"name = "oma"
endpoints = ["oma-a:443", "oma-b:443"]
user = "vma"
identity_file = "/k"
known_hosts = "/kh"
forwards = ["L 8082:localhost:8082", "R 9081:localhost:8081"]
jump = ["ops@bastion:2222"]
[health]
http = "http://localhost:8082/health"
"#,
    )
    .unwrap()
}

#[test]
fn new_has_the_defaults_a_file_gets() {
    let from_file: ProfileSpec =
        toml::from_str("name = \"a\"\nuser = \"u\"\nidentity_file = \"/k\"\nforwards = []\n")
            .unwrap();
    assert_eq!(ProfileSpec::new("a", "u", "/k"), from_file);
}

#[test]
fn defaults_and_the_health_target() {
    let p = seed();
    p.validate_runnable().unwrap();
    assert_eq!(p.connect_timeout, Duration::from_secs(15));
    // The README's defaults: three keepalives missed, three failed connects before a move.
    assert_eq!((p.keepalive_count, p.failover_after), (3, 3));
    assert_eq!(p.endpoint_addrs().unwrap()[1], ("oma-b".into(), 443));
    let h = p.health.as_ref().unwrap();
    assert_eq!((h.threshold, h.interval), (3, Duration::from_secs(10)));
    assert_eq!(
        h.target().unwrap().describe(),
        "GET http://localhost:8082/health"
    );
}

#[test]
fn a_profile_survives_the_wire_and_bad_pushes_are_refused_with_the_key() {
    let p = seed();
    let frame = crate::encode(&p).unwrap();
    let back: ProfileSpec = crate::decode(&frame[4..]).unwrap();
    assert_eq!(back, p);
    let json: ProfileSpec = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(json, p);
    let mut bad = p.clone();
    bad.forwards.push("L nope".into());
    let e = bad.validate_runnable().unwrap_err();
    assert_eq!(e.key, "forwards[2]");
    assert!(e.reason.contains("L nope"), "{e}");
    bad = p;
    bad.host_key_fingerprints.clear();
    bad.known_hosts = None;
    assert_eq!(bad.validate_runnable().unwrap_err().key, "known_hosts");
}

/// Every refusal of a single profile, each naming its key: a profile that breaks one rule is
/// refused for that rule, and the seed itself passes.
#[test]
fn each_rule_refuses_with_its_key() {
    type Break = fn(&mut ProfileSpec);
    let cases: &[(&str, Break)] = &[
        ("user", |p| p.user.clear()),
        ("forwards", |p| p.forwards.clear()),
        ("forwards[2]", |p| {
            p.forwards.push("R 9081:localhost:9999".into())
        }),
        ("connect_timeout", |p| p.connect_timeout = Duration::ZERO),
        ("keepalive_interval", |p| {
            p.keepalive_interval = Duration::ZERO
        }),
        ("keepalive_count", |p| p.keepalive_count = 0),
        ("reconnect_min", |p| p.reconnect_min = Duration::ZERO),
        ("reconnect_max", |p| {
            p.reconnect_max = p.reconnect_min - Duration::from_millis(1)
        }),
        ("failover_after", |p| p.failover_after = 0),
        ("failback_after", |p| p.failback_after = Duration::ZERO),
        ("health.threshold", |p| {
            p.health.as_mut().unwrap().threshold = 0
        }),
        ("health.interval", |p| {
            p.health.as_mut().unwrap().interval = Duration::ZERO
        }),
        ("health.timeout", |p| {
            p.health.as_mut().unwrap().timeout = Duration::ZERO
        }),
    ];
    seed().validate_runnable().unwrap();
    for (key, break_it) in cases {
        let mut p = seed();
        break_it(&mut p);
        let e = p.validate_runnable().unwrap_err();
        assert_eq!(e.key, *key, "{e}");
    }
    // The refusal of a remote port twice says which; port 0 (the server picks) may repeat.
    let mut p = seed();
    p.forwards.push("R 9081:localhost:9999".into());
    let e = p.validate_runnable().unwrap_err();
    assert!(
        e.reason.contains("remote port 9081 is forwarded twice"),
        "{e}"
    );
    let mut p = seed();
    p.forwards.push("R 0:localhost:9998".into());
    p.forwards.push("R 0:localhost:9999".into());
    p.validate_runnable().unwrap();
    // At the boundaries the values pass: one keepalive, one failure, the shortest backoff.
    let mut p = seed();
    p.keepalive_count = 1;
    p.failover_after = 1;
    p.reconnect_max = p.reconnect_min;
    p.validate_runnable().unwrap();
}

#[test]
fn a_group_resolves_once_active_first_without_duplicates() {
    let mut p = seed();
    p.group = Some("pair".into());
    p.endpoints = vec!["oma-b:443".into(), "spare:22".into()];
    let r = p.resolved(&["oma-b:443".into(), "oma-a:443".into()]);
    assert_eq!(r.endpoints, ["oma-b:443", "oma-a:443", "spare:22"]);
    p.endpoints.clear();
    p.validate().unwrap();
    assert_eq!(p.validate_runnable().unwrap_err().key, "endpoints");
}

#[test]
fn a_set_refuses_a_name_twice_and_a_local_port_twice() {
    let a = seed();
    let mut b = seed();
    b.name = "b".into();
    b.forwards = vec!["L 8082:x:1".into()];
    let e = validate_set(&[a.clone(), b]).unwrap_err();
    assert_eq!(e.key, "profile.b.forwards[0]");
    assert!(e.reason.contains("profile.oma.forwards[0]"), "{e}");
    assert_eq!(
        validate_set(&[a.clone(), a]).unwrap_err().key,
        "profile.oma.name"
    );
}

#[test]
fn the_parsed_forwards_and_jump_hosts_are_the_written_ones() {
    let p = seed();
    let forwards: Vec<String> = p
        .forward_specs()
        .unwrap()
        .iter()
        .map(|f| f.to_string())
        .collect();
    assert_eq!(
        forwards,
        [
            "L 127.0.0.1:8082:localhost:8082",
            "R localhost:9081:localhost:8081"
        ]
    );
    let jumps = p.jump_hosts().unwrap();
    assert_eq!(jumps.len(), 1);
    assert_eq!((jumps[0].host.as_str(), jumps[0].port), ("bastion", 2222));
}

#[test]
fn a_list_at_its_bound_passes_and_one_more_is_refused() {
    let mut p = seed();
    p.forwards = (0..crate::limits::MAX_FORWARDS)
        .map(|i| format!("L {}:localhost:1", 10_000 + i))
        .collect();
    p.validate().unwrap();
    p.forwards.push("L 20000:localhost:1".into());
    let e = p.validate().unwrap_err();
    assert_eq!(e.key, "forwards");
    assert!(e.reason.contains("65 given; at most 64"), "{e}");
}

#[test]
fn pinned_fingerprints_alone_are_trust_enough() {
    let mut p = seed();
    p.known_hosts = None;
    p.host_key_fingerprints = vec![format!("SHA256:{}", "A".repeat(43))];
    p.validate().unwrap();
    p.trust_on_first_use = true;
    assert_eq!(p.validate().unwrap_err().key, "trust_on_first_use");
}

#[test]
fn only_forwards_listening_beyond_loopback_are_exposed() {
    let mut p = seed();
    p.forwards = vec![
        "L 8082:localhost:8082".into(),
        "L 0.0.0.0:8083:localhost:8083".into(),
        "D 127.0.0.1:1080".into(),
        "D 10.0.0.5:1081".into(),
        "R 9081:localhost:8081".into(),
    ];
    let exposed: Vec<String> = ["L 0.0.0.0:8083:localhost:8083", "D 10.0.0.5:1081"]
        .iter()
        .map(|f| ForwardSpec::parse(f).unwrap().to_string())
        .collect();
    assert_eq!(p.exposed_forwards(), exposed);
}
