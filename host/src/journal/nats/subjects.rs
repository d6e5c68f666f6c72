//! NATS subject names for events, dead letters and the wake-up signal, and the mapping of
//! plugin subscriptions (globs) to consumer filter subjects.
//!
//! An event goes to `{prefix}.{source}.{type tokens}`: the type splits at its dots into
//! tokens, and every token is escaped to characters valid in a subject (anything outside
//! `A-Z a-z 0-9 - _` becomes `%XX`; an empty token becomes `%`). Emitted events' sources
//! (`plugin.NAME`) travel as their first part, `plugin`: the full source is in the record.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Bytes escaped in a subject token: everything but letters, digits, `-` and `_`.
const TOKEN: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// Characters that make a glob token match more than itself.
const GLOB_META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

/// Source tokens the host itself publishes under, besides the configured sources.
pub const HOST_SOURCES: [&str; 2] = ["plugin", "wasmhook"];

/// Source names that would collide with the host's own subjects.
pub const RESERVED_SOURCES: [&str; 3] = ["dlq", "plugin", "wasmhook"];

/// One subject token for `text`.
pub fn token(text: &str) -> String {
    if text.is_empty() { "%".to_owned() } else { utf8_percent_encode(text, TOKEN).to_string() }
}

/// The subject an event of `source` and `event_type` is published to.
pub fn event_subject(prefix: &str, source: &str, event_type: &str) -> String {
    let source = source.split('.').next().unwrap_or_default();
    let mut subject = format!("{prefix}.{}", token(source));
    for part in event_type.split('.') {
        subject.push('.');
        subject.push_str(&token(part));
    }
    subject
}

/// The stream subjects that hold the events of `sources` (and the host's own).
pub fn stream_subjects<'a>(prefix: &str, sources: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut subjects: Vec<String> =
        sources.into_iter().chain(HOST_SOURCES).map(|source| format!("{prefix}.{}.>", token(source))).collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// The subject of the dead letters of `plugin`.
pub fn dead_subject(prefix: &str, plugin: &str) -> String {
    format!("{prefix}.dlq.{}", token(plugin))
}

/// The plugin a dead-letter subject is for.
pub fn dead_plugin(prefix: &str, subject: &str) -> String {
    let token = subject.strip_prefix(prefix).and_then(|rest| rest.strip_prefix(".dlq.")).unwrap_or(subject);
    percent_encoding::percent_decode_str(token).decode_utf8_lossy().into_owned()
}

/// The subject of every dead letter.
pub fn dead_subjects(prefix: &str) -> String {
    format!("{prefix}.dlq.>")
}

/// The core NATS subject a host signals on after publishing, so idle hosts pull at once.
/// Two tokens after the prefix never match a stream's `{prefix}.{source}.>`.
pub fn wake_subject(prefix: &str) -> String {
    format!("{prefix}._wake")
}

/// The consumer filter subjects for a plugin's subscriptions: a superset of what the globs
/// match (a token with a wildcard becomes `>`, since `*` matches across dots), with no filter
/// inside another, as JetStream requires. The host checks the glob again on delivery.
pub fn filters(prefix: &str, subscriptions: &[String]) -> Vec<String> {
    let mut filters: Vec<String> = subscriptions
        .iter()
        .map(|pattern| {
            let mut filter = format!("{prefix}.*");
            for part in pattern.split('.') {
                if part.contains(GLOB_META) {
                    filter.push_str(".>");
                    return filter;
                }
                filter.push('.');
                filter.push_str(&token(part));
            }
            filter
        })
        .collect();
    filters.sort();
    filters.dedup();
    let kept: Vec<String> = filters
        .iter()
        .filter(|filter| !filters.iter().any(|other| other != *filter && contains(other, filter)))
        .cloned()
        .collect();
    kept
}

/// Whether every subject `inner` matches is also matched by `outer`.
fn contains(outer: &str, inner: &str) -> bool {
    let (mut outer, mut inner) = (outer.split('.'), inner.split('.'));
    loop {
        match (outer.next(), inner.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(part)) if part != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    #[test]
    fn event_types_split_into_escaped_tokens() {
        assert_eq!(event_subject("wh", "github", "github.push"), "wh.github.github.push");
        assert_eq!(event_subject("wh", "plugin.echo", "audit.pushed"), "wh.plugin.audit.pushed");
        assert_eq!(event_subject("a.b", "ce", "com.example.a b*>"), "a.b.ce.com.example.a%20b%2A%3E");
        assert_eq!(event_subject("wh", "ce", "x..y"), "wh.ce.x.%.y");
    }

    #[test]
    fn globs_become_filter_subjects_without_overlaps() {
        assert_eq!(filters("wh", &strings(&["github.push"])), ["wh.*.github.push"]);
        assert_eq!(filters("wh", &strings(&["*"])), ["wh.*.>"]);
        assert_eq!(filters("wh", &strings(&["stripe.invoice.*", "stripe.invoice.paid"])), ["wh.*.stripe.invoice.>"]);
        assert_eq!(filters("wh", &strings(&["github.pull_*", "github.push"])), ["wh.*.github.>"]);
        assert_eq!(filters("wh", &strings(&["b.x", "a.y"])), ["wh.*.a.y", "wh.*.b.x"]);
        assert!(filters("wh", &[]).is_empty());
    }

    #[test]
    fn a_filter_matches_the_subjects_of_the_types_its_glob_matches() {
        let cases = [("github.*", "github.pull_request.opened"), ("x.a b", "x.a b"), ("*", "anything.at.all")];
        for (pattern, event_type) in cases {
            let filter = &filters("wh", &[pattern.to_owned()])[0];
            assert!(contains(filter, &event_subject("wh", "src", event_type)), "{pattern} → {filter}");
        }
        assert!(!contains("wh.*.github.push", &event_subject("wh", "s", "github.push.x")));
    }

    #[test]
    fn stream_subjects_cover_the_host_sources_and_never_the_dead_letters() {
        let subjects = stream_subjects("wh", ["github", "stripe"]);
        assert_eq!(subjects, ["wh.github.>", "wh.plugin.>", "wh.stripe.>", "wh.wasmhook.>"]);
        assert!(!subjects.iter().any(|subject| contains(subject, &dead_subject("wh", "p"))));
        assert!(!subjects.iter().any(|subject| contains(subject, &wake_subject("wh"))));
        assert_eq!(dead_plugin("wh", &dead_subject("wh", "a.b c")), "a.b c");
    }
}
