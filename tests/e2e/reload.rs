//! Hot reload through the real binary: plugins replaced, copied in pieces, removed and
//! re-added, and re-granted while events flow, with nothing lost or run on two versions.

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::util::{EventStream, PATIENCE, SECRET, TestHost, example, plugin_wasm};

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Replaces `dir/name` the safe way: write a temporary file beside it, then rename it over.
fn deploy(dir: &Path, name: &str, bytes: &[u8]) {
    let staging = dir.join(format!(".{name}.partial"));
    std::fs::write(&staging, bytes).expect("write the staging file");
    std::fs::rename(&staging, dir.join(name)).expect("rename into place");
}

/// The `/v1/plugins` entry of `name`.
fn plugin(host: &TestHost, name: &str) -> serde_json::Value {
    let (_, list) = host.admin_get("/v1/plugins");
    list["plugins"].as_array().expect("list").iter().find(|p| p["name"] == name).cloned().unwrap_or_default()
}

/// Waits until the plugin `name` satisfies `ready`.
fn wait_for_plugin(
    host: &TestHost,
    name: &str,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entry = plugin(host, name);
        if ready(&entry) {
            return entry;
        }
        assert!(Instant::now() < deadline, "{name} never became {what}: {entry}\n{}", host.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the plugin `name` shows `status` (`loaded`, `failed` or `removed`).
fn wait_for_status(host: &TestHost, name: &str, status: &str) -> serde_json::Value {
    wait_for_plugin(host, name, status, |entry| entry["status"] == status)
}

/// The bytes of a compiled plugin.
fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(plugin_wasm(name)).unwrap_or_else(|err| panic!("{name}: {err}"))
}

#[test]
fn fifty_swaps_under_a_stream_lose_nothing_and_each_delivery_ran_one_version() {
    let (echo, flaky) = (wasm("echo"), wasm("flaky"));
    let versions = [(sha256(&echo), &echo), (sha256(&flaky), &flaky)];
    let host = TestHost::builder().file("target.wasm", echo.clone()).start();
    let stream = EventStream::start(&host.url, "swap", Duration::from_millis(2));
    for swap in 1..=50 {
        let (sha, bytes) = &versions[swap % 2];
        deploy(&host.plugins_dir(), "target.wasm", bytes);
        wait_for_plugin(&host, "target", "swapped", |entry| entry["sha256"] == sha.as_str());
    }
    let accepted = stream.stop();

    let last = &versions[50 % 2].0;
    let mut after = Vec::new();
    for n in 0..5 {
        let id = format!("after-{n}");
        assert_eq!(host.post_github("push", &id, &example("github/push.json"), SECRET).0, 202);
        after.push(id);
    }
    assert!(accepted.len() >= 50, "only {} events went through the swaps", accepted.len());
    let events: Vec<_> = accepted.iter().chain(&after).map(|id| (id, host.wait_for_event(id))).collect();
    host.sync_log(); // every plugin line of those deliveries is in the log
    for (id, event) in &events {
        let delivery = &event["deliveries"][0];
        assert_eq!((event["status"].as_str(), delivery["attempts"].as_u64()), (Some("done"), Some(1)), "{event}");
        let ran = delivery["sha256"].as_str().expect("the version that ran it");
        assert!(versions.iter().any(|(sha, _)| sha == ran), "{id} ran on an unknown version {ran}");
        // Exactly one effect, by the version recorded: echo's line or flaky's line.
        let (echo_effects, flaky_effects) =
            (host.count_log(&format!("github.push {id} from github")), host.count_log(&format!("effect {id} attempt")));
        let expected = if ran == versions[0].0 { (1, 0) } else { (0, 1) };
        assert_eq!((echo_effects, flaky_effects), expected, "{id} ran on {ran}");
    }
    for id in &after {
        assert_eq!(
            host.wait_for_event(id)["deliveries"][0]["sha256"].as_str(),
            Some(last.as_str()),
            "{id} ran on an old version"
        );
    }
}

#[test]
fn a_component_copied_in_pieces_serves_the_old_version_until_it_is_whole() {
    let (echo, flaky) = (wasm("echo"), wasm("flaky"));
    let mut host = TestHost::builder().file("target.wasm", echo.clone()).start();
    let target = host.plugins_dir().join("target.wasm");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&target).expect("truncate in place");
        for (n, piece) in flaky.chunks(flaky.len() / 4 + 1).enumerate() {
            file.write_all(piece).expect("write a piece");
            file.flush().expect("flush");
            // Longer than the watcher's debounce: the host sees the half-written file.
            std::thread::sleep(crate::util::DEBOUNCE_AND_SOME);
            if n == 1 {
                host.post_github("push", "mid-copy", &example("github/push.json"), SECRET);
                let event = host.wait_for_event("mid-copy");
                assert_eq!(event["deliveries"][0]["sha256"].as_str(), Some(sha256(&echo).as_str()), "{event}");
            }
        }
    }
    host.wait_for_log("plugin not reloaded; the previous version keeps serving");
    let entry =
        wait_for_plugin(&host, "target", "the whole new version", |entry| entry["sha256"] == sha256(&flaky).as_str());
    assert!(entry["last_error"].is_null(), "{entry}");
    host.post_github("push", "after-copy", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("after-copy")["deliveries"][0]["sha256"].as_str(), Some(sha256(&flaky).as_str()));
}

