//! Shared fixtures: a [`TestHost`] running the real `wasmhook` binary on free loopback ports
//! with real compiled plugins, and a small HTTP client around it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The webhook secret every test host's `github` source uses.
pub const SECRET: &str = "test-secret";
/// The environment variable that carries it.
pub const SECRET_ENV: &str = "TEST_GITHUB_SECRET";
/// How long a test waits for something that should happen promptly (a bound, not a timing).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The workspace's root folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_owned()
}

/// A compiled plugin from `make plugins`.
pub fn plugin_wasm(name: &str) -> PathBuf {
    let path = workspace().join("target/plugins").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run `make plugins` (or `make test`) first", path.display());
    path
}

/// A sample payload from `examples/`.
pub fn example(path: &str) -> Vec<u8> {
    std::fs::read(workspace().join("examples").join(path)).expect("example payload")
}

/// Lines the host printed, shared with the thread that reads them.
#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// How to start a test host.
pub struct HostBuilder {
    plugins: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    settings: String,
    config: String,
    env: Vec<(String, String)>,
}

impl HostBuilder {
    /// Adds a compiled plugin from `target/plugins/`.
    pub fn plugin(mut self, name: &str) -> Self {
        self.plugins.push(name.to_owned());
        self
    }

    /// Adds a file to the plugins folder.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), contents.into()));
        self
    }

    /// Adds a top-level `key = value` line to the config.
    pub fn setting(mut self, line: &str) -> Self {
        self.settings.push_str(line);
        self.settings.push('\n');
        self
    }

    /// Appends TOML tables to the config (which already has a `github` source).
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// Sets an environment variable for the host.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the host and waits until both listeners are bound.
    pub fn start(self) -> TestHost {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).expect("plugins folder");
        for name in &self.plugins {
            std::fs::copy(plugin_wasm(name), plugins.join(format!("{name}.wasm"))).expect("copy plugin");
        }
        for (name, contents) in &self.files {
            std::fs::write(plugins.join(name), contents).expect("write plugin folder file");
        }
        let config = dir.path().join("wasmhook.toml");
        std::fs::write(&config, format!("{}\n{}", self.settings, self.config)).expect("write config");
        let mut host = TestHost::spawn(&config, &self.env, dir);
        let webhook = host.wait_for_address("webhook listener on http://");
        let admin = host.wait_for_address("admin listener on http://");
        host.url = format!("http://{webhook}");
        host.admin = format!("http://{admin}");
        host
    }
}

/// A running `wasmhook serve`, killed when dropped.
pub struct TestHost {
    child: Child,
    output: Arc<Output>,
    /// Base URL of the webhook listener.
    pub url: String,
    /// Base URL of the admin listener.
    pub admin: String,
    /// The host's folder (config, plugins, data); removed when dropped.
    _dir: tempfile::TempDir,
}

impl TestHost {
    /// A host with a `github` source and no plugins yet.
    pub fn builder() -> HostBuilder {
        HostBuilder {
            plugins: Vec::new(),
            files: Vec::new(),
            settings: "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n".to_owned(),
            config: format!("[sources.github]\nverify = \"github\"\nsecret_env = \"{SECRET_ENV}\"\n"),
            env: vec![(SECRET_ENV.to_owned(), SECRET.to_owned())],
        }
    }

    fn spawn(config: &Path, env: &[(String, String)], dir: tempfile::TempDir) -> TestHost {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasmhook"));
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start wasmhook");
        let output = Arc::new(Output::default());
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lines.lock().expect("lines").push(line);
                    output.grew.notify_all();
                }
            });
        }
        TestHost { child, output, url: String::new(), admin: String::new(), _dir: dir }
    }

    fn wait_for_address(&mut self, marker: &str) -> String {
        let line = self.wait_for_log(marker);
        let start = line.find(marker).expect("marker") + marker.len();
        line[start..].split_whitespace().next().expect("address").to_owned()
    }

    /// Waits until a log line contains `needle` and returns it. Panics with the whole log
    /// if none does within [`PATIENCE`] or the host exits.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = self.output.lines.lock().expect("lines");
        loop {
            if let Some(line) = lines.iter().find(|line| line.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("no log line contains {needle:?} after {PATIENCE:?}; log:\n{}", lines.join("\n"));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                drop(lines);
                std::thread::sleep(Duration::from_millis(100));
                panic!("wasmhook exited ({status}) before logging {needle:?}; log:\n{}", self.log());
            }
            lines = self.output.grew.wait_timeout(lines, Duration::from_millis(100)).expect("lines").0;
        }
    }

    /// Everything the host printed so far.
    pub fn log(&self) -> String {
        self.output.lines.lock().expect("lines").join("\n")
    }

    /// Posts a GitHub-style webhook `event` with `delivery` id, signed with `secret`.
    pub fn post_github(&self, event: &str, delivery: &str, body: &[u8], secret: &str) -> (u16, Value) {
        let signature = wasmhook::ingest::verify::github::sign(secret.as_bytes(), body);
        post(
            &format!("{}/hooks/github", self.url),
            &[
                ("content-type", "application/json"),
                ("x-github-event", event),
                ("x-github-delivery", delivery),
                ("x-hub-signature-256", &signature),
            ],
            body,
        )
    }

    /// GETs an admin path, returning status and JSON body.
    pub fn admin_get(&self, path: &str) -> (u16, Value) {
        get(&format!("{}{path}", self.admin), &[])
    }

    /// Polls `/v1/events/{id}` until its status is no longer `pending`, and returns it.
    pub fn wait_for_event(&self, id: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, body) = self.admin_get(&format!("/v1/events/{id}"));
            if status == 200 && body["status"] != "pending" {
                return body;
            }
            assert!(Instant::now() < deadline, "event {id} still not finished ({status} {body}); log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut response = response.expect("HTTP exchange");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON: {text:?}"));
    (status, json)
}

/// POSTs `body` with `headers` and returns the status and JSON body.
pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut request = agent().post(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.send(body))
}

/// GETs `url` with `headers` and returns the status and JSON body.
pub fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.call())
}
