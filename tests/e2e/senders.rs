//! Every sender through the real binary: each scheme signed by `wasmhook send`, refused when
//! wrong or stale, Slack's handshake and retries, and CloudEvents in all three modes.

use std::process::Command;

use crate::util::{TestHost, post, workspace};

const SOURCES: &str = r#"
[sources.stripe]
verify = "stripe"
secret_env = "STRIPE_SECRET"

[sources.slack]
verify = "slack"
secret_env = "SLACK_SECRET"

[sources.svix]
verify = "standard-webhooks"
secret_env = "SVIX_SECRET"

[sources.gitlab]
verify = "token"
secret_env = "GITLAB_TOKEN"
header = "X-Gitlab-Token"
id_header = "Idempotency-Key"
type_header = "X-Gitlab-Event"

[sources.ci]
verify = "hmac"
secret_env = "CI_SECRET"
header = "X-Signature"
prefix = "sha256="
timestamp_header = "X-Timestamp"
id_pointer = "/id"

[sources.events]
verify = "none"
format = "cloudevents"
"#;

/// Each variable and its secret, as the host and `wasmhook send` both see them.
const SECRETS: [(&str, &str); 6] = [
    ("TEST_GITHUB_SECRET", "test-secret"),
    ("STRIPE_SECRET", "whsec_stripe-test"),
    ("SLACK_SECRET", "slack-test"),
    ("SVIX_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("GITLAB_TOKEN", "gitlab-test"),
    ("CI_SECRET", "ci-test"),
];

fn host() -> TestHost {
    let mut builder = TestHost::builder().plugin("echo").config(SOURCES);
    for (var, secret) in SECRETS {
        builder = builder.env(var, secret);
    }
    builder.start()
}

/// Runs `wasmhook send SCHEME --url URL/hooks/SOURCE ARGS… FILE`; returns success and stdout.
fn send(host: &TestHost, scheme: &str, source: &str, args: &[&str], file: &str, wrong_secrets: bool) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmhook"));
    command.args(["send", scheme, "--url", &format!("{}/hooks/{source}", host.url)]).args(args);
    command.arg(workspace().join("examples").join(file));
    for (var, secret) in SECRETS {
        let value = match (wrong_secrets, var) {
            (false, _) => secret.to_owned(),
            // Another well-formed key: a malformed one would be refused by `send` itself.
            (true, "SVIX_SECRET") => "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_owned(),
            (true, _) => format!("{secret}-wrong"),
        };
        command.env(var, value);
    }
    let output = command.output().expect("run wasmhook send");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `send` cases: scheme, source, flags, payload, and the type the event should get.
fn cases() -> Vec<(&'static str, &'static str, Vec<&'static str>, &'static str, &'static str)> {
    vec![
        (
            "github",
            "github",
            vec!["--secret-env", "TEST_GITHUB_SECRET", "--event", "push"],
            "github/push.json",
            "github.push",
        ),
        ("stripe", "stripe", vec!["--secret-env", "STRIPE_SECRET"], "stripe/invoice.paid.json", "stripe.invoice.paid"),
        ("slack", "slack", vec!["--secret-env", "SLACK_SECRET"], "slack/app_mention.json", "slack.app_mention"),
        (
            "standard-webhooks",
            "svix",
            vec!["--secret-env", "SVIX_SECRET"],
            "standard-webhooks/invoice.paid.json",
            "svix.invoice.paid",
        ),
        (
            "token",
            "gitlab",
            vec![
                "--secret-env",
                "GITLAB_TOKEN",
                "--header",
                "X-Gitlab-Token",
                "-H",
                "X-Gitlab-Event: Push Hook",
                "-H",
                "Idempotency-Key: gl-1",
            ],
            "gitlab/push.json",
            "gitlab.push_hook",
        ),
        (
            "hmac",
            "ci",
            vec![
                "--secret-env",
                "CI_SECRET",
                "--header",
                "X-Signature",
                "--prefix",
                "sha256=",
                "--timestamp-header",
                "X-Timestamp",
            ],
            "hmac/deploy.json",
            "ci.deploy.finished",
        ),
    ]
}

#[test]
fn every_scheme_signed_by_send_is_accepted_and_delivered() {
    let host = host();
    for (scheme, source, args, file, event_type) in cases() {
        let (ok, stdout) = send(&host, scheme, source, &args, file, false);
        assert!(ok && stdout.starts_with("202 "), "{scheme}: {stdout}");
        let answer: serde_json::Value = serde_json::from_str(&stdout[4..]).expect("json answer");
        assert_eq!(answer["type"], event_type, "{scheme}: {answer}");
        let id = answer["id"].as_str().expect("an id");
        let event = host.wait_for_event(id);
        assert_eq!(
            (event["status"].as_str(), event["source"].as_str()),
            (Some("done"), Some(source)),
            "{scheme}: {event}"
        );
    }
}

#[test]
fn every_scheme_refuses_a_wrong_secret() {
    let host = host();
    for (scheme, source, args, file, _) in cases() {
        let (ok, stdout) = send(&host, scheme, source, &args, file, true);
        assert!(!ok && stdout.starts_with("401 "), "{scheme}: {stdout}");
        assert!(!stdout.contains("-wrong"), "{scheme} echoed the secret: {stdout}");
    }
    let (_, stats) = host.admin_get("/v1/stats");
    assert_eq!(stats["events"], 0, "a refused request was stored: {stats}");
}

#[test]
fn a_refusal_never_shows_the_expected_signature() {
    let host = host();
    let body = br#"{"id":"evt_x","type":"invoice.paid"}"#;
    let now = wasmhook::event::now_ms() / 1000;
    let expected = wasmhook::ingest::verify::stripe::sign(b"whsec_stripe-test", now, body);
    let forged = format!("t={now},v1={}", "0".repeat(64));
    let (status, answer) = post(
        &format!("{}/hooks/stripe", host.url),
        &[("content-type", "application/json"), ("stripe-signature", &forged)],
        body,
    );
    assert_eq!(status, 401);
    let v1 = expected.split("v1=").nth(1).expect("v1");
    assert!(!answer.to_string().contains(v1), "{answer}");
}

#[test]
fn a_stale_or_future_timestamp_is_refused_with_the_reason() {
    let host = host();
    let body = br#"{"id":"evt_old","type":"invoice.paid"}"#;
    let now = wasmhook::event::now_ms() / 1000;
    for (when, reason) in [(now - 600, "old"), (now + 600, "future")] {
        let signature = wasmhook::ingest::verify::stripe::sign(b"whsec_stripe-test", when, body);
        let (status, answer) = post(
            &format!("{}/hooks/stripe", host.url),
            &[("content-type", "application/json"), ("stripe-signature", &signature)],
            body,
        );
        assert_eq!(status, 401, "{answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains(reason)), "{answer}");
    }
}

#[test]
fn slack_url_verification_is_answered_at_once_and_retries_are_duplicates() {
    let host = host();
    let (ok, stdout) =
        send(&host, "slack", "slack", &["--secret-env", "SLACK_SECRET"], "slack/url_verification.json", false);
    assert!(ok, "{stdout}");
    assert_eq!(stdout.trim(), r#"200 {"challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}"#);

    let args = ["--secret-env", "SLACK_SECRET"];
    let (_, first) = send(&host, "slack", "slack", &args, "slack/app_mention.json", false);
    assert!(first.starts_with("202 "), "{first}");
    let retry_args =
        ["--secret-env", "SLACK_SECRET", "-H", "X-Slack-Retry-Num: 1", "-H", "X-Slack-Retry-Reason: http_timeout"];
    let (_, retried) = send(&host, "slack", "slack", &retry_args, "slack/app_mention.json", false);
    assert!(retried.starts_with("200 ") && retried.contains("\"duplicate\":true"), "{retried}");
    let (_, stats) = host.admin_get("/v1/stats");
    assert_eq!(stats["events"], 1, "the handshake is never stored: {stats}");
}

#[test]
fn cloudevents_are_accepted_in_binary_structured_and_batch_mode() {
    let mut host = host();
    let url = format!("{}/hooks/events", host.url);
    let binary = [
        ("content-type", "text/plain"),
        ("ce-id", "bin-1"),
        ("ce-source", "/ci"),
        ("ce-specversion", "1.0"),
        ("ce-type", "com.example.Build.Finished"),
        ("ce-subject", "main"),
    ];
    let (status, answer) = post(&url, &binary, b"build 42 ok");
    assert_eq!((status, answer["type"].as_str()), (202, Some("com.example.Build.Finished")), "{answer}");
    assert_eq!(host.wait_for_event("bin-1")["status"], "done");
    host.wait_for_log("com.example.Build.Finished bin-1 from events (11 bytes");

    let structured = std::fs::read(workspace().join("examples/cloudevents/structured.json")).expect("example");
    let (status, answer) = post(&url, &[("content-type", "application/cloudevents+json")], &structured);
    assert_eq!((status, answer["id"].as_str()), (202, Some("c0ffee00-0001")), "{answer}");

    let batch = std::fs::read(workspace().join("examples/cloudevents/batch.json")).expect("example");
    let (status, answer) = post(&url, &[("content-type", "application/cloudevents-batch+json")], &batch);
    assert_eq!(status, 200, "{answer}");
    let statuses: Vec<_> =
        answer["results"].as_array().expect("results").iter().map(|r| r["status"].as_u64()).collect();
    assert_eq!(statuses, [Some(202), Some(202)], "{answer}");
    assert_eq!(host.wait_for_event("c0ffee00-0003")["type"], "io.k8s.pod.deleted");
}

#[test]
fn a_batch_is_answered_item_by_item_in_order_and_its_items_share_the_journals_commits() {
    // No plugin: every commit during the request is the batch's own, none an outcome's.
    let host = TestHost::builder().config("[sources.events]\nverify = \"none\"\nformat = \"cloudevents\"\n").start();
    let url = format!("{}/hooks/events", host.url);
    let mut items: Vec<String> =
        (0..200).map(|n| format!(r#"{{"specversion":"1.0","type":"t","source":"/s","id":"many-{n}"}}"#)).collect();
    items.push(r#"{"specversion":"1.0","type":"t","source":"/s","id":"many-7"}"#.to_owned());
    items.push(r#"{"specversion":"1.0","type":"t","source":"/other","id":"many-7"}"#.to_owned());
    let batch = format!("[{}]", items.join(","));
    let commits = || crate::util::metric(&crate::util::scrape(&host), "wasmhook_journal_commit_seconds_count", &[]);
    let before = commits();
    let (status, answer) = post(&url, &[("content-type", "application/cloudevents-batch+json")], batch.as_bytes());
    let during = commits() - before;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().expect("results");
    let seen: Vec<_> = results.iter().map(|r| (r["index"].as_u64(), r["status"].as_u64(), r["id"].as_str())).collect();
    let mut expect: Vec<_> = (0..200).map(|n| (Some(n), Some(202), Some(format!("many-{n}")))).collect();
    expect.push((Some(200), Some(200), Some("many-7".to_owned())));
    expect.push((Some(201), Some(202), Some("many-7".to_owned())));
    let expect: Vec<_> = expect.iter().map(|(i, s, id)| (*i, *s, id.as_deref())).collect();
    assert_eq!(seen, expect, "each item in its place; the repeated id is a duplicate, not from another producer");
    // One after another, each item was a commit of its own (202); together they take a few.
    assert!(during < 50.0, "{during} journal commits for 202 items");
}

#[test]
fn a_cloudevent_missing_a_required_attribute_is_refused_naming_it() {
    let host = host();
    let url = format!("{}/hooks/events", host.url);
    let all = [("ce-id", "x-1"), ("ce-source", "/ci"), ("ce-specversion", "1.0"), ("ce-type", "t")];
    for missing in ["ce-id", "ce-source", "ce-specversion", "ce-type"] {
        let headers: Vec<_> = all.iter().copied().filter(|(name, _)| *name != missing).collect();
        let (status, answer) = post(&url, &headers, b"{}");
        assert_eq!(status, 400, "{missing}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains(missing.trim_start_matches("ce-"))), "{answer}");
    }
    let batch = br#"[{"specversion":"1.0","type":"t","source":"/s","id":"ok-1"},{"specversion":"1.0","type":"t","id":"bad-1"}]"#;
    let (_, answer) = post(&url, &[("content-type", "application/cloudevents-batch+json")], batch);
    let results = answer["results"].as_array().expect("results");
    assert_eq!((results[0]["status"].as_u64(), results[1]["status"].as_u64()), (Some(202), Some(400)), "{answer}");
    assert!(results[1]["error"].as_str().is_some_and(|e| e.contains("source")), "{answer}");
}
