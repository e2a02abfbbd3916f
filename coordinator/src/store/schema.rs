//! The schema version of the store and the migrations between versions, run at open.
use super::{META_SCHEMA, SCHEMA_VERSION, Store, StoreError, json, u64_of};

impl Store {
    /// Schema 1 to 2: rewrites every stored profile (and every profile in the history) from
    /// protocol 3's `*_ms` form. Each record converts the same way twice, and the schema mark
    /// is written only after the records are flushed, so a crash midway repeats it harmlessly.
    pub(super) fn migrate_profiles_to_v2(&self) -> Result<(), StoreError> {
        let bad = |tree: &'static str, key: String, e: serde_json::Error| StoreError::Corrupt {
            tree,
            key,
            reason: e.to_string(),
        };
        for r in self.profiles.iter() {
            let (k, v) = r?;
            let p = tunnelfleet_protocol::legacy::profile_from_json(&v)
                .map_err(|e| bad("profiles", String::from_utf8_lossy(&k).into(), e))?;
            self.profiles.insert(k, json(&p))?;
        }
        for r in self.history.iter() {
            let (k, v) = r?;
            let key = || u64_of(&k).to_string();
            let mut rev: serde_json::Value =
                serde_json::from_slice(&v).map_err(|e| bad("history", key(), e))?;
            if let Some(list) = rev.get_mut("profiles").and_then(|p| p.as_array_mut()) {
                for p in list.iter_mut() {
                    let bytes = serde_json::to_vec(p).map_err(|e| bad("history", key(), e))?;
                    let spec = tunnelfleet_protocol::legacy::profile_from_json(&bytes)
                        .map_err(|e| bad("history", key(), e))?;
                    *p = serde_json::to_value(&spec).map_err(|e| bad("history", key(), e))?;
                }
            }
            self.history.insert(k, json(&rev))?;
        }
        self.db.flush()?;
        self.meta
            .insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes())?;
        self.db.flush()?;
        tracing::info!("state store migrated to schema {SCHEMA_VERSION}");
        Ok(())
    }
}
