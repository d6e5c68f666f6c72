//! What operators and plugin authors see: metrics that move as events flow, JSON log lines
//! with the documented fields, readiness, and the `plugin`, `config` and `status` commands.

use std::process::Command;

use crate::util::{SECRET, TestHost, example, metric, plugin_wasm, scrape, workspace};

fn wasmhook(args: &[&str]) -> (bool, String) {
    wasmhook_with(args, &[])
}

/// `wasmhook ARGS` with these environment variables set too.
fn wasmhook_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_wasmhook"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("WASMHOOK_ADMIN_TOKEN")
        .env_remove("WASMHOOK_ADMIN_URL")
        .output()
        .expect("run wasmhook");
    (
        output.status.success(),
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    )
}

#[test]
fn metrics_move_as_events_flow() {
    let host = TestHost::builder().plugin("echo").start();
    let before = scrape(&host);
    host.post_github("push", "m-1", &example("github/push.json"), SECRET);
    host.post_github("push", "m-2", &example("github/push.json"), SECRET);
    host.post_github("push", "m-3", &example("github/push.json"), "wrong");
    host.wait_for_event("m-1");
    host.wait_for_event("m-2");
    let after = scrape(&host);
    let moved = |name: &str, labels: &[(&str, &str)]| metric(&after, name, labels) - metric(&before, name, labels);
    assert_eq!(moved("wasmhook_requests_total", &[("source", "github"), ("status", "202")]), 2.0, "{after}");
    assert_eq!(moved("wasmhook_requests_total", &[("source", "github"), ("status", "401")]), 1.0);
    assert_eq!(moved("wasmhook_verification_failures_total", &[("source", "github"), ("reason", "mismatch")]), 1.0);
    assert_eq!(moved("wasmhook_events_accepted_total", &[("source", "github")]), 2.0);
    assert_eq!(moved("wasmhook_deliveries_done_total", &[("plugin", "echo")]), 2.0);
    assert_eq!(moved("wasmhook_call_duration_seconds_count", &[("plugin", "echo"), ("outcome", "done")]), 2.0);
    assert!(moved("wasmhook_journal_commit_seconds_count", &[]) >= 1.0);
    // Each acceptance waited for an fsync of the journal (two posts: one or two fsyncs).
    assert!(moved("wasmhook_journal_sync_seconds_count", &[]) >= 1.0, "{after}");
    assert_eq!(metric(&after, "wasmhook_plugins_loaded", &[]), 1.0);
    assert_eq!(metric(&after, "wasmhook_deliveries", &[("status", "pending")]), 0.0);
    assert!(after.contains("# HELP wasmhook_call_duration_seconds"), "metrics are described");
}

#[test]
fn json_log_lines_parse_and_carry_the_event_fields() {
    let mut host = TestHost::builder().plugin("github-push").start();
    host.post_github("push", "j-1", &example("github/push.json"), SECRET);
    host.wait_for_event("j-1");
    // The delivery can be logged before the ingest worker logs "accepted": wait for both.
    host.wait_for_log("\"outcome\":\"done\"");
    host.wait_for_log("\"message\":\"accepted\"");
    let lines: Vec<serde_json::Value> = host
        .log()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let find = |message: &str| lines.iter().find(|line| line["message"] == message).cloned().unwrap_or_default();
    let accepted = find("accepted");
    assert_eq!((accepted["event.id"].as_str(), accepted["event.type"].as_str()), (Some("j-1"), Some("github.push")));
    assert_eq!(accepted["source"], "github");
    let delivered = find("delivered");
    for field in ["event.id", "event.type", "source", "plugin", "attempt", "duration_ms", "outcome"] {
        assert!(!delivered[field].is_null(), "the delivery line lacks {field}: {delivered}");
    }
    let plugin_line = find("octo-org/hello-world refs/heads/main: 2 commits by octocat");
    assert_eq!((plugin_line["plugin"].as_str(), plugin_line["event.id"].as_str()), (Some("github-push"), Some("j-1")));
}

#[test]
fn readiness_checks_the_journal_and_the_plugins_folder() {
    let host = TestHost::builder().plugin("echo").start();
    let (status, body) = host.admin_get("/readyz");
    assert_eq!((status, &body["ready"]), (200, &serde_json::json!(true)), "{body}");
    std::fs::remove_dir_all(host.plugins_dir()).expect("remove the plugins folder");
    let (status, body) = host.admin_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body["checks"]["plugins_folder"].as_str().is_some_and(|c| c.contains("cannot read")), "{body}");
    assert_eq!(body["checks"]["journal"], "ok");
}

