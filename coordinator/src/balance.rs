//! Spreading the agents over the coordinators of an HA set.
//!
//! Agents start at a random configured coordinator and stay on the one they reached; when a
//! coordinator dies its agents relink to the others and, without this, stay there. After a
//! rolling restart the coordinator restarted last sits idle while one of the others holds
//! most of the fleet (its memory and its share of the work grow with it). So every
//! coordinator compares, every [`EVERY`], the links it holds with those of the others (their
//! agents' live records in the store, only of coordinators registered now): one holding more
//! than its share plus a slack closes a few of its links with
//! [`tunnelfleet_protocol::close::REBALANCE`], and those
//! agents link to another configured coordinator picked at random (never this one first).
//!
//! Bounded so that it never becomes a storm: at most [`STEP_PERCENT`] of the fleet's links per
//! round and coordinator, only links older than [`SETTLED`], and an agent that came straight
//! back after it was asked (it knows only this coordinator, or reaches no other) is not asked
//! again for [`NOT_AGAIN`]; one that went elsewhere and came back later (its coordinator died)
//! may be. The rule ([`surplus`], [`pick`]) has no IO; [`run`] carries it out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

/// How often a coordinator compares its links with the others'.
pub const EVERY: Duration = Duration::from_secs(10);
/// A link this young is not moved (it may have just been moved here).
pub const SETTLED: Duration = Duration::from_secs(60);
/// An agent that came straight back after it was asked to move is not asked again for this
/// long.
pub const NOT_AGAIN: Duration = Duration::from_secs(600);
/// At most this share of the fleet's links is moved per round by one coordinator.
pub const STEP_PERCENT: usize = 5;
/// A coordinator within this share above its fair share keeps its links (no flapping over a
/// few agents).
pub const SLACK_PERCENT: usize = 5;
/// Nor does it move any while it holds at most this many above its share.
pub const SLACK_MIN: usize = 2;

/// How many of its `mine` links a coordinator asks to move when the other coordinators
/// registered now hold `others` each: down to the fair share (the fleet's links over the
/// coordinators, rounded up), once it holds more than that plus the slack, at most
/// [`STEP_PERCENT`] of the fleet's links (at least one) per round.
pub fn surplus(mine: usize, others: &[usize]) -> usize {
    if others.is_empty() {
        return 0;
    }
    let total = mine + others.iter().sum::<usize>();
    let fair = total.div_ceil(others.len() + 1);
    let slack = (fair * SLACK_PERCENT / 100).max(SLACK_MIN);
    if mine <= fair + slack {
        return 0;
    }
    let step = (total * STEP_PERCENT / 100).max(1);
    (mine - fair).min(step)
}

/// Which `n` of the linked agents (`(id, linked since, Unix ms)`) to ask: links settled for
/// [`SETTLED`], except an agent's that it made within [`SETTLED`] of being asked (`asked`: when
/// each was, Unix ms; it came straight back) while that was less than [`NOT_AGAIN`] ago; the
/// longest linked first (ties by id), so a round's choice is the same on any run.
pub fn pick(
    linked: &[(String, u64)],
    asked: &HashMap<String, u64>,
    now_unix_ms: u64,
    n: usize,
) -> Vec<String> {
    let settled = SETTLED.as_millis() as u64;
    let again = NOT_AGAIN.as_millis() as u64;
    let mut eligible: Vec<&(String, u64)> = linked
        .iter()
        .filter(|(_, since)| now_unix_ms.saturating_sub(*since) >= settled)
        .filter(|(id, since)| {
            asked.get(id).is_none_or(|&t| {
                let came_back = *since < t.saturating_add(settled);
                !came_back || now_unix_ms.saturating_sub(t) >= again
            })
        })
        .collect();
    eligible.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    eligible
        .into_iter()
        .take(n)
        .map(|(id, _)| id.clone())
        .collect()
}

/// The links each other coordinator registered now holds, from the agents' live records
/// (the latest link of an agent is where it is); agents linked here count as here.
fn others(fleet: &Fleet, me: &str, here: &BTreeSet<String>) -> Option<Vec<usize>> {
    let living: BTreeSet<String> = match fleet.store.coordinators() {
        Ok(c) => c.into_iter().map(|c| c.name).collect(),
        Err(e) => {
            tracing::debug!("balance: {e}");
            return None;
        }
    };
    // Not registered (cut off from etcd): it cannot tell what the others hold.
    if !living.contains(me) {
        return None;
    }
    let mut count: BTreeMap<&str, usize> = living
        .iter()
        .filter(|c| c.as_str() != me)
        .map(|c| (c.as_str(), 0))
        .collect();
    let latest = match fleet.store.latest_live(me) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("balance: {e}");
            return None;
        }
    };
    for (agent, r) in &latest {
        if r.connected
            && !here.contains(agent)
            && let Some(n) = count.get_mut(r.coordinator.as_str())
        {
            *n += 1;
        }
    }
    Some(count.into_values().collect())
}