#[test]
fn a_removed_plugin_keeps_its_pending_deliveries_until_it_returns() {
    let flaky = wasm("flaky");
    let manifest = "concurrency = 1\n[config]\nslow_ms = \"300\"\n";
    let host =
        TestHost::builder().plugin("echo").file("flaky.toml", manifest).file("flaky.wasm", flaky.clone()).start();
    for n in 0..6 {
        host.post_github("push", &format!("queued-{n}"), &example("github/push.json"), SECRET);
    }
    std::fs::remove_file(host.plugins_dir().join("flaky.wasm")).expect("remove");
    let removed = wait_for_status(&host, "flaky", "removed");
    assert!(removed["pending"].as_u64().is_some_and(|pending| pending > 0), "{removed}");

    // While it is away, its queued deliveries do not run (the call already running may end).
    let effects = || {
        host.sync_log();
        (0..6).map(|n| host.count_log(&format!("effect queued-{n} attempt"))).sum::<usize>()
    };
    let at_removal = effects();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(effects() <= at_removal + 1, "queued deliveries ran on a removed plugin");

    host.post_github("push", "while-away", &example("github/push.json"), SECRET);
    let plugins: Vec<_> = host.wait_for_event("while-away")["deliveries"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["plugin"].clone())
        .collect();
    assert_eq!(plugins, ["echo"], "a removed plugin got a new delivery");

    deploy(&host.plugins_dir(), "flaky.wasm", &flaky);
    for n in 0..6 {
        let event = host.wait_for_event(&format!("queued-{n}"));
        assert_eq!(event["status"], "done", "{event}");
        assert!(event["deliveries"][1]["status"] == "done", "{event}");
    }
    assert_eq!(plugin(&host, "flaky")["status"], "loaded");
}

