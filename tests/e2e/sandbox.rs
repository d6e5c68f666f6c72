//! The sandbox through the real binary: each fault ends only its own call with a reason that
//! names the limit, while the host and a well-behaved plugin carry on; manifests grant exactly
//! what they say; emitted events chain with a depth guard; notification plugins reach a real
//! local receiver, and nothing else.

use crate::util::{Receiver, SECRET, TestHost, example};

/// One attempt only, so a fault ends as a dead letter at once.
const ONE_ATTEMPT: &str = "[retry]\nmax_attempts = 1\n";

/// Starts a host with `faulty` (under `manifest`) and `echo`, sends one push, and returns the
/// faulty delivery's last error once the event is finished, after checking echo was unharmed.
fn fault(manifest: &str, env: &[(&str, &str)]) -> String {
    let mut builder = TestHost::builder().plugin("echo").plugin_with_manifest("faulty", manifest).config(ONE_ATTEMPT);
    for (var, value) in env {
        builder = builder.env(var, value);
    }
    let host = builder.start();
    host.post_github("push", "victim", &example("github/push.json"), SECRET);
    let event = host.wait_for_event("victim");
    let deliveries = event["deliveries"].as_array().expect("deliveries");
    assert_eq!(deliveries[0]["plugin"], "echo");
    assert_eq!(deliveries[0]["status"], "done", "the well-behaved plugin was harmed: {event}");
    assert_eq!(deliveries[1]["status"], "dead", "{event}");
    // The host is still healthy and still serving.
    assert_eq!(host.admin_get("/healthz").0, 200);
    host.post_github("push", "after", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("after")["deliveries"][0]["status"], "done");
    deliveries[1]["last_error"].as_str().expect("an error").to_owned()
}

fn assert_reason(error: &str, expected: &str) {
    assert!(error.contains(expected), "expected {expected:?} in {error:?}");
}

#[test]
fn an_infinite_loop_ends_at_the_timeout() {
    assert_reason(&fault("timeout = \"300ms\"\n[config]\nfault = \"loop\"\n", &[]), "timeout after 300 ms");
}

#[test]
fn a_panic_is_a_trap() {
    assert!(fault("[config]\nfault = \"panic\"\n", &[]).starts_with("trap: "));
}

#[test]
fn a_memory_bomb_ends_at_the_memory_limit() {
    assert_reason(&fault("memory = \"16MiB\"\n[config]\nfault = \"memory\"\n", &[]), "memory limit 16 MiB");
}

#[test]
fn deep_recursion_ends_at_the_stack_limit() {
    assert_reason(&fault("[config]\nfault = \"recursion\"\n", &[]), "wasm stack limit 512 KiB");
}

#[test]
fn log_spam_ends_at_the_log_limit() {
    assert_reason(&fault("[config]\nfault = \"log-spam\"\n", &[]), "log limit 100 lines");
}

#[test]
fn print_spam_ends_at_the_output_limit() {
    assert_reason(&fault("[config]\nfault = \"print-spam\"\n", &[]), "output limit 64 KiB");
}

#[test]
fn an_emit_storm_ends_at_the_emit_limit() {
    assert_reason(&fault("[config]\nfault = \"emit-storm\"\n", &[]), "emit limit 100 events");
}

#[test]
fn an_emitted_content_type_over_256_bytes_is_refused() {
    assert_reason(
        &fault("[config]\nfault = \"emit-content-type\"\n", &[]),
        "permanent: emit refused: content type must be at most 256 bytes",
    );
}

#[test]
fn a_request_to_a_host_not_granted_is_an_error_value_and_never_sent() {
    let receiver = Receiver::start();
    let manifest =
        format!("http_allow = [\"example.com\"]\n[config]\nfault = \"http\"\nurl = \"{}/steal\"\n", receiver.url);
    assert_reason(&fault(&manifest, &[]), "permanent: outbound request failed: request denied");
    assert!(receiver.received().is_empty(), "the request went out");
}

#[test]
fn files_are_out_of_reach() {
    assert_reason(
        &fault("[config]\nfault = \"read-file\"\npath = \"/etc/hostname\"\n", &[]),
        "permanent: file read failed",
    );
}

#[test]
fn the_hosts_environment_is_out_of_reach() {
    let error = fault("[config]\nfault = \"read-env\"\nvar = \"TEST_GITHUB_SECRET\"\n", &[]);
    assert_reason(&error, "TEST_GITHUB_SECRET: environment variable not found");
    assert!(!error.contains(SECRET));
}