#[test]
fn plugin_run_calls_each_example_once() {
    let push = workspace().join("examples/github/push.json");
    let missing = workspace().join("examples/github/push-missing-fields.json");
    let run = |plugin: &str, event: &std::path::Path, extra: &[&str]| {
        let file = plugin_wasm(plugin);
        let mut args = vec![
            "plugin",
            "run",
            file.to_str().expect("path"),
            "--event",
            event.to_str().expect("path"),
            "--type",
            "github.push",
        ];
        args.extend_from_slice(extra);
        wasmhook(&args)
    };
    let (ok, output) = run("github-push", &push, &[]);
    assert!(ok && output.contains("octo-org/hello-world refs/heads/main: 2 commits by octocat"), "{output}");
    assert!(output.contains("outcome: done in"), "{output}");
    let (ok, output) = run("echo", &push, &[]);
    assert!(ok && output.contains("github.push sample-"), "{output}");
    let (ok, output) = run("github-push", &missing, &[]);
    assert!(!ok && output.contains("outcome: permanent:") && output.contains("repository"), "{output}");
    let (ok, output) = run("slack-notify", &push, &[]);
    assert!(!ok && output.contains("no webhook_url"), "{output}");
    let (ok, output) = run("forward", &push, &[]);
    assert!(!ok && output.contains("no url"), "{output}");
    let (ok, output) = run("faulty", &push, &["--config", "fault=emit-chain"]);
    assert!(ok && output.contains("emitted: test.chain cli:sample-"), "{output}");
    let (ok, output) = run("faulty", &push, &["--config", "fault=recursion"]);
    assert!(!ok && output.contains("wasm stack limit"), "{output}");
}

#[test]
fn plugin_check_shows_a_plugin_and_refuses_what_is_not_one() {
    let echo = plugin_wasm("echo");
    let (ok, output) = wasmhook(&["plugin", "check", echo.to_str().expect("path")]);
    assert!(ok && output.contains("component:     echo 0.1.0") && output.contains("subscriptions: *"), "{output}");
    assert!(output.contains("instances:     a fresh one per call"), "{output}");
    let reused = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&echo, reused.path().join("echo.wasm")).expect("copy");
    std::fs::write(reused.path().join("echo.toml"), "reuse = 100\nreuse_idle = \"2s\"\n").expect("manifest");
    let (ok, output) = wasmhook(&["plugin", "check", reused.path().join("echo.wasm").to_str().expect("path")]);
    assert!(ok && output.contains("each reused for up to 100 calls, dropped after 2000 ms idle"), "{output}");

    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x01\0\0\0").expect("write a core module header");
    let (ok, output) = wasmhook(&["plugin", "check", garbage.to_str().expect("path")]);
    assert!(!ok && output.contains("not a valid WebAssembly component"), "{output}");

    let command = plugin_wasm("command");
    let (ok, output) = wasmhook(&["plugin", "check", command.to_str().expect("path")]);
    assert!(!ok && output.contains("does not implement the wasmhook:plugin world"), "{output}");
}

#[test]
fn config_check_names_the_line_of_an_error_and_passes_a_good_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:8080\"\n\n[sources.github]\nverify = \"gitlab\"\n").expect("write");
    let (ok, output) = wasmhook(&["config", "check", bad.to_str().expect("path")]);
    assert!(!ok && output.contains("bad.toml") && output.contains("line 4"), "{output}");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[sources.ci]\nverify = \"none\"\n").expect("write");
    let (ok, output) = wasmhook(&["config", "check", good.to_str().expect("path")]);
    assert!(ok && output.contains("ok (1 sources"), "{output}");
}

#[test]
fn the_example_configs_pass_config_check() {
    let secrets = [
        ("GITHUB_WEBHOOK_SECRET", "x"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_eA=="),
        ("SLACK_SIGNING_SECRET", "x"),
        ("STANDARD_WEBHOOKS_SECRET", "whsec_ZGV2"),
        ("GITLAB_WEBHOOK_TOKEN", "x"),
        ("CI_WEBHOOK_SECRET", "x"),
    ];
    for (file, journal) in [("wasmhook.toml", "journal: sqlite"), ("wasmhook-nats.toml", "journal: nats stream")] {
        let path = workspace().join("examples").join(file);
        let (ok, output) = wasmhook_with(&["config", "check", path.to_str().expect("path")], &secrets);
        assert!(ok && output.contains(journal), "{file}: {output}");
    }
}

#[test]
fn status_shows_one_screen_of_a_running_host() {
    let host = TestHost::builder().plugin("echo").start();
    host.post_github("push", "s-1", &example("github/push.json"), SECRET);
    host.wait_for_event("s-1");
    let (ok, output) = host.cli(&["status"]);
    assert!(ok, "{output}");
    assert!(output.contains("1 stored") && output.contains("1 done"), "{output}");
    assert!(
        output.lines().any(|line| line.starts_with("echo") && line.contains("loaded") && line.contains("0.1.0")),
        "{output}"
    );
}

#[test]
fn plugin_new_scaffolds_a_crate_that_builds_and_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, output) = wasmhook(&["plugin", "new", "hello-hook", "--dir", dir.path().to_str().expect("path")]);
    assert!(ok, "{output}");
    let root = dir.path().join("hello-hook");
    // A target folder of its own, kept between runs, so later runs compile little.
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--offline"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", workspace().join("target/scaffold"))
        .output()
        .expect("cargo build");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let wasm = workspace().join("target/scaffold/wasm32-wasip2/release/hello_hook.wasm");
    let (ok, output) = wasmhook(&["plugin", "check", wasm.to_str().expect("path")]);
    assert!(ok && output.contains("hello-hook 0.1.0"), "{output}");
}
