//! Plugins: loaded from the folder, bad files skipped, failures recorded.

use crate::util::{SECRET, TestHost, example};

#[test]
fn a_broken_wasm_file_is_skipped_while_the_others_serve() {
    let mut host = TestHost::builder().plugin("echo").file("broken.wasm", b"\0asm but not really".to_vec()).start();
    let line = host.wait_for_log("plugin skipped");
    assert!(line.contains("broken.wasm") && line.contains("not a valid WebAssembly component"), "{line}");

    let (_, plugins) = host.admin_get("/v1/plugins");
    let statuses: Vec<_> = plugins["plugins"]
        .as_array()
        .expect("list")
        .iter()
        .map(|p| (p["name"].as_str(), p["status"].as_str()))
        .collect();
    assert_eq!(statuses, [(Some("broken"), Some("failed")), (Some("echo"), Some("loaded"))]);
    let broken = &plugins["plugins"][0];
    assert!(broken["last_error"].as_str().is_some_and(|e| e.contains("not a valid WebAssembly component")), "{broken}");
    host.post_github("push", "after-broken", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("after-broken")["status"], "done");
}

#[test]
fn a_payload_the_plugin_cannot_use_ends_dead_with_its_reason() {
    let host = TestHost::builder().plugin("github-push").start();
    host.post_github("push", "no-fields", &example("github/push-missing-fields.json"), SECRET);
    let event = host.wait_for_event("no-fields");
    assert_eq!(event["status"], "dead", "{event}");
    let error = event["deliveries"][0]["last_error"].as_str().expect("an error");
    assert!(error.starts_with("permanent:") && error.contains("repository"), "{error}");
}

#[test]
fn plugins_are_listed_with_their_version_and_hash() {
    let host = TestHost::builder().plugin("echo").plugin("github-push").start();
    let (status, body) = host.admin_get("/v1/plugins");
    assert_eq!(status, 200);
    let push = &body["plugins"][1];
    assert_eq!(push["name"], "github-push");
    assert_eq!(push["subscriptions"], serde_json::json!(["github.push"]));
    assert_eq!(push["version"], env!("CARGO_PKG_VERSION"));
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(crate::util::plugin_wasm("github-push")).expect("read")))
    };
    assert_eq!(push["sha256"], expected);
    assert!(push["file"].as_str().is_some_and(|f| f.ends_with("github-push.wasm")));
}
