//! The writer of the store's kill -9 test (`tests/store_kill.rs`): opens the coordinator's
//! store in the directory given as its first argument and writes forever, printing
//! `acked ID NAME` after each write the store acknowledged, until it is killed. What it writes
//! is the second argument: `profiles` (the default; ID is the fleet version) or `alerts`
//! (alerts fired with a delivery to hook `ops` queued in the outbox; ID is the alert's).

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    use tunnelfleet_coordinator::store::{Alert, AlertKind};
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: test-store-writer DIR [profiles|alerts]")?;
    let what = args.next().unwrap_or_else(|| "profiles".into());
    let store = tunnelfleet_coordinator::store::Store::open(std::path::Path::new(&dir))?;
    for i in 0u64.. {
        match what.as_str() {
            "profiles" => {
                let name = format!("p{i}");
                let v = store
                    .put_profile(&integration_tests::profile_spec(
                        &name,
                        &["L 8082:localhost:8082"],
                    ))
                    .await?;
                println!("acked {v} {name}");
            }
            "alerts" => {
                let subject = format!("oma-{i}:22");
                let a = store
                    .fire_alert(
                        Alert::firing(AlertKind::OmaDown, subject.clone(), "down".into(), vec![]),
                        &["ops".into()],
                    )
                    .await?;
                println!("acked {} {subject}", a.id);
            }
            other => anyhow::bail!("{other}: write profiles or alerts"),
        }
    }
    Ok(())
}