#[test]
fn emitted_events_chain_until_the_depth_guard() {
    let mut host = TestHost::builder().plugin_with_manifest("faulty", "[config]\nfault = \"emit-chain\"\n").start();
    host.post_github("push", "root", &example("github/push.json"), SECRET);
    // Each emitted id is its parent's source and id, then its position.
    let emitted_from = |source: &str, id: &str| format!("{source}:{id}.1");
    let mut deepest = emitted_from("github", "root");
    for _ in 1..8 {
        deepest = emitted_from("plugin.faulty", &deepest);
    }
    let event = host.wait_for_event(&deepest);
    assert_eq!(
        (event["source"].as_str(), event["type"].as_str()),
        (Some("plugin.faulty"), Some("test.chain")),
        "{event}"
    );
    host.wait_for_log("emit refused: chain depth limit 8");
    let past_the_guard = emitted_from("plugin.faulty", &deepest);
    assert_eq!(host.admin_get(&format!("/v1/events/{past_the_guard}")).0, 404, "the chain went past the guard");
}

#[test]
fn a_plugins_concurrency_caps_its_parallel_calls() {
    let manifest = "concurrency = 1\n[config]\nfault = \"slow\"\nslow_ms = \"200\"\n";
    let host = TestHost::builder().plugin_with_manifest("faulty", manifest).start();
    for n in 0..4 {
        host.post_github("push", &format!("c-{n}"), &example("github/push.json"), SECRET);
    }
    for n in 0..4 {
        host.wait_for_event(&format!("c-{n}"));
    }
    // The log is read from a pipe: wait until the last call's line has come through it.
    host.wait_for_log_count("leave c-", 4);
    let log = host.log();
    let steps: Vec<&str> = log
        .lines()
        .filter_map(|line| ["enter", "leave"].into_iter().find(|step| line.contains(&format!("{step} c-"))))
        .collect();
    assert_eq!(steps.len(), 8, "{log}");
    assert!(steps.chunks(2).all(|pair| pair == ["enter", "leave"]), "calls overlapped: {steps:?}");
}

#[test]
fn a_manifest_replaces_subscriptions_and_a_bad_one_skips_the_plugin_naming_its_line() {
    let mut host = TestHost::builder()
        .plugin_with_manifest("faulty", "subscriptions = [\"only.this\"]\n")
        .plugin_with_manifest("flaky", "timeout = \"1s\"\n\ngrant_everything = true\n[config]\nmode = \"ok\"\n")
        .plugin("echo")
        .start();
    let line = host.wait_for_log("plugin skipped");
    assert!(line.contains("flaky.toml") && line.contains("grant_everything") && line.contains("line 3"), "{line}");
    host.post_github("push", "narrow", &example("github/push.json"), SECRET);
    let plugins: Vec<_> = host.wait_for_event("narrow")["deliveries"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["plugin"].clone())
        .collect();
    assert_eq!(plugins, ["echo"]);
}

#[test]
fn slack_notify_posts_and_a_failing_receiver_is_retried() {
    let receiver = Receiver::start();
    receiver.answer_with(&[500]);
    let manifest = "subscriptions = [\"github.push\"]\nhttp_allow = [\"127.0.0.1:*\"]\n[config_env]\nwebhook_url = \"SLACK_URL\"\n";
    let host = TestHost::builder()
        .plugin_with_manifest("slack-notify", manifest)
        .env("SLACK_URL", &format!("{}/services/T0/B0/x", receiver.url))
        .config("[retry]\nfirst_delay = \"20ms\"\nmax_delay = \"50ms\"\n")
        .start();
    host.post_github("push", "notify-1", &example("github/push.json"), SECRET);
    let event = host.wait_for_event("notify-1");
    assert_eq!(
        (event["status"].as_str(), event["deliveries"][0]["attempts"].as_u64()),
        (Some("done"), Some(2)),
        "{event}"
    );
    assert_eq!(event["deliveries"][0]["errors"][0]["error"], "retry: Slack answered 500");
    let got = receiver.wait_for(2);
    assert_eq!(got[1].request_line, "POST /services/T0/B0/x HTTP/1.1");
    let text: serde_json::Value = serde_json::from_slice(&got[1].body).expect("json");
    assert!(text["text"].as_str().is_some_and(|t| t.contains("github.push") && t.contains("notify-1")), "{text}");
}

#[test]
fn slack_notify_announces_dead_letters() {
    let receiver = Receiver::start();
    let host = TestHost::builder()
        .plugin_with_manifest("flaky", "[config]\nmode = \"permanent\"\n")
        .plugin_with_manifest(
            "slack-notify",
            "http_allow = [\"127.0.0.1:*\"]\n[config_env]\nwebhook_url = \"SLACK_URL\"\n",
        )
        .env("SLACK_URL", &format!("{}/hook", receiver.url))
        .start();
    host.post_github("push", "doomed", &example("github/push.json"), SECRET);
    let got = receiver.wait_for(1);
    let text = String::from_utf8_lossy(&got[0].body).into_owned();
    assert!(
        text.contains("gave up on github.push") && text.contains("doomed") && text.contains("configured to refuse"),
        "{text}"
    );
}

