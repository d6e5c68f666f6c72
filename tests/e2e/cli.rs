//! The command line: `send` signs and posts; a bad config stops start-up with a clear message.

use std::process::Command;

use crate::util::{SECRET, SECRET_ENV, TestHost, workspace};

#[test]
fn send_signs_a_sample_that_the_host_accepts() {
    let host = TestHost::builder().plugin("github-push").start();
    let output = Command::new(env!("CARGO_BIN_EXE_wasmhook"))
        .args(["send", "github", "--url", &format!("{}/hooks/github", host.url), "--secret-env", SECRET_ENV])
        .args(["--event", "push", "--delivery", "sent-1"])
        .arg(workspace().join("examples/github/push.json"))
        .env(SECRET_ENV, SECRET)
        .output()
        .expect("run wasmhook send");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("202 ") && stdout.contains("sent-1"), "{stdout}");
    assert_eq!(host.wait_for_event("sent-1")["status"], "done");
}

#[test]
fn a_missing_secret_stops_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("wasmhook.toml");
    std::fs::write(&config, "[sources.github]\nverify = \"github\"\nsecret_env = \"NOT_SET_ANYWHERE\"\n")
        .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_wasmhook"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("NOT_SET_ANYWHERE")
        .output()
        .expect("run wasmhook serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("NOT_SET_ANYWHERE") && stderr.contains("wasmhook.toml"), "{stderr}");
}

#[test]
fn config_check_reads_the_environment_overrides_as_serve_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("wasmhook.toml");
    std::fs::write(&config, "admin_listen = \"127.0.0.1:9090\"\n").expect("write");
    let check = |admin: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasmhook"));
        command.args(["config", "check"]).arg(&config).env_remove("WASMHOOK_ADMIN_LISTEN");
        if let Some(admin) = admin {
            command.env("WASMHOOK_ADMIN_LISTEN", admin);
        }
        command.output().expect("run wasmhook config check")
    };
    assert!(check(None).status.success());
    // Beyond loopback without a token, serve would refuse to start: so must the check.
    let output = check(Some("0.0.0.0:9090"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("admin_token_env"), "{stderr}");
}

#[test]
fn an_unknown_config_key_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("wasmhook.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\n\nplugin_dir = \"x\"\n").expect("write");
    let output =
        Command::new(env!("CARGO_BIN_EXE_wasmhook")).args(["serve", "--config"]).arg(&config).output().expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("plugin_dir") && stderr.contains("line 3"), "{stderr}");
}

#[test]
fn relative_plugin_and_data_folders_are_relative_to_the_working_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins");
    std::fs::copy(crate::util::plugin_wasm("echo"), dir.path().join("plugins/echo.wasm")).expect("copy");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmhook"))
        .args([
            "serve",
            "--plugins",
            "plugins",
            "--data",
            "data",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let stdout = child.stdout.take().expect("stdout");
    let started = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .any(|line| line.contains("admin listener on"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "the host did not start");
    assert!(dir.path().join("data/journal.sqlite3").is_file());
}
