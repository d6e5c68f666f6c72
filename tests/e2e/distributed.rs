//! The NATS JetStream journal (with Redis dedup) through real binaries and real servers:
//! two hosts share the work, a host killed with `kill -9` loses nothing, ingest answers 503
//! while NATS is down, duplicates sent to different hosts are accepted once, and retries and
//! dead letters behave as with the embedded journal.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::services::{Nats, Redis};
use crate::util::{EventStream, PATIENCE, SECRET, TestHost, example, metric, scrape};

/// Short backoffs, short leases: retries take milliseconds, a dead host's work moves in seconds.
const FAST: &str = "[retry]\nmax_attempts = 3\nfirst_delay = \"20ms\"\nmax_delay = \"100ms\"\n";

/// A host on `nats` (and `redis`, if given) with `flaky` and `echo`.
fn host(nats: &Nats, redis: Option<&Redis>, flaky: &str) -> TestHost {
    let mut journal = format!("[journal]\nbackend = \"nats\"\nurl = \"{}\"\nlease_margin = \"1s\"\n", nats.url());
    if let Some(redis) = redis {
        journal.push_str(&format!("[dedup]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url()));
    }
    TestHost::builder()
        .plugin("echo")
        .plugin_with_manifest("flaky", &format!("timeout = \"2s\"\n[config]\n{flaky}\n"))
        .setting("workers = 4")
        .config(&journal)
        .config(FAST)
        .config("[sources.events]\nverify = \"none\"\nformat = \"cloudevents\"\n")
        .start()
}

/// Posts a binary-mode CloudEvent with `id` from `producer` (its `source` attribute) to `host`.
fn post_cloud_event(host: &TestHost, producer: &str, id: &str) -> (u16, serde_json::Value) {
    let headers = [
        ("ce-id", id),
        ("ce-source", producer),
        ("ce-specversion", "1.0"),
        ("ce-type", "t"),
        ("content-type", "text/plain"),
    ];
    crate::util::post(&format!("{}/hooks/events", host.url), &headers, b"x")
}

/// How many times each id's effect (`flaky` logs `effect {id} attempt {n}`) shows in `hosts`' logs.
fn effects(hosts: &[&TestHost], ids: &[String]) -> BTreeMap<String, usize> {
    for host in hosts {
        host.sync_log();
    }
    ids.iter()
        .map(|id| (id.clone(), hosts.iter().map(|host| host.count_log(&format!("effect {id} attempt"))).sum()))
        .collect()
}

/// Waits until every id's effect happened at least once; returns the counts.
fn wait_for_effects(hosts: &[&TestHost], ids: &[String]) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let counts = effects(hosts, ids);
        let missing: Vec<&String> = counts.iter().filter(|(_, n)| **n == 0).map(|(id, _)| id).collect();
        if missing.is_empty() {
            return counts;
        }
        assert!(Instant::now() < deadline, "no effect for {missing:?}; logs:\n{}", logs(hosts));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn logs(hosts: &[&TestHost]) -> String {
    hosts.iter().map(|host| host.log()).collect::<Vec<_>>().join("\n----\n")
}

/// Polls the dead letters of `flaky` until one is for `event_id`, and returns it.
fn wait_for_dead_letter(host: &TestHost, event_id: &str) -> serde_json::Value {
    wait_for_dead_letter_of(host, "flaky", event_id)
}

fn wait_for_dead_letter_of(host: &TestHost, plugin: &str, event_id: &str) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, letters) = host.admin_get(&format!("/v1/dead-letters?plugin={plugin}"));
        let found = letters["dead_letters"].as_array().and_then(|all| all.iter().find(|l| l["event_id"] == event_id));
        if let Some(found) = found {
            return found.clone();
        }
        assert!(Instant::now() < deadline, "no dead letter for {event_id}; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_hosts_share_the_work_and_run_each_event_once_per_plugin() {
    let (nats, redis) = (Nats::start(), Redis::start());
    let (a, b) = (host(&nats, Some(&redis), "slow_ms = \"5\""), host(&nats, Some(&redis), "slow_ms = \"5\""));
    let body = example("github/push.json");
    let ids: Vec<String> = (0..60).map(|n| format!("shared-{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        let target = if n % 2 == 0 { &a } else { &b };
        assert_eq!(target.post_github("push", id, &body, SECRET).0, 202);
    }
    let counts = wait_for_effects(&[&a, &b], &ids);
    // Both plugins ran every event, once, and both hosts did some of the work.
    std::thread::sleep(Duration::from_millis(500));
    let counts_later = effects(&[&a, &b], &ids);
    assert_eq!(counts, counts_later);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    for id in &ids {
        let echoed = a.count_log(&format!("github.push {id} from github"))
            + b.count_log(&format!("github.push {id} from github"));
        assert_eq!(echoed, 1, "echo ran {id} {echoed} times");
    }
    let on_a = ids.iter().filter(|id| a.count_log(&format!("effect {id} attempt")) > 0).count();
    assert!(on_a > 0 && on_a < ids.len(), "host A ran {on_a} of {} events: the work was not shared", ids.len());
}

#[test]
fn duplicates_sent_to_different_hosts_are_accepted_once() {
    let (nats, redis) = (Nats::start(), Redis::start());
    let (a, b) = (host(&nats, Some(&redis), ""), host(&nats, Some(&redis), ""));
    let body = example("github/push.json");
    assert_eq!(a.post_github("push", "twin", &body, SECRET).0, 202);
    let (status, reply) = b.post_github("push", "twin", &body, SECRET);
    assert_eq!((status, &reply["duplicate"]), (200, &serde_json::json!(true)), "{reply}");
    // Without Redis, JetStream's own duplicate window refuses it just the same.
    let (c, d) = (host(&nats, None, ""), host(&nats, None, ""));
    assert_eq!(c.post_github("push", "twin-2", &body, SECRET).0, 202);
    assert_eq!(d.post_github("push", "twin-2", &body, SECRET).0, 200);
    // A CloudEvent's key holds its producer: two producers' events with one id are two events.
    for (first, second, id) in [(&a, &b, "ce-1"), (&c, &d, "ce-2")] {
        assert_eq!(post_cloud_event(first, "/one", id).0, 202);
        assert_eq!(post_cloud_event(second, "/two", id).0, 202, "another producer");
        let (status, reply) = post_cloud_event(second, "/one", id);
        assert_eq!((status, &reply["duplicate"]), (200, &serde_json::json!(true)), "{reply}");
    }
    let ids = ["twin".to_owned(), "twin-2".to_owned()];
    wait_for_effects(&[&a, &b, &c, &d], &ids);
    std::thread::sleep(Duration::from_millis(500));
    assert!(effects(&[&a, &b, &c, &d], &ids).values().all(|n| *n == 1), "{}", logs(&[&a, &b, &c, &d]));
}

#[test]
fn kill_nine_one_host_and_the_other_finishes_everything_accepted() {
    const WORKERS: usize = 4;
    let (nats, redis) = (Nats::start(), Redis::start());
    let (a, mut b) = (host(&nats, Some(&redis), "slow_ms = \"100\""), host(&nats, Some(&redis), "slow_ms = \"100\""));
    let to_a = EventStream::start(&a.url, "to-a", Duration::from_millis(20));
    let to_b = EventStream::start(&b.url, "to-b", Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(800));
    // Kill B while it runs calls (each takes 100 ms), so that it dies holding leased work.
    let deadline = Instant::now() + PATIENCE;
    while metric(&scrape(&b), "wasmhook_calls_in_flight", &[]) == 0.0 {
        assert!(Instant::now() < deadline, "host B never ran a call; log:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    b.kill();
    std::thread::sleep(Duration::from_millis(300));
    let mut accepted = to_a.stop();
    accepted.extend(to_b.stop());
    assert!(accepted.len() >= 20, "only {} events were accepted; the test proves little", accepted.len());
    let counts = wait_for_effects(&[&a, &b], &accepted);
    // Work B had leased when it died ran again on A once its ack wait (2 s + 1 s) ran out.
    let repeated: usize = counts.values().map(|n| n - 1).sum();
    assert!(repeated <= WORKERS, "{repeated} repeated effects for one kill of a host with {WORKERS} workers");
    // B died running calls (it is always busy here): A ran those again as second attempts.
    assert!(a.count_log(" attempt 2") > 0, "host A never took over B's leased work; logs:\n{}", logs(&[&a, &b]));
}

#[test]
fn ingest_answers_503_while_nats_is_down_and_loses_no_accepted_event() {
    let mut nats = Nats::start();
    let mut host = host(&nats, None, "");
    let body = example("github/push.json");
    assert_eq!(host.post_github("push", "before", &body, SECRET).0, 202);
    nats.stop();
    host.wait_for_log("lost the connection to NATS");
    let reply = host.github_reply("push", "during", &body, SECRET);
    assert_eq!(reply.status, 503, "{}", reply.json);
    assert!(reply.retry_after.is_some(), "503 without Retry-After");
    let error = reply.json["error"].as_str().unwrap_or_default();
    assert!(error.contains("journal is unreachable") && !error.contains("NATS"), "{}", reply.json);
    assert_eq!(host.admin_get("/readyz").0, 503);

    nats.restart();
    let deadline = Instant::now() + PATIENCE;
    // 200 too: a publish that timed out may have been stored, and then its retry is a duplicate.
    while !matches!(host.github_reply("push", "after", &body, SECRET).status, 200 | 202) {
        assert!(Instant::now() < deadline, "ingest never recovered; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(host.admin_get("/readyz").0, 200);
    wait_for_effects(&[&host], &["before".to_owned(), "after".to_owned()]);
    assert_eq!(host.count_log("effect during attempt"), 0, "an event refused with 503 ran");
}

#[test]
fn retries_and_dead_letters_behave_as_in_the_embedded_journal() {
    let nats = Nats::start();
    let mut host = host(&nats, None, "");
    // Two failures, then success on the third attempt.
    host.post_github("push", "flaky-1", br#"{"fail_times": 2}"#, SECRET);
    host.wait_for_log("effect flaky-1 attempt 3");

    // A permanent refusal is dead after one attempt, with an alert that echo receives.
    std::fs::write(host.plugins_dir().join("flaky.toml"), "timeout = \"2s\"\n[config]\nmode = \"permanent\"\n")
        .expect("manifest");
    host.restart();
    host.post_github("push", "refused", &example("github/push.json"), SECRET);
    host.wait_for_log(" from wasmhook (");
    let refused = wait_for_dead_letter(&host, "refused");
    assert_eq!(refused["attempts"], 1, "{refused}");
    let (ok, listing) = host.cli(&["dlq", "list", "--plugin", "flaky"]);
    assert!(ok && listing.contains("refused") && listing.contains("configured to refuse"), "{listing}");

    // Always retried: dead after three attempts, each error kept.
    std::fs::write(host.plugins_dir().join("flaky.toml"), "timeout = \"2s\"\n[config]\nmode = \"retry\"\n")
        .expect("manifest");
    host.restart();
    host.post_github("push", "doomed", &example("github/push.json"), SECRET);
    let doomed = wait_for_dead_letter(&host, "doomed");
    assert_eq!(doomed["attempts"], 3, "{doomed}");
    let (status, detail) = host.admin_get(&format!("/v1/dead-letters/{}", doomed["delivery"]));
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["errors"].as_array().map(Vec::len), Some(3), "{detail}");

    // Fixed and replayed: both run again with a fresh budget, and the list empties.
    std::fs::write(host.plugins_dir().join("flaky.toml"), "timeout = \"2s\"\n").expect("fix manifest");
    host.restart();
    let (ok, replayed) = host.cli(&["dlq", "replay", "--plugin", "flaky"]);
    assert!(ok && replayed.contains("dead letters replayed"), "{replayed}");
    host.wait_for_log("effect doomed attempt 1");
    host.wait_for_log("effect refused attempt 1");
    let (ok, listing) = host.cli(&["dlq", "list", "--json"]);
    assert!(ok && listing.contains("\"dead_letters\":[]"), "{listing}");

    // A dead letter purged is gone for good.
    std::fs::write(host.plugins_dir().join("flaky.toml"), "timeout = \"2s\"\n[config]\nmode = \"permanent\"\n")
        .expect("manifest");
    host.restart();
    host.post_github("push", "purged", &example("github/push.json"), SECRET);
    wait_for_dead_letter(&host, "purged");
    // flaky refuses the alert about it too: wait for both letters, so none arrives after the purge.
    let deadline = Instant::now() + PATIENCE;
    while host.admin_get("/v1/dead-letters?plugin=flaky").1["dead_letters"].as_array().map_or(0, Vec::len) < 2 {
        assert!(Instant::now() < deadline, "no dead letter for the alert; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, purged) = host.cli(&["dlq", "purge", "--plugin", "flaky"]);
    assert!(ok && purged.contains("2 dead letters purged"), "{purged}");
    let (_, letters) = host.admin_get("/v1/dead-letters?plugin=flaky");
    assert_eq!(letters["dead_letters"], serde_json::json!([]), "{letters}");
    std::fs::write(host.plugins_dir().join("flaky.toml"), "timeout = \"2s\"\n").expect("fix manifest");
    host.restart();

    // Replay by type reaches the plugins subscribed now, once per event.
    let mark = host.count_log("effect flaky-1 attempt");
    let (ok, output) = host.cli(&["replay", "--type", "github.push", "--since", "1h"]);
    assert!(ok && output.contains("deliveries made due"), "{output}");
    let deadline = Instant::now() + PATIENCE;
    while host.count_log("effect flaky-1 attempt") == mark {
        assert!(Instant::now() < deadline, "replay did not run flaky-1 again; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn what_would_not_fit_in_a_nats_message_is_refused_up_front_and_never_redelivered_forever() {
    let nats = Nats::start();
    let journal = format!("[journal]\nbackend = \"nats\"\nurl = \"{}\"\nlease_margin = \"1s\"\n", nats.url());
    let host = TestHost::builder()
        .plugin_with_manifest("faulty", "timeout = \"2s\"\n[config]\nfault = \"emit-large\"\n")
        .config(&journal)
        .config(FAST)
        .start();

    // A body within a few KiB of the server's 1 MiB max_payload would leave its dead letter no room.
    let mut body = br#"{"pad":""#.to_vec();
    body.resize((1 << 20) - 4096, b'x');
    body.extend_from_slice(br#""}"#);
    let reply = host.github_reply("push", "near-limit", &body, SECRET);
    assert_eq!(reply.status, 413, "{}", reply.json);
    let error = reply.json["error"].as_str().unwrap_or_default();
    let limit: usize =
        error.trim_start_matches("body larger than the limit of ").trim_end_matches(" bytes").parse().unwrap_or(0);
    assert!((1 << 19..body.len()).contains(&limit), "{}", reply.json);

    // A 1 MiB emitted event does not fit either: the delivery goes dead at once, instead of
    // being redelivered for ever after a commit that cannot succeed.
    host.post_github("push", "emits-too-much", &example("github/push.json"), SECRET);
    let letter = wait_for_dead_letter_of(&host, "faulty", "emits-too-much");
    assert_eq!(letter["attempts"], 1, "{letter}");
    let error = letter["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("permanent: ") && error.contains("of 1048576 bytes") && error.contains("journal's limit"),
        "{letter}"
    );
}
