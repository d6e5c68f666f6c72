//! The admin API: health, unknown events, the bearer token, and web pages kept out.

use std::io::{Read, Write};

use crate::util::{TestHost, get, post};

/// The status line of a raw `GET path` to `admin` with `host` as its `Host` header.
fn status_line_with_host(admin: &str, path: &str, host: &str) -> String {
    let mut stream = std::net::TcpStream::connect(admin.trim_start_matches("http://")).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn requests_from_web_pages_are_refused() {
    let host = TestHost::builder().start();
    // A page posting across sites (no preflight for a text/plain body) carries an Origin.
    let url = format!("{}/v1/dead-letters/purge", host.admin);
    let (status, body) = post(&url, &[("origin", "https://evil.example")], br#"{"all":true}"#);
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("Origin")), "{body}");
    // A page that rebound its own name to 127.0.0.1 sends that name as Host.
    let port = host.admin.rsplit(':').next().expect("port");
    assert!(status_line_with_host(&host.admin, "/v1/stats", &format!("rebound.example:{port}")).contains(" 403 "));
    for name in ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]"] {
        let line = status_line_with_host(&host.admin, "/v1/stats", &format!("{name}:{port}"));
        assert!(line.contains(" 200 "), "{name}: {line}");
    }
}

#[test]
fn health_answers_and_an_unknown_event_is_404() {
    let host = TestHost::builder().start();
    let (status, body) = host.admin_get("/healthz");
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = host.admin_get("/v1/events/nope");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("nope")), "{body}");
}

#[test]
fn an_event_whose_id_holds_url_characters_is_found_by_its_escaped_id() {
    let host = TestHost::builder().start();
    let id = "delivery/1%2?x#y";
    let (status, _) = host.post_github("push", id, b"{\"action\":\"x\"}", crate::util::SECRET);
    assert_eq!(status, 202);
    let (status, body) = host.admin_get("/v1/events/delivery%2F1%252%3Fx%23y");
    assert_eq!((status, body["id"].as_str()), (200, Some(id)), "{body}");
}

#[test]
fn a_configured_token_guards_everything_but_health() {
    let host = TestHost::builder().setting("admin_token_env = \"ADMIN_TOKEN\"").env("ADMIN_TOKEN", "t0ken").start();
    assert_eq!(host.admin_get("/healthz").0, 200);
    assert_eq!(host.admin_get("/v1/plugins").0, 401);
    let url = format!("{}/v1/plugins", host.admin);
    assert_eq!(get(&url, &[("authorization", "Bearer wrong")]).0, 401);
    assert_eq!(get(&url, &[("authorization", "Bearer t0ken")]).0, 200);
    // Readiness needs no token, and so says why it fails in full only to a caller with one.
    std::fs::remove_dir_all(host.plugins_dir()).expect("remove the plugins folder");
    let (status, body) = host.admin_get("/readyz");
    assert_eq!((status, body["checks"]["plugins_folder"].as_str()), (503, Some("cannot read")), "{body}");
    let (_, body) = get(&format!("{}/readyz", host.admin), &[("authorization", "Bearer t0ken")]);
    let folder = body["checks"]["plugins_folder"].as_str().unwrap_or_default();
    assert!(folder.contains(&host.plugins_dir().display().to_string()), "{body}");
    // With a token, any Host will do (the admin API may listen beyond loopback).
    let port = host.admin.rsplit(':').next().expect("port");
    assert!(status_line_with_host(&host.admin, "/healthz", &format!("wasmhook.internal:{port}")).contains(" 200 "));
}

#[test]
fn an_admin_body_over_its_limit_is_413_and_a_bad_one_400() {
    let host = TestHost::builder().start();
    let url = format!("{}/v1/dead-letters/replay", host.admin);
    let json = [("content-type", "application/json")];
    let (status, body) = post(&url, &json, &vec![b' '; 65 * 1024]);
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("64 KiB")), "{body}");
    let (status, body) = post(&url, &json, br#"{"nothing": true}"#);
    assert_eq!(status, 400, "{body}");
}
