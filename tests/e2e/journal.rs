//! The journal's promises through the real binary: nothing accepted is lost across `kill -9`,
//! duplicates stay refused across restarts, failures retry with backoff and end as dead
//! letters that can be replayed, and a full journal pushes back with 503.

use std::time::Duration;

use crate::util::{EventStream, SECRET, TestHost, example, metric, post, scrape};

/// Short backoffs so retry tests take milliseconds, not minutes.
const FAST_RETRY: &str = "[retry]\nmax_attempts = 3\nfirst_delay = \"20ms\"\nmax_delay = \"100ms\"\n";

fn errors_of(event: &serde_json::Value, delivery: usize) -> Vec<String> {
    event["deliveries"][delivery]["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["error"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn kill_nine_at_random_moments_loses_no_accepted_event() {
    const KILLS: usize = 5;
    const WORKERS: usize = 4;
    let mut host = TestHost::builder()
        .plugin("echo")
        .plugin_with_manifest("flaky", "[config]\nslow_ms = \"2\"\n")
        .setting(&format!("workers = {WORKERS}"))
        .start();
    let stream = EventStream::start(&host.url, "crash", Duration::ZERO);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(fastrand::u64(300..700)));
        host.restart();
    }
    std::thread::sleep(Duration::from_millis(200));
    let accepted = stream.stop();
    assert!(accepted.len() >= 20, "only {} events were accepted; the test proves little", accepted.len());
    let events: Vec<_> = accepted.iter().map(|id| host.wait_for_event(id)).collect();
    host.sync_log(); // every plugin line of those deliveries is in the log
    let mut repeated_effects = 0;
    for (id, event) in accepted.iter().zip(&events) {
        assert_eq!(event["status"], "done", "{event}");
        let statuses: Vec<_> =
            event["deliveries"].as_array().expect("deliveries").iter().map(|d| d["status"].clone()).collect();
        assert_eq!(statuses, ["done", "done"], "{event}");
        let effects = host.count_log(&format!("effect {id} attempt"));
        assert!(effects >= 1, "{id} was accepted but its effect never happened");
        repeated_effects += effects - 1;
    }
    // At least once: a call cut short by a kill may run again, but only calls in flight at a
    // kill can repeat.
    assert!(repeated_effects <= KILLS * WORKERS, "{repeated_effects} repeated effects for {KILLS} kills");
}

#[test]
fn duplicates_are_refused_across_a_restart_and_a_new_id_with_the_same_body_is_accepted() {
    let mut host = TestHost::builder().plugin("echo").start();
    let body = example("github/push.json");
    assert_eq!(host.post_github("push", "once", &body, SECRET).0, 202);
    host.wait_for_event("once");
    host.restart();
    let (status, reply) = host.post_github("push", "once", &body, SECRET);
    assert_eq!((status, &reply["duplicate"]), (200, &serde_json::json!(true)), "{reply}");
    assert_eq!(host.post_github("push", "twice", &body, SECRET).0, 202);
    assert_eq!(host.wait_for_event("twice")["status"], "done");
    assert_eq!(host.wait_for_event("once")["deliveries"][0]["attempts"], 1);
}

