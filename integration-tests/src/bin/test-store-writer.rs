//! The writer of the store's kill -9 test (`tests/store_kill.rs`): opens the coordinator's
//! store in the directory given as its argument and writes profiles forever, printing
//! `acked VERSION NAME` after each write the store acknowledged, until it is killed.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = std::env::args()
        .nth(1)
        .context("usage: test-store-writer DIR")?;
    let store = tunnelfleet_coordinator::store::Store::open(std::path::Path::new(&dir))?;
    for i in 0u64.. {
        let name = format!("p{i}");
        let v = store
            .put_profile(&integration_tests::profile_spec(
                &name,
                &["L 8082:localhost:8082"],
            ))
            .await?;
        println!("acked {v} {name}");
    }
    Ok(())
}