/// Every [`EVERY`] until `shutdown`: asks this coordinator's surplus of links to move.
pub async fn run(fleet: Arc<Fleet>, me: String, shutdown: CancellationToken) {
    let mut asked: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        round(
            &fleet,
            &me,
            &mut asked,
            tunnelfleet_runtime::clock::now_unix_ms(),
        );
    }
}

/// One round at `now_unix_ms`: the agents asked to move (`asked` remembers when each was).
pub fn round(
    fleet: &Fleet,
    me: &str,
    asked: &mut HashMap<String, u64>,
    now_unix_ms: u64,
) -> Vec<String> {
    asked.retain(|_, t| now_unix_ms.saturating_sub(*t) < NOT_AGAIN.as_millis() as u64);
    let linked: Vec<(String, u64)> = fleet
        .links
        .evidence()
        .into_iter()
        .filter(|l| l.connected)
        .map(|l| (l.agent_id, l.since_unix_ms))
        .collect();
    let here: BTreeSet<String> = linked.iter().map(|(id, _)| id.clone()).collect();
    let Some(others) = others(fleet, me, &here) else {
        return Vec::new();
    };
    let n = surplus(linked.len(), &others);
    if n == 0 {
        return Vec::new();
    }
    let chosen = pick(&linked, asked, now_unix_ms, n);
    if chosen.is_empty() {
        return chosen;
    }
    let total = linked.len() + others.iter().sum::<usize>();
    tracing::info!(
        coordinator = %me,
        linked = linked.len(),
        fleet = total,
        coordinators = others.len() + 1,
        moving = chosen.len(),
        "this coordinator holds more than its share of the fleet's links: asking some agents to link to another"
    );
    let reason = format!(
        "coordinator {me} holds {} of {total} agents' links over {} coordinators: link to another",
        linked.len(),
        others.len() + 1
    );
    chosen
        .into_iter()
        .filter(|id| fleet.rebalance(id, &reason))
        .inspect(|id| {
            asked.insert(id.clone(), now_unix_ms);
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_coordinator_or_an_even_fleet_moves_nothing() {
        assert_eq!(surplus(500, &[]), 0, "alone: nowhere to go");
        assert_eq!(surplus(167, &[167, 166]), 0);
        assert_eq!(surplus(0, &[0, 0]), 0);
        assert_eq!(
            surplus(3, &[0, 0]),
            0,
            "one over the share and within the slack"
        );
    }

    #[test]
    fn within_the_slack_stays_and_past_it_moves_down_to_the_share() {
        // 600 over three: share 200, slack 10.
        assert_eq!(surplus(210, &[195, 195]), 0);
        assert_eq!(surplus(211, &[195, 194]), 11);
        // 1,001 over three: the share is rounded up (334), the slack 16.
        assert_eq!(surplus(350, &[326, 325]), 0);
        assert_eq!(surplus(351, &[325, 325]), 17);
        // Small fleets: a slack of two.
        assert_eq!(surplus(4, &[1, 1]), 0);
        assert_eq!(surplus(5, &[0, 0]), 1);
    }

    #[test]
    fn a_round_moves_at_most_a_twentieth_of_the_fleet() {
        // One coordinator holds all 503 after the others restarted: 25 per round.
        assert_eq!(surplus(503, &[0, 0]), 25);
        assert_eq!(surplus(40, &[0]), 2);
        // A fleet smaller than twenty still moves one per round.
        assert_eq!(surplus(10, &[0]), 1);
    }

    #[test]
    fn only_settled_links_not_back_from_a_recent_ask_longest_linked_first() {
        let now = 10_000_000;
        let settled = SETTLED.as_millis() as u64;
        let linked = vec![
            ("young".to_string(), now - settled + 1),
            ("b".to_string(), now - 2 * settled),
            ("a".to_string(), now - 2 * settled),
            ("oldest".to_string(), now - 5 * settled),
            ("asked".to_string(), now - 9 * settled),
            ("asked-long-ago".to_string(), now - 3 * settled),
            // Asked four minutes ago, linked again a moment later: it came straight back.
            ("came-back".to_string(), now - 4 * settled + 1_000),
            // Asked four minutes ago, linked here again two minutes later: it went elsewhere
            // first (that coordinator died, say).
            ("went-elsewhere".to_string(), now - 2 * settled - 1),
        ];
        let again = NOT_AGAIN.as_millis() as u64;
        let mut asked = HashMap::new();
        // Back within a minute of the ask, and not ten minutes ago: left alone.
        asked.insert("asked".to_string(), now - again + 1);
        asked.insert("asked-long-ago".to_string(), now - again);
        asked.insert("came-back".to_string(), now - 4 * settled);
        asked.insert("went-elsewhere".to_string(), now - 4 * settled);
        assert_eq!(
            pick(&linked, &asked, now, 10),
            vec!["oldest", "asked-long-ago", "went-elsewhere", "a", "b"]
        );
        assert_eq!(
            pick(&linked, &asked, now, 2),
            vec!["oldest", "asked-long-ago"]
        );
        assert!(pick(&linked, &asked, now, 0).is_empty());
    }
}