#[test]
fn forward_signs_with_standard_webhooks() {
    let receiver = Receiver::start();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let manifest = format!(
        "subscriptions = [\"github.*\"]\nhttp_allow = [\"127.0.0.1:*\"]\n[config]\nurl = \"{}/in\"\n[config_env]\nsecret = \"FORWARD_SECRET\"\n",
        receiver.url
    );
    let host = TestHost::builder().plugin_with_manifest("forward", &manifest).env("FORWARD_SECRET", secret).start();
    let body = example("github/push.json");
    host.post_github("push", "fwd-1", &body, SECRET);
    assert_eq!(host.wait_for_event("fwd-1")["status"], "done");
    let got = receiver.wait_for(1);
    assert_eq!(got[0].body, body, "the payload is forwarded byte for byte");
    assert_eq!(
        (got[0].header("webhook-id"), got[0].header("wasmhook-event-type")),
        (Some("fwd-1"), Some("github.push"))
    );
    // The host's own Standard Webhooks verifier accepts what the plugin signed.
    let headers: hyper::HeaderMap = got[0]
        .headers
        .iter()
        .map(|(k, v)| (hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value")))
        .collect();
    let key = wasmhook::config::Secret::from_standard_webhooks(secret).expect("key");
    let now = wasmhook::event::now_ms() / 1000;
    let verified = wasmhook::ingest::verify::standard_webhooks::verify(
        &[key],
        std::time::Duration::from_secs(300),
        &headers,
        &body,
        now,
    );
    assert!(verified.is_ok(), "{verified:?}");
}

#[test]
fn forward_to_a_host_outside_its_grant_is_refused_and_never_sent() {
    let receiver = Receiver::start();
    let manifest = format!(
        "http_allow = [\"example.com\"]\n[config]\nurl = \"{}/in\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
        receiver.url
    );
    let host = TestHost::builder().plugin_with_manifest("forward", &manifest).start();
    host.post_github("push", "fwd-2", &example("github/push.json"), SECRET);
    let event = host.wait_for_event("fwd-2");
    assert_eq!(event["status"], "dead", "{event}");
    assert!(event["deliveries"][0]["last_error"].as_str().is_some_and(|e| e.contains("request denied")), "{event}");
    assert!(receiver.received().is_empty());
}

/// Sends `ids` one after another, each once the one before is finished, and returns the call
/// number the `count` fault logged for each.
fn call_numbers(host: &mut TestHost, ids: &[&str]) -> Vec<u32> {
    ids.iter()
        .map(|id| {
            host.post_github("push", id, &example("github/push.json"), SECRET);
            host.wait_for_event(id);
            let line = host.wait_for_log(&format!(" for {id}\""));
            let number = line.split("call number ").nth(1).and_then(|rest| rest.split_whitespace().next());
            number.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no call number in {line}"))
        })
        .collect()
}

#[test]
fn each_call_gets_a_fresh_instance_unless_the_manifest_grants_reuse() {
    let mut fresh = TestHost::builder().plugin_with_manifest("faulty", "[config]\nfault = \"count\"\n").start();
    assert_eq!(call_numbers(&mut fresh, &["f-0", "f-1", "f-2"]), [1, 1, 1], "state leaked between events");

    let manifest = "reuse = 2\nconcurrency = 1\n[config]\nfault = \"count\"\n";
    let mut reused = TestHost::builder().plugin_with_manifest("faulty", manifest).start();
    assert_eq!(
        call_numbers(&mut reused, &["r-0", "r-1", "r-2", "r-3"]),
        [1, 2, 1, 2],
        "one instance serves reuse = 2 calls"
    );

    // An instance that waits past `reuse_idle` for its next call is dropped, and the next call
    // gets a fresh one.
    let manifest = "reuse = 10\nreuse_idle = \"3s\"\nconcurrency = 1\n[config]\nfault = \"count\"\n";
    let mut idle = TestHost::builder().plugin_with_manifest("faulty", manifest).start();
    assert_eq!(call_numbers(&mut idle, &["i-0", "i-1"]), [1, 2]);
    idle.wait_for_log("reused instances dropped after waiting 3s");
    assert_eq!(call_numbers(&mut idle, &["i-2", "i-3"]), [1, 2], "a fresh instance after the wait");
}
