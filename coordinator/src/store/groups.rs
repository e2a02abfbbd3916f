//! OMA groups: the redundant endpoints of one OMA pair, which one is active, which are
//! drained. The operator defines them; failover, failback and drains move `active`.
use super::model::{GroupEdit, OmaGroup};
use super::{Store, StoreError, decode, decode_all};

impl Store {
    /// Every OMA group, by name.
    pub fn groups(&self) -> Result<Vec<OmaGroup>, StoreError> {
        decode_all(&self.groups, "groups")
    }

    /// One OMA group.
    pub fn group(&self, name: &str) -> Result<Option<OmaGroup>, StoreError> {
        self.groups
            .get(name.as_bytes())?
            .map(|v| decode(&v, "groups", name))
            .transpose()
    }

    /// Creates or replaces a group's definition, keeping its active endpoint and drains when
    /// they still belong to it; returns the new fleet version once durable.
    pub async fn put_group(&self, def: &OmaGroup) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_groups(|base| {
                let mut g = def.clone();
                if let Some(old) = base.groups.get(&g.name) {
                    g.active = old.active.clone().filter(|a| g.endpoints.contains(a));
                    g.pinned = old.pinned && g.active.is_some();
                    g.drained = old
                        .drained
                        .iter()
                        .filter(|d| g.endpoints.contains(d))
                        .cloned()
                        .collect();
                } else {
                    g.active = None;
                    g.drained.clear();
                    g.pinned = false;
                }
                Ok(GroupEdit {
                    what: format!("OMA group {} applied", g.name),
                    writes: vec![(g.name.clone(), Some(g))],
                    value: (),
                })
            })
            .await?;
        Ok(version)
    }

    /// Deletes a group no profile names; returns the new fleet version once durable.
    pub async fn delete_group(&self, name: &str) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_groups(|base| {
                if !base.groups.contains_key(name) {
                    return Err(StoreError::NoGroup(name.to_string()));
                }
                let users: Vec<String> = base
                    .profiles
                    .values()
                    .filter(|p| p.group.as_deref() == Some(name))
                    .map(|p| p.name.clone())
                    .collect();
                if !users.is_empty() {
                    return Err(StoreError::GroupInUse {
                        group: name.to_string(),
                        profiles: users,
                    });
                }
                Ok(GroupEdit {
                    what: format!("OMA group {name} deleted"),
                    writes: vec![(name.to_string(), None)],
                    value: (),
                })
            })
            .await?;
        Ok(version)
    }

    /// Makes `endpoint` the active endpoint of `group` (the coordinator's failover and
    /// failback, and the operator's); returns the new fleet version once durable.
    pub async fn set_active(
        &self,
        group: &str,
        endpoint: &str,
        why: &str,
        pinned: bool,
    ) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_groups(|base| {
                let mut g = base
                    .groups
                    .get(group)
                    .cloned()
                    .ok_or_else(|| StoreError::NoGroup(group.to_string()))?;
                let from = g.active().unwrap_or_default().to_string();
                g.active = Some(endpoint.to_string());
                g.pinned = pinned;
                Ok(GroupEdit {
                    what: format!(
                        "OMA group {group}: active endpoint {from} -> {endpoint} ({why})"
                    ),
                    writes: vec![(group.to_string(), Some(g))],
                    value: (),
                })
            })
            .await?;
        Ok(version)
    }

    /// Marks `endpoint` drained (or not) in every group that has it; returns the new fleet
    /// version and the groups changed.
    pub async fn set_drained(
        &self,
        endpoint: &str,
        drained: bool,
    ) -> Result<(u64, Vec<String>), StoreError> {
        self.change_groups(|base| {
            let mut writes = Vec::new();
            for g in base.groups.values() {
                if !g.endpoints.iter().any(|e| e == endpoint) {
                    continue;
                }
                let mut g = g.clone();
                if drained {
                    g.drained.insert(endpoint.to_string());
                } else {
                    g.drained.remove(endpoint);
                }
                writes.push((g.name.clone(), Some(g)));
            }
            if writes.is_empty() {
                return Err(StoreError::NoEndpoint(endpoint.to_string()));
            }
            let verb = if drained { "drained" } else { "undrained" };
            Ok(GroupEdit {
                what: format!("OMA endpoint {endpoint} {verb}"),
                value: writes.iter().map(|(n, _)| n.clone()).collect(),
                writes,
            })
        })
        .await
    }
}
