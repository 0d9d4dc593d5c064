//! Per-team limits: requests per minute, tokens per minute, requests in flight.
//!
//! Enforced per corral instance (N replicas allow N times the limits). `rpm` and `tpm` are token
//! buckets refilled continuously (a team may burst up to one minute's allowance). A request is
//! admitted while the team's token bucket is above zero and charged, when its response ends, the
//! tokens Ollama reports, so the bucket can go below zero after a long answer and the team waits.

use crate::access::policy::Team;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which limit refused a request (`corral_rate_limited_total{limit}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Rpm,
    Tpm,
    Concurrency,
}

impl Limit {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Limit::Rpm => "rpm",
            Limit::Tpm => "tpm",
            Limit::Concurrency => "concurrency",
        }
    }
}

/// A refusal: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refused {
    pub(crate) limit: Limit,
    pub(crate) retry_after: Duration,
}

impl Refused {
    pub(crate) fn message(&self, team: &Team) -> String {
        match self.limit {
            Limit::Rpm => format!(
                "team `{}` is over its limit of {} requests per minute; retry later",
                team.name, team.rpm
            ),
            Limit::Tpm => format!(
                "team `{}` is over its limit of {} tokens per minute; retry later",
                team.name, team.tpm
            ),
            Limit::Concurrency => format!(
                "team `{}` already has {} requests in flight, its limit; retry when one finishes",
                team.name, team.max_concurrent
            ),
        }
    }
}

/// A continuously refilled bucket holding at most one minute's allowance.
#[derive(Debug, Clone)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(per_minute: f64, now: Instant) -> Bucket {
        Bucket {
            level: per_minute,
            updated: now,
        }
    }

    fn refill(&mut self, per_minute: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * per_minute / 60.0).min(per_minute);
        self.updated = now;
    }

    /// Time until the level reaches `target`.
    fn wait_for(&self, target: f64, per_minute: f64) -> Duration {
        let secs = ((target - self.level).max(0.0) * 60.0 / per_minute).max(0.001);
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

#[derive(Debug, Default)]
struct TeamState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u32,
}

/// The team's state, created on its first request (its name is copied once, not per request).
fn team_state<'a>(teams: &'a mut HashMap<String, TeamState>, name: &str) -> &'a mut TeamState {
    if !teams.contains_key(name) {
        teams.insert(name.to_string(), TeamState::default());
    }
    teams
        .get_mut(name)
        .unwrap_or_else(|| unreachable!("inserted above"))
}

#[derive(Default)]
pub(crate) struct Limiter {
    teams: Mutex<HashMap<String, TeamState>>,
}

/// Held while a request is in flight; frees its concurrency slot when dropped.
pub(crate) struct Slot {
    limiter: Option<Arc<Limiter>>,
    team: String,
    /// The team's rpm, when the request was charged one request of it.
    rpm: Option<u32>,
    /// Whether the request holds one of the team's concurrent places.
    concurrent: bool,
    /// What the request holds in the shared store instead (`[state]`).
    pub(crate) shared: Option<crate::access::shared::Held>,
}

impl Slot {
    /// A request that holds nothing (no limit applies to it).
    pub(crate) fn free() -> Slot {
        Slot {
            limiter: None,
            team: String::new(),
            rpm: None,
            concurrent: false,
            shared: None,
        }
    }

    /// Gives back what the request was charged: it was refused before reaching Ollama (a bad
    /// body, a model the key may not use), and a refused request costs nothing.
    pub(crate) fn refund(mut self) {
        if let Some(held) = self.shared.take() {
            held.refund();
            return;
        }
        let (Some(limiter), Some(rpm)) = (&self.limiter, self.rpm) else {
            return;
        };
        let mut teams = limiter.teams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = teams.get_mut(&self.team).and_then(|t| t.requests.as_mut()) {
            bucket.level = (bucket.level + 1.0).min(f64::from(rpm));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(limiter) = self.limiter.as_ref().filter(|_| self.concurrent) else {
            return;
        };
        let mut teams = limiter.teams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = teams.get_mut(&self.team) {
            t.in_flight = t.in_flight.saturating_sub(1);
        }
    }
}

impl Limiter {
    /// Admits a request of `team`, or says which limit refuses it. The token and concurrency
    /// limits apply to `inference` requests (those that run a model); every request counts
    /// toward `rpm`.
    pub(crate) fn admit(self: &Arc<Self>, team: &Team, inference: bool) -> Result<Slot, Refused> {
        self.admit_at(team, inference, Instant::now)
    }

    /// [`Limiter::admit`], with the clock read only when a limit applies.
    pub(crate) fn admit_at(
        self: &Arc<Self>,
        team: &Team,
        inference: bool,
        now: impl FnOnce() -> Instant,
    ) -> Result<Slot, Refused> {
        let rpm = (team.rpm > 0).then_some(team.rpm);
        if !inference && rpm.is_none() {
            // Nothing to charge and no place to hold: no lock, no clock.
            return Ok(Slot::free());
        }
        let now = now();
        let mut teams = self.teams.lock().unwrap_or_else(|e| e.into_inner());
        let state = team_state(&mut teams, &team.name);
        if inference && team.tpm > 0 {
            let tpm = team.tpm as f64;
            let bucket = state.tokens.get_or_insert_with(|| Bucket::full(tpm, now));
            bucket.refill(tpm, now);
            if bucket.level <= 0.0 {
                return Err(Refused {
                    limit: Limit::Tpm,
                    retry_after: bucket.wait_for(1.0, tpm),
                });
            }
        }
        if inference && team.max_concurrent > 0 && state.in_flight >= team.max_concurrent {
            // No good estimate: streams end when they end. One second is a polite retry.
            return Err(Refused {
                limit: Limit::Concurrency,
                retry_after: Duration::from_secs(1),
            });
        }
        if team.rpm > 0 {
            let rpm = team.rpm as f64;
            let bucket = state.requests.get_or_insert_with(|| Bucket::full(rpm, now));
            bucket.refill(rpm, now);
            if bucket.level < 1.0 {
                return Err(Refused {
                    limit: Limit::Rpm,
                    retry_after: bucket.wait_for(1.0, rpm),
                });
            }
            bucket.level -= 1.0;
        }
        if inference {
            state.in_flight += 1;
        }
        Ok(Slot {
            limiter: Some(self.clone()),
            team: team.name.clone(),
            rpm,
            concurrent: inference,
            shared: None,
        })
    }

    /// Charges the tokens a finished request used.
    pub(crate) fn charge(&self, team: &Team, tokens: u64) {
        self.charge_at(team, tokens, Instant::now);
    }

    /// [`Limiter::charge`], with the clock read only when the team has a token limit.
    pub(crate) fn charge_at(&self, team: &Team, tokens: u64, now: impl FnOnce() -> Instant) {
        if team.tpm == 0 || tokens == 0 {
            return;
        }
        let now = now();
        let mut teams = self.teams.lock().unwrap_or_else(|e| e.into_inner());
        let tpm = team.tpm as f64;
        let state = team_state(&mut teams, &team.name);
        let bucket = state.tokens.get_or_insert_with(|| Bucket::full(tpm, now));
        bucket.refill(tpm, now);
        // Debt is capped at an hour of the team's budget: one huge answer (or a broken count
        // from upstream) cannot lock a team out for longer.
        bucket.level = (bucket.level - tokens as f64).max(-60.0 * tpm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TeamConfig;

    fn team(rpm: u32, tpm: u64, max_concurrent: u32) -> Team {
        Team::new(
            "t",
            &TeamConfig {
                rpm,
                tpm,
                max_concurrent,
                ..Default::default()
            },
        )
    }

    #[test]
    fn rpm_allows_a_minutes_burst_then_refills_steadily() {
        let l = Arc::new(Limiter::default());
        let t = team(60, 0, 0);
        let t0 = Instant::now();
        for _ in 0..60 {
            drop(l.admit_at(&t, true, || t0).unwrap());
        }
        let refused = l.admit_at(&t, true, || t0).err().unwrap();
        assert_eq!(refused.limit, Limit::Rpm);
        assert!(
            refused.retry_after <= Duration::from_secs(1),
            "{:?}",
            refused.retry_after
        );
        // One request per second comes back.
        assert!(l
            .admit_at(&t, true, || t0 + Duration::from_millis(500))
            .is_err());
        assert!(l.admit_at(&t, true, || t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn tpm_charges_what_was_used_and_waits_it_off() {
        let l = Arc::new(Limiter::default());
        let t = team(0, 600, 0);
        let t0 = Instant::now();
        drop(l.admit_at(&t, true, || t0).unwrap());
        l.charge_at(&t, 900, || t0); // 300 over: half a minute at 10 tokens/s
        let refused = l.admit_at(&t, true, || t0).err().unwrap();
        assert_eq!(refused.limit, Limit::Tpm);
        assert!(
            (29.9..=30.2).contains(&refused.retry_after.as_secs_f64()),
            "{:?}",
            refused.retry_after
        );
        assert!(l
            .admit_at(&t, true, || t0 + Duration::from_secs(29))
            .is_err());
        assert!(l
            .admit_at(&t, true, || t0 + Duration::from_secs(31))
            .is_ok());
    }

    #[test]
    fn an_absurd_token_count_locks_a_team_out_for_an_hour_at_most() {
        let l = Arc::new(Limiter::default());
        let t = team(0, 600, 0);
        let t0 = Instant::now();
        l.charge_at(&t, u64::MAX, || t0);
        let refused = l.admit_at(&t, true, || t0).err().unwrap();
        assert!(refused.retry_after <= Duration::from_secs(61 * 60));
        assert!(l
            .admit_at(&t, true, || t0 + Duration::from_secs(61 * 60))
            .is_ok());
    }

    #[test]
    fn concurrency_counts_slots_held() {
        let l = Arc::new(Limiter::default());
        let t = team(0, 0, 2);
        let now = Instant::now();
        let a = l.admit_at(&t, true, || now).unwrap();
        let _b = l.admit_at(&t, true, || now).unwrap();
        assert_eq!(
            l.admit_at(&t, true, || now).err().unwrap().limit,
            Limit::Concurrency
        );
        drop(a);
        assert!(l.admit_at(&t, true, || now).is_ok());
    }

    #[test]
    fn only_model_runs_take_token_and_concurrency_quota() {
        let l = Arc::new(Limiter::default());
        let t = team(0, 10, 1);
        let now = Instant::now();
        let _stream = l.admit_at(&t, true, || now).unwrap();
        l.charge_at(&t, 100, || now);
        assert!(l.admit_at(&t, true, || now).is_err());
        assert!(
            l.admit_at(&t, false, || now).is_ok(),
            "listing models is not a model run"
        );
    }

    #[test]
    fn refused_requests_cost_nothing_and_teams_are_separate() {
        let l = Arc::new(Limiter::default());
        let busy = team(0, 0, 1);
        let other = Team::new(
            "other",
            &TeamConfig {
                rpm: 1,
                ..Default::default()
            },
        );
        let now = Instant::now();
        let _held = l.admit_at(&busy, true, || now).unwrap();
        assert!(l.admit_at(&busy, true, || now).is_err());
        assert!(
            l.admit_at(&other, true, || now).is_ok(),
            "another team's limits apply to it alone"
        );
        assert!(l.admit_at(&other, true, || now).is_err());
        let unlimited = team(0, 0, 0);
        for _ in 0..1000 {
            drop(l.admit_at(&unlimited, true, || now).unwrap());
        }
    }

    #[test]
    fn a_refund_gives_back_the_request_and_the_place() {
        let l = Arc::new(Limiter::default());
        let t = team(2, 0, 1);
        let now = Instant::now();
        let slot = l.admit_at(&t, true, || now).unwrap();
        assert_eq!(
            l.admit_at(&t, true, || now).err().unwrap().limit,
            Limit::Concurrency
        );
        slot.refund();
        // The minute's two requests are there again, and the place is free.
        drop(l.admit_at(&t, true, || now).unwrap());
        drop(l.admit_at(&t, false, || now).unwrap());
        assert_eq!(
            l.admit_at(&t, false, || now).err().unwrap().limit,
            Limit::Rpm
        );
    }

    #[test]
    fn a_refund_never_lifts_a_bucket_over_a_minutes_allowance() {
        let l = Arc::new(Limiter::default());
        let t = team(2, 0, 0);
        let t0 = Instant::now();
        let a = l.admit_at(&t, false, || t0).unwrap();
        let later = t0 + Duration::from_secs(60);
        let b = l.admit_at(&t, false, || later).unwrap(); // refilled to 2, then 1
        a.refund();
        b.refund();
        drop(l.admit_at(&t, false, || later).unwrap());
        drop(l.admit_at(&t, false, || later).unwrap());
        assert!(l.admit_at(&t, false, || later).is_err(), "two, not three");
    }
}