#[test]
fn a_plugin_removed_and_back_while_a_call_runs_keeps_to_its_concurrency() {
    let flaky = wasm("flaky");
    // The call outlasts the removal and return (well under a second) but not the timeout.
    let manifest = "concurrency = 1\ntimeout = \"30s\"\n[config]\nslow_ms = \"4000\"\n";
    let host = TestHost::builder().file("flaky.toml", manifest).file("flaky.wasm", flaky.clone()).start();
    let in_flight = || crate::util::metric(&crate::util::scrape(&host), "wasmhook_calls_in_flight", &[]);
    host.post_github("push", "first", &example("github/push.json"), SECRET);
    host.post_github("push", "second", &example("github/push.json"), SECRET);
    let deadline = Instant::now() + PATIENCE;
    while in_flight() < 1.0 {
        assert!(Instant::now() < deadline, "no call started:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(host.plugins_dir().join("flaky.wasm")).expect("remove");
    wait_for_status(&host, "flaky", "removed");
    deploy(&host.plugins_dir(), "flaky.wasm", &flaky);
    wait_for_status(&host, "flaky", "loaded");
    let first = host.admin_get("/v1/events/first").1;
    assert_ne!(first["status"], "done", "the first call must still run for this test to mean anything: {first}");
    let mut most = 0.0_f64;
    while host.admin_get("/v1/events/first").1["status"] != "done" {
        most = most.max(in_flight());
        assert!(Instant::now() < deadline, "the first call never ended:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(most <= 1.0, "the call still running counts against the version back: {most} in flight");
    let deadline = Instant::now() + PATIENCE;
    while host.admin_get("/v1/events/second").1["status"] != "done" {
        assert!(Instant::now() < deadline, "the second call never ended:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_plugin_whose_metadata_never_returns_fails_to_load_within_10_s_whatever_its_timeout() {
    let host = TestHost::builder().plugin("echo").start();
    let manifest = "timeout = \"15m\"\n[config]\nfault = \"metadata-loop\"\n";
    deploy(&host.plugins_dir(), "faulty.toml", manifest.as_bytes());
    deploy(&host.plugins_dir(), "faulty.wasm", &wasm("faulty"));
    let failed = wait_for_status(&host, "faulty", "failed");
    assert!(failed["last_error"].as_str().is_some_and(|e| e.contains("timeout after 10000 ms")), "{failed}");
    host.post_github("push", "still-served", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("still-served")["status"], "done");
}

#[test]
fn a_manifest_only_change_takes_effect() {
    let host = TestHost::builder().plugin_with_manifest("echo", "subscriptions = [\"github.push\"]\n").start();
    host.post_github("issues", "before", br#"{"action":"opened"}"#, SECRET);
    assert_eq!(host.wait_for_event("before")["status"], "unrouted");
    deploy(&host.plugins_dir(), "echo.toml", b"subscriptions = [\"github.issues.*\"]\n");
    wait_for_plugin(&host, "echo", "re-subscribed", |entry| {
        entry["subscriptions"] == serde_json::json!(["github.issues.*"])
    });
    host.post_github("issues", "after", br#"{"action":"opened"}"#, SECRET);
    assert_eq!(host.wait_for_event("after")["status"], "done");

    // A bad pattern in the manifest is reported against the manifest.
    deploy(&host.plugins_dir(), "echo.toml", b"subscriptions = [\"github.[issues\"]\n");
    let failed = wait_for_plugin(&host, "echo", "refused", |entry| entry["last_error"].is_string());
    let error = failed["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("echo.toml: subscription \"github.[issues\" is not a valid pattern"), "{failed}");
}

#[test]
fn a_kubernetes_style_volume_update_swapping_its_data_link_reloads() {
    use std::os::unix::fs::symlink;
    let (echo, flaky) = (wasm("echo"), wasm("flaky"));
    let host = TestHost::builder().start();
    let dir = host.plugins_dir();
    // As the kubelet lays out a ConfigMap: a timestamped folder, `..data` linking to it, and
    // each file a link through `..data`.
    std::fs::create_dir(dir.join("..v1")).expect("mkdir");
    std::fs::write(dir.join("..v1/target.wasm"), &echo).expect("write");
    symlink("..v1", dir.join("..data")).expect("link ..data");
    symlink("..data/target.wasm", dir.join("target.wasm")).expect("link target.wasm");
    wait_for_plugin(&host, "target", "loaded", |entry| entry["sha256"] == sha256(&echo).as_str());

    // An update: a new folder, then `..data` renamed over in one step; no `*.wasm` changes.
    std::fs::create_dir(dir.join("..v2")).expect("mkdir");
    std::fs::write(dir.join("..v2/target.wasm"), &flaky).expect("write");
    symlink("..v2", dir.join("..data_tmp")).expect("link ..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    wait_for_plugin(&host, "target", "updated", |entry| entry["sha256"] == sha256(&flaky).as_str());
}

#[test]
fn a_plugins_folder_replaced_whole_is_watched_in_its_place() {
    use std::os::unix::fs::symlink;
    let (echo, flaky) = (wasm("echo"), wasm("flaky"));
    let mut host = TestHost::builder().plugin("echo").start();
    let dir = host.plugins_dir();
    let beside = |name: &str| dir.with_file_name(name);

    // A new folder staged beside the old one, the old renamed away, the new renamed in.
    std::fs::create_dir(beside("v1")).expect("mkdir");
    std::fs::write(beside("v1").join("flaky.wasm"), &flaky).expect("write");
    std::fs::rename(&dir, beside("old")).expect("rename the old folder away");
    std::fs::rename(beside("v1"), &dir).expect("rename the new folder in");
    wait_for_status(&host, "flaky", "loaded");
    wait_for_status(&host, "echo", "removed");
    host.wait_for_log("the plugins folder itself changed; watching the one now there");
    // The watch moved with the name: a file dropped into the new folder loads.
    deploy(&dir, "dropped.wasm", &echo);
    wait_for_status(&host, "dropped", "loaded");

    // The folder deleted: its plugins keep serving until a new one is made.
    std::fs::remove_dir_all(&dir).expect("delete the folder");
    host.wait_for_log("the plugins folder is gone; its plugins keep serving until it returns");
    host.post_github("push", "while-gone", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("while-gone")["status"], "done");
    std::fs::create_dir(&dir).expect("mkdir");
    deploy(&dir, "echo.wasm", &echo);
    wait_for_status(&host, "echo", "loaded");
    wait_for_status(&host, "flaky", "removed");

    // The folder made a link, then the link swapped to another folder as `mv -T` does.
    std::fs::rename(&dir, beside("v1")).expect("rename");
    symlink("v1", &dir).expect("link to v1");
    std::fs::create_dir(beside("v2")).expect("mkdir");
    std::fs::write(beside("v2").join("flaky.wasm"), &flaky).expect("write");
    symlink("v2", beside("plugins.tmp")).expect("link to v2");
    std::fs::rename(beside("plugins.tmp"), &dir).expect("swap the link");
    wait_for_status(&host, "flaky", "loaded");
    wait_for_status(&host, "echo", "removed");
    deploy(&beside("v2"), "linked.wasm", &echo);
    wait_for_status(&host, "linked", "loaded");
}

#[test]
fn the_reload_endpoint_follows_a_folder_replaced_where_the_watch_cannot_see() {
    use std::os::unix::fs::symlink;
    let (echo, flaky) = (wasm("echo"), wasm("flaky"));
    let mut host = TestHost::builder().plugin("echo").start();
    let dir = host.plugins_dir();
    let beside = |name: &str| dir.with_file_name(name);
    // `plugins` links to `current/plugins`, and `current` to `a`: swapping `current` changes the
    // folder with no event in the two folders the host watches (the folder and its parent).
    // The links are made while the host is down, so no change of them is still on its way.
    host.kill();
    std::fs::create_dir(beside("a")).expect("mkdir");
    std::fs::rename(&dir, beside("a").join("plugins")).expect("move the folder into a");
    symlink("a", beside("current")).expect("link current");
    symlink("current/plugins", &dir).expect("link plugins");
    host.restart();
    wait_for_status(&host, "echo", "loaded");
    std::fs::create_dir_all(beside("b").join("plugins")).expect("mkdir");
    std::fs::write(beside("b").join("plugins/flaky.wasm"), &flaky).expect("write");
    symlink("b", beside("current.new")).expect("link");
    std::fs::rename(beside("current.new"), beside("current")).expect("swap current");
    std::thread::sleep(crate::util::DEBOUNCE_AND_SOME);
    assert_ne!(plugin(&host, "flaky")["status"], "loaded", "the watch saw the swap after all: this test means nothing");

    let (status, answer) = crate::util::post(&format!("{}/v1/plugins/reload", host.admin), &[], b"");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["loaded"], serde_json::json!(["flaky"]), "{answer}");
    // The watch moved too: a file dropped into the new folder loads by itself.
    deploy(&beside("b").join("plugins"), "dropped.wasm", &echo);
    wait_for_status(&host, "dropped", "loaded");
}

#[test]
fn the_reload_endpoint_and_sighup_rescan_the_folder() {
    let mut host = TestHost::builder().plugin("echo").start();
    let answer = crate::util::post(&format!("{}/v1/plugins/reload", host.admin), &[], b"");
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(answer.1["unchanged"], 1, "{}", answer.1);
    let status =
        // The shell's builtin kill: no procps needed.
        std::process::Command::new("sh").args(["-c", &format!("kill -HUP {}", host.pid())]).status().expect("kill -HUP");
    assert!(status.success());
    host.wait_for_log("SIGHUP: rescanning the plugins folder");
    assert_eq!(host.admin_get("/healthz").0, 200);

    // A file that failed is logged once by the watcher's rescans, but both triggers try it
    // again (its failure may have passed).
    deploy(&host.plugins_dir(), "garbage.wasm", b"\0asm\x01\0\0\0");
    wait_for_status(&host, "garbage", "failed");
    deploy(&host.plugins_dir(), "unrelated.toml", b"");
    std::thread::sleep(crate::util::DEBOUNCE_AND_SOME);
    host.sync_log();
    assert_eq!(host.count_log("garbage.wasm"), 1, "logged once:\n{}", host.log());
    let answer = crate::util::post(&format!("{}/v1/plugins/reload", host.admin), &[], b"");
    assert_eq!(answer.1["failed"], serde_json::json!(["garbage"]), "tried again: {}", answer.1);
    host.wait_for_log_count("garbage.wasm", 2);
    std::process::Command::new("sh").args(["-c", &format!("kill -HUP {}", host.pid())]).status().expect("kill -HUP");
    host.wait_for_log_count("garbage.wasm", 3);
    // Once its file is gone, a plugin that never loaded is no longer listed.
    std::fs::remove_file(host.plugins_dir().join("garbage.wasm")).expect("remove");
    wait_for_plugin(&host, "garbage", "forgotten", serde_json::Value::is_null);
    // A removed plugin whose file comes back bad is failed, not removed.
    std::fs::remove_file(host.plugins_dir().join("echo.wasm")).expect("remove");
    wait_for_status(&host, "echo", "removed");
    deploy(&host.plugins_dir(), "echo.wasm", b"\0asm\x01\0\0\0");
    wait_for_status(&host, "echo", "failed");
    // Gone again, it is removed once more: still listed, with the deliveries that wait for it.
    std::fs::remove_file(host.plugins_dir().join("echo.wasm")).expect("remove");
    wait_for_status(&host, "echo", "removed");
}
