//! Webhooks in: accepted, refused with the right status, routed or kept as unrouted.

use std::time::{Duration, Instant};

use crate::util::{SECRET, TestHost, example, post};

#[test]
fn signed_push_reaches_github_push_and_echo() {
    let mut host = TestHost::builder().plugin("echo").plugin("github-push").start();
    let (status, body) = host.post_github("push", "push-1", &example("github/push.json"), SECRET);
    assert_eq!(
        (status, body["id"].as_str(), body["type"].as_str()),
        (202, Some("push-1"), Some("github.push")),
        "{body}"
    );

    let event = host.wait_for_event("push-1");
    assert_eq!(event["status"], "done", "{event}");
    let deliveries = event["deliveries"].as_array().expect("deliveries");
    let plugins: Vec<_> =
        deliveries.iter().map(|d| (d["plugin"].as_str(), d["status"].as_str(), d["attempts"].as_u64())).collect();
    assert_eq!(plugins, [(Some("echo"), Some("done"), Some(1)), (Some("github-push"), Some("done"), Some(1))]);
    let line = host.wait_for_log("octo-org/hello-world refs/heads/main: 2 commits by octocat");
    assert!(
        line.contains("github-push") && line.contains("push-1"),
        "plugin log lacks plugin name or event id: {line}"
    );
}

#[test]
fn bad_signature_is_refused_and_nothing_is_dispatched() {
    let host = TestHost::builder().plugin("echo").start();
    let (status, body) = host.post_github("push", "forged-1", &example("github/push.json"), "wrong-secret");
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("does not match")), "{body}");
    assert!(!body.to_string().contains(SECRET));

    // A good event after it is handled, and the refused one left no trace.
    host.post_github("push", "real-1", &example("github/push.json"), SECRET);
    assert_eq!(host.wait_for_event("real-1")["status"], "done");
    assert_eq!(host.admin_get("/v1/events/forged-1").0, 404);
    assert!(!host.log().contains("forged-1"), "the forged event left a trace in the log");
}

#[test]
fn unknown_source_wrong_method_and_bad_paths_are_refused() {
    let host = TestHost::builder().start();
    let json = [("content-type", "application/json")];
    let (status, body) = post(&format!("{}/hooks/gitlab", host.url), &json, b"{}");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("gitlab")), "{body}");
    assert_eq!(post(&format!("{}/elsewhere", host.url), &json, b"{}").0, 404);
    let (status, body) = crate::util::get(&format!("{}/hooks/github", host.url), &[]);
    assert_eq!(status, 405, "{body}");
}

#[test]
fn non_json_content_type_is_415() {
    let host = TestHost::builder().start();
    let (status, body) = post(&format!("{}/hooks/github", host.url), &[("content-type", "text/plain")], b"hello");
    assert_eq!(status, 415);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("text/plain")), "{body}");
    // What the sender wrote is repeated only in part, in the answer and in the log.
    let long = format!("text/{}", "x".repeat(10_000));
    let (status, body) = post(&format!("{}/hooks/github", host.url), &[("content-type", &long)], b"hello");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(status == 415 && error.len() < 200 && error.contains("(10005 bytes)"), "{body}");
    host.sync_log();
    assert!(!host.log().contains(&"x".repeat(100)), "the log repeats the whole content type");
}

#[test]
fn malformed_json_is_400_after_the_signature_checks_out() {
    let host = TestHost::builder().start();
    let (status, body) = host.post_github("push", "broken-json", b"{\"ref\": ", SECRET);
    assert_eq!(status, 400);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("not valid JSON")), "{body}");
    assert_eq!(host.admin_get("/v1/events/broken-json").0, 404);
}

#[test]
fn body_over_the_limit_is_413() {
    let host = TestHost::builder().config("[sources.small]\nverify = \"none\"\nmax_body_bytes = 64\n").start();
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(100));
    let (status, body) =
        post(&format!("{}/hooks/small", host.url), &[("content-type", "application/json")], big.as_bytes());
    assert_eq!(status, 413, "{body}");
    let (status, _) = post(&format!("{}/hooks/small", host.url), &[("content-type", "application/json")], b"{}");
    assert_eq!(status, 202);
}

#[test]
fn unsubscribed_type_is_accepted_and_kept_unrouted() {
    let mut host = TestHost::builder().plugin("github-push").start();
    let (status, body) = host.post_github("issues", "issue-1", b"{\"action\":\"opened\"}", SECRET);
    assert_eq!((status, body["type"].as_str()), (202, Some("github.issues.opened")), "{body}");
    let event = host.wait_for_event("issue-1");
    assert_eq!(event["status"], "unrouted", "{event}");
    assert_eq!(event["deliveries"].as_array().map(Vec::len), Some(0));
    host.wait_for_log("no plugin subscribes");
}

#[test]
fn a_repeated_delivery_id_is_a_duplicate_and_not_dispatched_again() {
    let host = TestHost::builder().plugin("echo").start();
    assert_eq!(host.post_github("push", "dup-1", &example("github/push.json"), SECRET).0, 202);
    host.wait_for_event("dup-1");
    let (status, body) = host.post_github("push", "dup-1", &example("github/push.json"), SECRET);
    assert_eq!((status, &body["duplicate"]), (200, &serde_json::json!(true)), "{body}");
    let event = host.wait_for_event("dup-1");
    assert_eq!(event["deliveries"][0]["attempts"], 1, "{event}");
}

#[test]
fn on_sigterm_the_listener_closes_at_once_a_request_in_flight_gets_503_and_the_host_exits_cleanly() {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let mut host = TestHost::builder().plugin("echo").start();
    let address = host.url.trim_start_matches("http://").to_owned();
    // A request whose body is still on its way when the signal comes: it holds the graceful
    // shutdown open (up to its 10 s) while the test looks at the listener. The host's
    // `100 Continue` says it is reading the body, so the request is in its hands.
    let body = example("github/push.json");
    let signature = wasmhook::ingest::verify::github::sign(SECRET.as_bytes(), &body);
    let mut in_flight = TcpStream::connect(&address).expect("connect");
    write!(
        in_flight,
        "POST /hooks/github HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         x-github-event: push\r\nx-github-delivery: in-flight-1\r\nx-hub-signature-256: {signature}\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .expect("head");
    let mut interim = [0_u8; 25];
    in_flight.read_exact(&mut interim).expect("an interim answer");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{}", String::from_utf8_lossy(&interim));

    host.terminate();
    host.wait_for_log("shutting down");
    // Well within the 10 s the request in flight keeps the shutdown open.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(&address) {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(Instant::now() < deadline, "still accepting connections after SIGTERM: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    in_flight.write_all(&body).expect("the body");
    let mut answer = String::new();
    in_flight.read_to_string(&mut answer).expect("the answer, then the connection closed");
    let head = answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{answer}");
    assert!(head.contains("retry-after: "), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");

    let status = host.wait_exit();
    assert!(status.success(), "exit status {status}:\n{}", host.log());
    host.wait_for_log("\"stopped\"");
}
