//! The retry policy: how many attempts a delivery gets, and how long to wait before each
//! retry (exponential backoff with full jitter, capped).

use std::time::Duration;

use serde::Deserialize;

/// Attempts per delivery unless configured: the first call and three retries.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Wait before the first retry (before jitter).
pub const DEFAULT_FIRST_DELAY: Duration = Duration::from_secs(30);
/// Each retry waits this many times longer than the one before.
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
/// No wait is longer than this.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(60 * 60);

/// How a failed delivery is retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first call included; then the delivery is dead.
    pub max_attempts: u32,
    /// The cap on the wait before the first retry.
    pub first_delay: Duration,
    /// Growth of the cap from one retry to the next.
    pub multiplier: f64,
    /// The largest cap.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            first_delay: DEFAULT_FIRST_DELAY,
            multiplier: DEFAULT_MULTIPLIER,
            max_delay: DEFAULT_MAX_DELAY,
        }
    }
}

impl RetryPolicy {
    /// Whether a delivery whose attempt number `attempt` just failed gets another one.
    pub fn retries_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The wait after failed attempt number `attempt` (from 1), with `jitter` in `[0, 1]`:
    /// full jitter, a uniform share of `min(max_delay, first_delay × multiplier^(attempt-1))`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let cap = self.first_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let cap = cap.min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(cap * jitter.clamp(0.0, 1.0))
    }
}

/// `[retry]` as written in the config file or a plugin manifest: any key may be left out.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts in all, the first call included.
    pub max_attempts: Option<u32>,
    /// Such as `"30s"`.
    pub first_delay: Option<String>,
    /// Such as `2.0`.
    pub multiplier: Option<f64>,
    /// Such as `"1h"`.
    pub max_delay: Option<String>,
}

impl RetrySettings {
    /// `base` with these settings applied; every problem is described.
    pub fn apply(&self, base: &RetryPolicy) -> Result<RetryPolicy, Vec<String>> {
        let mut problems = Vec::new();
        let mut policy = base.clone();
        if let Some(attempts) = self.max_attempts {
            if attempts == 0 {
                problems.push("retry.max_attempts must be at least 1".to_owned());
            }
            policy.max_attempts = attempts;
        }
        if let Some(multiplier) = self.multiplier {
            if !(1.0..=100.0).contains(&multiplier) {
                problems.push(format!("retry.multiplier = {multiplier} must be between 1 and 100"));
            }
            policy.multiplier = multiplier;
        }
        for (field, text, slot) in [
            ("first_delay", &self.first_delay, &mut policy.first_delay),
            ("max_delay", &self.max_delay, &mut policy.max_delay),
        ] {
            if let Some(text) = text {
                match parse_duration(text) {
                    Ok(duration) => *slot = duration,
                    Err(err) => problems.push(format!("retry.{field}: {err}")),
                }
            }
        }
        // Only a first_delay written here and then capped: a max_delay alone lowers the default.
        if self.first_delay.is_some() && policy.first_delay > policy.max_delay {
            problems.push(format!(
                "retry.first_delay ({}) is longer than retry.max_delay ({}), which caps every wait",
                humantime::format_duration(policy.first_delay),
                humantime::format_duration(policy.max_delay)
            ));
        }
        if problems.is_empty() { Ok(policy) } else { Err(problems) }
    }
}

/// The longest duration any setting takes: sums of durations (a timeout plus a margin) and
/// NATS's nanosecond counts stay far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration as people write it: `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"7d"`; at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|err| format!("{text:?} is not a duration like \"30s\" or \"1h\" ({err})"))?;
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is longer than the 10 years any setting takes"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_delay_over_the_cap_and_durations_past_ten_years_are_refused() {
        let settings = RetrySettings { first_delay: Some("2h".into()), ..Default::default() };
        let problems = settings.apply(&RetryPolicy::default()).expect_err("first_delay over max_delay");
        assert!(problems[0].contains("first_delay (2h) is longer than retry.max_delay (1h)"), "{problems:?}");
        let lower_cap = RetrySettings { max_delay: Some("10s".into()), ..Default::default() };
        assert_eq!(lower_cap.apply(&RetryPolicy::default()).expect("a cap alone").max_delay, Duration::from_secs(10));
        assert!(parse_duration("3650d").is_ok());
        assert!(parse_duration("18446744073709551000s").is_err());
        assert!(parse_duration("3651d").expect_err("too long").contains("10 years"));
    }

    #[test]
    fn backoff_doubles_from_the_first_delay_up_to_the_cap() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(1, 1.0), Duration::from_secs(30));
        assert_eq!(policy.delay(2, 1.0), Duration::from_secs(60));
        assert_eq!(policy.delay(3, 1.0), Duration::from_secs(120));
        assert_eq!(policy.delay(30, 1.0), Duration::from_secs(3600));
    }

    #[test]
    fn full_jitter_scales_the_whole_wait() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(2, 0.0), Duration::ZERO);
        assert_eq!(policy.delay(2, 0.5), Duration::from_secs(30));
        assert_eq!(policy.delay(2, 7.0), Duration::from_secs(60), "jitter is clamped");
    }

    #[test]
    fn default_policy_gives_four_attempts() {
        let policy = RetryPolicy::default();
        assert!(policy.retries_after(3));
        assert!(!policy.retries_after(4));
    }

    #[test]
    fn settings_override_only_what_they_name_and_report_every_problem() {
        let settings = RetrySettings { max_attempts: Some(2), first_delay: Some("50ms".into()), ..Default::default() };
        let policy = settings.apply(&RetryPolicy::default()).expect("valid");
        assert_eq!((policy.max_attempts, policy.first_delay), (2, Duration::from_millis(50)));
        assert_eq!(policy.max_delay, DEFAULT_MAX_DELAY);
        let bad = RetrySettings {
            max_attempts: Some(0),
            max_delay: Some("soon".into()),
            multiplier: Some(0.5),
            ..Default::default()
        };
        assert_eq!(bad.apply(&RetryPolicy::default()).expect_err("three problems").len(), 3);
    }
}