#[test]
fn a_plugin_failing_twice_then_succeeding_is_done_after_three_attempts() {
    let host = TestHost::builder().plugin("flaky").config(FAST_RETRY).start();
    host.post_github("push", "flaky-1", br#"{"fail_times": 2}"#, SECRET);
    let event = host.wait_for_event("flaky-1");
    assert_eq!(event["status"], "done", "{event}");
    assert_eq!(event["deliveries"][0]["attempts"], 3);
    assert_eq!(errors_of(&event, 0), ["retry: failing attempt 1 of 2", "retry: failing attempt 2 of 2"]);
}

#[test]
fn a_plugin_that_always_fails_is_dead_after_its_attempts_and_raises_an_alert() {
    let mut host = TestHost::builder()
        .plugin("echo")
        .plugin_with_manifest("flaky", "[config]\nmode = \"retry\"\n")
        .config(FAST_RETRY)
        .start();
    host.post_github("push", "doomed", &example("github/push.json"), SECRET);
    let event = host.wait_for_event("doomed");
    assert_eq!(event["status"], "dead", "{event}");
    let flaky = &event["deliveries"][1];
    assert_eq!(
        (flaky["plugin"].as_str(), flaky["status"].as_str(), flaky["attempts"].as_u64()),
        (Some("flaky"), Some("dead"), Some(3))
    );
    assert_eq!(errors_of(&event, 1).len(), 3);
    host.wait_for_log("delivery failed for good");

    // The alert reaches the plugins subscribed to wasmhook.dead_letter (echo subscribes to all).
    // echo's line: "wasmhook.dead_letter {id} from wasmhook (…".
    let line = host.wait_for_log(" from wasmhook (");
    let alert_id =
        line.split("wasmhook.dead_letter ").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("id");
    let alert = host.wait_for_event(alert_id);
    assert_eq!((alert["source"].as_str(), alert["type"].as_str()), (Some("wasmhook"), Some("wasmhook.dead_letter")));

    let (status, letters) = host.admin_get("/v1/dead-letters?plugin=flaky");
    assert_eq!(status, 200);
    assert!(letters["dead_letters"].as_array().expect("list").iter().any(|l| l["event_id"] == "doomed"), "{letters}");
}

#[test]
fn a_permanent_error_is_dead_after_one_attempt() {
    let host = TestHost::builder()
        .plugin_with_manifest("flaky", "[config]\nmode = \"permanent\"\n")
        .config(FAST_RETRY)
        .start();
    host.post_github("push", "refused", &example("github/push.json"), SECRET);
    let event = host.wait_for_event("refused");
    assert_eq!(
        (event["status"].as_str(), event["deliveries"][0]["attempts"].as_u64()),
        (Some("dead"), Some(1)),
        "{event}"
    );
}

#[test]
fn dead_letters_replayed_after_the_plugin_is_fixed_end_done() {
    let mut host =
        TestHost::builder().plugin_with_manifest("flaky", "[config]\nmode = \"retry\"\n").config(FAST_RETRY).start();
    host.post_github("push", "fixable", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("fixable")["status"], "dead");

    let (ok, listing) = host.cli(&["dlq", "list", "--plugin", "flaky"]);
    assert!(ok && listing.contains("fixable") && listing.contains("configured to fail"), "{listing}");

    // The operator fixes the plugin (here, its manifest) and restarts, then replays.
    std::fs::write(host.plugins_dir().join("flaky.toml"), "[config]\nmode = \"ok\"\n").expect("fix manifest");
    host.restart();
    let (ok, replayed) = host.cli(&["dlq", "replay", "--plugin", "flaky"]);
    assert!(ok && replayed.contains("dead letters replayed"), "{replayed}");
    let event = host.wait_for_event("fixable");
    assert_eq!(event["status"], "done", "{event}");
    assert_eq!(event["deliveries"][0]["attempts"], 1, "a replay starts a fresh attempt budget");
    let (ok, listing) = host.cli(&["dlq", "list", "--json"]);
    assert!(ok && listing.contains("\"dead_letters\":[]"), "{listing}");
}

#[test]
fn stored_unrouted_events_are_replayed_once_a_plugin_subscribes() {
    let mut host = TestHost::builder().plugin("github-push").start();
    host.post_github("issues", "late-1", br#"{"action":"opened"}"#, SECRET);
    assert_eq!(host.wait_for_event("late-1")["status"], "unrouted");

    std::fs::copy(crate::util::plugin_wasm("echo"), host.plugins_dir().join("echo.wasm")).expect("add echo");
    host.restart();
    let (ok, output) = host.cli(&["replay", "--type", "github.issues.*", "--since", "1h"]);
    assert!(ok && output.contains("1 deliveries made due"), "{output}");
    let event = host.wait_for_event("late-1");
    assert_eq!(
        (event["status"].as_str(), event["deliveries"][0]["plugin"].as_str()),
        (Some("done"), Some("echo")),
        "{event}"
    );
}

#[test]
fn a_full_journal_answers_503_with_retry_after_and_delivers_everything_it_accepted() {
    let host = TestHost::builder()
        .plugin_with_manifest("flaky", "[config]\nslow_ms = \"300\"\n")
        .setting("workers = 1")
        // Refused at once, without waiting for room: the runs of 503s stay in step with the
        // requests.
        .config("[journal]\nmax_pending = 2\nmax_pending_wait = \"0s\"\n")
        .start();
    let body = example("github/push.json");
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut statuses = Vec::new();
    for n in 0..10 {
        let id = format!("bp-{n}");
        let reply = host.github_reply("push", &id, &body, SECRET);
        statuses.push(reply.status);
        match reply.status {
            202 => accepted.push(id),
            503 => {
                refused += 1;
                assert!(reply.retry_after.is_some(), "503 without Retry-After");
                assert!(
                    reply.json["error"].as_str().is_some_and(|e| e.contains("unfinished deliveries")),
                    "{}",
                    reply.json
                );
            }
            other => panic!("unexpected status {other}: {}", reply.json),
        }
    }
    assert!(refused > 0 && !accepted.is_empty(), "accepted {accepted:?}, refused {refused}");
    assert_eq!(at_max_pending(&host, "refused"), refused as f64, "each 503 refused at once, without waiting");
    for id in &accepted {
        assert_eq!(host.wait_for_event(id)["status"], "done");
    }
    assert_eq!(host.github_reply("push", "bp-after", &body, SECRET).status, 202, "accepted once drained");
    statuses.push(202);

    // One line where each run of 503s starts and one where it ends, not one per 503.
    let runs = statuses.windows(2).filter(|pair| pair[0] != 503 && pair[1] == 503).count();
    let ends = statuses.windows(2).filter(|pair| pair[0] == 503 && pair[1] == 202).count();
    assert!(runs > 0 && refused > runs, "statuses {statuses:?}: too few 503s in a row to tell");
    host.wait_for_log_count("accepting again after answering 503", ends);
    assert_eq!(host.count_log("request not accepted"), runs, "statuses {statuses:?}; log:\n{}", host.log());
    assert_eq!(host.count_log("accepting again after answering 503"), ends, "statuses {statuses:?}");
}

/// How long the one delivery of a journal of one keeps it full.
enum FullFor {
    /// The delivery runs this many milliseconds (within its 30 s timeout), then is done.
    Millis(u32),
    /// The delivery fails and is retried an hour later: full until the host stops, without
    /// using the CPU.
    UntilStopped,
}

/// A host whose journal of one is full: it has just accepted the event "fill", whose delivery
/// keeps it so for `full_for`. `config` follows `max_pending = 1` in `[journal]`.
fn host_with_a_full_journal(full_for: FullFor, config: &str) -> TestHost {
    let (manifest, retry) = match full_for {
        FullFor::Millis(ms) => (format!("timeout = \"30s\"\n[config]\nslow_ms = \"{ms}\"\n"), ""),
        FullFor::UntilStopped => (
            "[config]\nmode = \"retry\"\n".to_owned(),
            "[retry]\nmax_attempts = 100\nfirst_delay = \"1h\"\nmax_delay = \"1h\"\n",
        ),
    };
    let host = TestHost::builder()
        .plugin_with_manifest("flaky", &manifest)
        .config(&format!("{retry}[journal]\nmax_pending = 1\n{config}"))
        .start();
    assert_eq!(host.github_reply("push", "fill", &example("github/push.json"), SECRET).status, 202);
    host
}

/// How many requests found the journal full and ended with `outcome` (room, refused, no_place).
fn at_max_pending(host: &TestHost, outcome: &str) -> f64 {
    metric(&scrape(host), "wasmhook_requests_at_max_pending_total", &[("outcome", outcome)])
}

/// How many requests wait for room now.
fn waiting_for_room(host: &TestHost) -> f64 {
    metric(&scrape(host), "wasmhook_requests_waiting_for_room", &[])
}

#[test]
fn a_full_journal_refuses_before_verifying_the_signature() {
    // What comes while the journal is full is refused.
    let host = host_with_a_full_journal(
        FullFor::UntilStopped,
        "[sources.events]\nverify = \"none\"\nformat = \"cloudevents\"\n",
    );
    let body = example("github/push.json");
    // A forged request gets the 503, not the 401 that verifying it would have given, and the
    // refusal names no figure of the journal's.
    let forged = host.github_reply("push", "forged", &body, "wrong-secret");
    assert_eq!(forged.status, 503, "{}", forged.json);
    assert!(forged.retry_after.is_some(), "503 without Retry-After");
    let error = forged.json["error"].as_str().unwrap_or_default();
    assert!(error.contains("unfinished deliveries") && !error.contains(char::is_numeric), "{}", forged.json);
    // A CloudEvents batch is refused whole, not item by item.
    let batch = br#"[{"specversion":"1.0","type":"t","source":"/s","id":"b-1"}]"#;
    let (status, answer) =
        post(&format!("{}/hooks/events", host.url), &[("content-type", "application/cloudevents-batch+json")], batch);
    assert_eq!(status, 503, "{answer}");
    // Both waited the default 100 ms for room first.
    let counts = ["refused", "room", "no_place"].map(|outcome| at_max_pending(&host, outcome));
    assert_eq!(counts, [2.0, 0.0, 0.0]);
}

#[test]
fn a_request_that_finds_the_journal_full_waits_for_room_and_is_accepted() {
    // The next event waits for the one delivery (4 s) to finish, within max_pending_wait,
    // instead of getting a 503.
    let host = host_with_a_full_journal(FullFor::Millis(4000), "max_pending_wait = \"10s\"\n");
    let waited = host.github_reply("push", "waited", &example("github/push.json"), SECRET);
    assert_eq!(waited.status, 202, "{}", waited.json);
    assert_eq!(host.wait_for_event("fill")["status"], "done", "the room came from the first delivery");
    assert_eq!((at_max_pending(&host, "room"), at_max_pending(&host, "refused")), (1.0, 0.0));
    assert_eq!(host.wait_for_event("waited")["status"], "done");
}

#[test]
fn a_request_waiting_for_room_is_refused_at_once_when_the_host_shuts_down() {
    let mut host = host_with_a_full_journal(FullFor::UntilStopped, "max_pending_wait = \"10s\"\n");
    let waiting = std::thread::spawn({
        let url = host.url.clone();
        move || crate::util::try_post_github(&url, "push", "held", &example("github/push.json"), SECRET)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while waiting_for_room(&host) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the second request never waited for room");
        std::thread::sleep(Duration::from_millis(20));
    }
    host.terminate();
    // Told that the host is stopping, not that the journal is full: it stopped waiting for room.
    let reply = waiting.join().expect("the waiting request").expect("an answer");
    assert_eq!(reply.status, 503, "{}", reply.json);
    assert!(reply.json["error"].as_str().is_some_and(|error| error.contains("shutting down")), "{}", reply.json);
    assert!(host.wait_exit().success(), "{}", host.log());
}

#[test]
fn at_most_256_requests_wait_for_room_and_the_next_is_refused_at_once() {
    let host = host_with_a_full_journal(FullFor::UntilStopped, "max_pending_wait = \"10s\"\n");
    let body = example("github/push.json");
    let places = wasmhook::ingest::MAX_ROOM_WAITERS;
    let waiters: Vec<_> = (0..places)
        .map(|n| {
            let (url, body) = (host.url.clone(), body.clone());
            std::thread::spawn(move || crate::util::try_post_github(&url, "push", &format!("wait-{n}"), &body, SECRET))
        })
        .collect();
    // Within the first waiter's 10 s, so that no place has come free yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while waiting_for_room(&host) < places as f64 {
        assert!(std::time::Instant::now() < deadline, "only {} requests waiting", waiting_for_room(&host));
        std::thread::sleep(Duration::from_millis(20));
    }
    let turned_away = host.github_reply("push", "one-too-many", &body, SECRET);
    assert_eq!(turned_away.status, 503, "{}", turned_away.json);
    for waiter in waiters {
        let reply = waiter.join().expect("a waiting request").expect("an answer");
        assert_eq!(reply.status, 503, "the journal stayed full: {}", reply.json);
    }
    let counts = ["no_place", "refused", "room"].map(|outcome| at_max_pending(&host, outcome));
    assert_eq!(counts, [1.0, places as f64, 0.0]);
    assert_eq!(waiting_for_room(&host), 0.0, "every place given back");
}
