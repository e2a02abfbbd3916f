//! Carrying out what the rules decided: alerts with their outbox entries, group moves stored
//! and pushed, events logged.

use super::*;

impl Watcher {
    /// Carries out the monitor's decisions; the first store failure is returned (and logged).
    pub(super) async fn exec(&mut self, actions: Vec<Action>) -> Result<(), StoreError> {
        let mut result = Ok(());
        let hooks = self.handle.outbox.names();
        let mut woke = false;
        for a in actions {
            let r = match a {
                Action::Fire {
                    kind,
                    subject,
                    summary,
                    affected,
                } => {
                    let key = alert_key(kind, &subject);
                    if self.alert_ids.contains_key(&key) {
                        continue;
                    }
                    if let Some(agent) = self.per_agent.full(kind, &affected) {
                        if let Some(m) = &self.metrics {
                            m.alerts_held
                                .add(1, &[opentelemetry::KeyValue::new("kind", kind.as_str())]);
                        }
                        self.monitor.not_fired(kind, &subject);
                        if self.per_agent.hold(agent) {
                            tracing::warn!(agent = %agent, kind = kind.as_str(), subject = %subject, "{MAX_ALERTS_PER_AGENT} alerts firing for this agent already; holding further ones until some resolve");
                        }
                        continue;
                    }
                    let alert = Alert::firing(kind, subject, summary, affected);
                    match self.store.fire_alert(alert, &hooks).await {
                        Ok(a) => {
                            tracing::warn!(alert = a.id, kind = a.kind.as_str(), subject = %a.subject, silenced = a.silenced, "alert firing: {}", a.summary);
                            if a.silenced {
                                self.silenced.insert(key.clone(), a.id);
                            }
                            self.per_agent.fired(&key, a.kind, &a.affected_agents);
                            self.alert_ids.insert(key, a.id);
                            if let Some(m) = &self.metrics {
                                m.alerts_fired.add(
                                    1,
                                    &[opentelemetry::KeyValue::new("kind", a.kind.as_str())],
                                );
                            }
                            woke = true;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Action::Resolve { kind, subject } => {
                    let key = alert_key(kind, &subject);
                    self.silenced.remove(&key);
                    let Some(id) = self.alert_ids.remove(&key) else {
                        continue;
                    };
                    self.per_agent.resolved(&key);
                    match self.store.resolve_alert(id, &hooks).await {
                        Ok(a) => {
                            tracing::info!(alert = a.id, kind = a.kind.as_str(), subject = %a.subject, "alert resolved: {}", a.summary);
                            woke = true;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Action::SetActive {
                    group,
                    endpoint,
                    reason,
                    pinned,
                } => match self
                    .store
                    .set_active(&group, &endpoint, &reason, pinned)
                    .await
                {
                    Ok(version) => {
                        tracing::warn!(group = %group, endpoint = %endpoint, version, "OMA group moved: {reason}");
                        if let Some(m) = &self.metrics {
                            m.failovers
                                .add(1, &[opentelemetry::KeyValue::new("group", group.clone())]);
                        }
                        self.fleet.push_changed().map(|_| ())
                    }
                    Err(e) => {
                        // Keep the rules in line with what is stored.
                        self.refresh_groups();
                        Err(e)
                    }
                },
                Action::Event(text) => {
                    tracing::info!("{text}");
                    self.store.log_event(&text).await
                }
            };
            if let Err(e) = r {
                tracing::error!("watcher: {e}");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        if woke {
            self.handle.outbox.wake();
        }
        *self.handle.view.lock().unwrap_or_else(|p| p.into_inner()) =
            self.monitor.view(Instant::now());
        result
    }
}

pub(super) fn describe(a: &Action) -> String {
    match a {
        Action::SetActive {
            group,
            endpoint,
            reason,
            ..
        } => format!("group {group} -> {endpoint} ({reason})"),
        other => format!("{other:?}"),
    }
}
