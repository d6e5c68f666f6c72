//! Subscription patterns: the globs plugins subscribe with, matched against event types.
//! Routing (the registry) and the nats journal's delivery check both use them.

use globset::{Glob, GlobSet, GlobSetBuilder};

/// One matcher for a list of patterns. `*` matches any run of characters, dots included.
pub fn matcher(patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(Glob::new(pattern).map_err(|err| format!("subscription {pattern:?} is not a valid pattern: {err}"))?);
    }
    set.build().map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(patterns: &[&str], event_type: &str) -> bool {
        let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        matcher(&patterns).expect("valid patterns").is_match(event_type)
    }

    #[test]
    fn star_matches_across_dots() {
        assert!(matches(&["*"], "github.pull_request.opened"));
        assert!(matches(&["github.*"], "github.pull_request.opened"));
        assert!(matches(&["stripe.invoice.*"], "stripe.invoice.paid"));
        assert!(!matches(&["stripe.invoice.*"], "stripe.charge.failed"));
        assert!(!matches(&["github.push"], "github.push.extra"));
        assert!(matches(&["github.push", "github.issues.*"], "github.issues.opened"));
        assert!(!matches(&[], "github.push"));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let err = matcher(&["github.[".to_owned()]).expect_err("unclosed class");
        assert!(err.contains("github.["), "{err}");
    }
}
