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
/// Longer than the plugins-folder watcher's debounce, so the host sees each step.
pub const DEBOUNCE_AND_SOME: Duration = Duration::from_millis(wasmhook::watch::DEBOUNCE.as_millis() as u64 * 2);

/// The workspace's root folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_owned()
}

/// A compiled plugin from `make plugins`: an example, or a test plugin.
pub fn plugin_wasm(name: &str) -> PathBuf {
    let file = format!("{name}.wasm");
    let candidates =
        ["target/plugins", "target/notify-plugins", "target/test-plugins"].map(|dir| workspace().join(dir).join(&file));
    candidates.iter().find(|path| path.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{file} is missing from target/plugins and target/test-plugins: run `make plugins` (or `make test`) first"
        )
    })
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

    /// Adds a compiled plugin with a manifest (`NAME.toml`) beside it.
    pub fn plugin_with_manifest(self, name: &str, manifest: &str) -> Self {
        self.plugin(name).file(&format!("{name}.toml"), manifest)
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
        let mut host = TestHost {
            child: None,
            readers: Vec::new(),
            output: Arc::default(),
            url: String::new(),
            admin: String::new(),
            settings: self.settings,
            config: self.config,
            env: self.env,
            dir,
        };
        host.launch("127.0.0.1:0", "127.0.0.1:0");
        host
    }
}

/// A running `wasmhook serve`, killed when dropped. Its folder (config, plugins, data)
/// outlives restarts and is removed when it is dropped.
pub struct TestHost {
    child: Option<Child>,
    /// The threads reading the running host's stdout and stderr into `output`.
    readers: Vec<std::thread::JoinHandle<()>>,
    output: Arc<Output>,
    /// Base URL of the webhook listener.
    pub url: String,
    /// Base URL of the admin listener.
    pub admin: String,
    settings: String,
    config: String,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
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

    /// Writes the config with these listen addresses, starts the host, and waits until both
    /// listeners are bound.
    fn launch(&mut self, listen: &str, admin_listen: &str) {
        let config = self.dir.path().join("wasmhook.toml");
        let settings = self.settings.replace(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\"\nadmin_listen = \"{admin_listen}\""),
        );
        std::fs::write(&config, format!("{settings}\n{}", self.config)).expect("write config");
        let mark = self.output.lines.lock().expect("lines").len();
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasmhook"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start wasmhook");
        let output = Arc::clone(&self.output);
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = Arc::clone(&output);
            self.readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lines.lock().expect("lines").push(line);
                    output.grew.notify_all();
                }
            }));
        }
        self.child = Some(child);
        // Logs are JSON lines (stdout is a pipe): the bound address is the `addr` field.
        let address = |host: &mut TestHost, marker: &str| {
            let line = host.wait_for_log_after(marker, mark);
            let json: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
            json["addr"].as_str().expect("an addr field").to_owned()
        };
        self.url = format!("http://{}", address(self, "webhook listener on http://"));
        self.admin = format!("http://{}", address(self, "admin listener on http://"));
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends the host SIGTERM, which starts its graceful shutdown.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.pid()).expect("a pid");
        // SAFETY: kill(2) only sends a signal; the pid is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
    }

    /// Waits for the host to exit (panics after [`PATIENCE`]) and returns its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "the host did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the host with SIGKILL: no shutdown, no flush, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The pipes end with the process: once read to their end, the log holds every line.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Kills the host (SIGKILL) and starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let (listen, admin) =
            (self.url.trim_start_matches("http://").to_owned(), self.admin.trim_start_matches("http://").to_owned());
        self.launch(&listen, &admin);
    }

    /// The plugins folder, to change what the next start loads.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// Waits until a log line contains `needle` and returns it. Panics with the whole log
    /// if none does within [`PATIENCE`] or the host exits.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.wait_for_log_after(needle, 0)
    }

    /// [`Self::wait_for_log`], looking only at lines printed after the first `mark` lines.
    pub fn wait_for_log_after(&mut self, needle: &str, mark: usize) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = self.output.lines.lock().expect("lines");
        loop {
            if let Some(line) = lines.iter().skip(mark).find(|line| line.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("no log line contains {needle:?} after {PATIENCE:?}; log:\n{}", lines.join("\n"));
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                drop(lines);
                std::thread::sleep(Duration::from_millis(100));
                panic!("wasmhook exited ({status}) before logging {needle:?}; log:\n{}", self.log());
            }
            lines = self.output.grew.wait_timeout(lines, Duration::from_millis(100)).expect("lines").0;
        }
    }

    /// Waits until at least `count` log lines contain `needle` (a line is read from the host's
    /// output a moment after it is written); panics with the whole log after [`PATIENCE`].
    pub fn wait_for_log_count(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = self.output.lines.lock().expect("lines");
        while lines.iter().filter(|line| line.contains(needle)).count() < count {
            if Instant::now() >= deadline {
                panic!(
                    "fewer than {count} log lines contain {needle:?} after {PATIENCE:?}; log:\n{}",
                    lines.join("\n")
                );
            }
            lines = self.output.grew.wait_timeout(lines, Duration::from_millis(100)).expect("lines").0;
        }
    }

    /// Everything the host printed so far, across restarts.
    pub fn log(&self) -> String {
        self.output.lines.lock().expect("lines").join("\n")
    }

    /// How many log lines contain `needle`, across restarts, among those read so far: call
    /// [`Self::sync_log`] first to count every line the host printed before.
    pub fn count_log(&self, needle: &str) -> usize {
        self.output.lines.lock().expect("lines").iter().filter(|line| line.contains(needle)).count()
    }

    /// Waits until the log holds every line the running host printed before this call. The
    /// lines come through a pipe and a reader thread, which may lag behind what the host has
    /// done (a delivery can be `done` before its plugin's line is read): a request for an
    /// unknown source logs a line of its own, after all those, and this waits for it.
    pub fn sync_log(&self) {
        static SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if self.child.is_none() {
            return; // a killed host's lines were all read by `kill`
        }
        let n = SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = format!("/hooks/log-sync-{}-{n}", std::process::id());
        let (status, _) = post(&format!("{}{path}", self.url), &[], b"");
        assert_eq!(status, 404, "the log's sync request was answered {status}");
        self.wait_for_log_count(&format!("\"path\":\"{path}\""), 1);
    }

    /// Runs `wasmhook ARGS` against this host's admin API; returns success and stdout.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_wasmhook"))
            .args(args)
            .env("WASMHOOK_ADMIN_URL", &self.admin)
            .env_remove("WASMHOOK_ADMIN_TOKEN")
            .output()
            .expect("run wasmhook");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        (output.status.success(), format!("{stdout}{stderr}"))
    }

    /// Posts a GitHub-style webhook `event` with `delivery` id, signed with `secret`.
    pub fn post_github(&self, event: &str, delivery: &str, body: &[u8], secret: &str) -> (u16, Value) {
        let Reply { status, json, .. } = self.github_reply(event, delivery, body, secret);
        (status, json)
    }

    /// [`Self::post_github`] with the whole reply.
    pub fn github_reply(&self, event: &str, delivery: &str, body: &[u8], secret: &str) -> Reply {
        try_post_github(&self.url, event, delivery, body, secret).expect("HTTP exchange")
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
        self.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// An HTTP answer: status, JSON body, and the `Retry-After` header if any.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body, parsed.
    pub json: Value,
    /// The `Retry-After` header.
    pub retry_after: Option<String>,
}

/// Posts a signed GitHub-style webhook to the host at `base`; an error if nobody answers.
pub fn try_post_github(
    base: &str,
    event: &str,
    delivery: &str,
    body: &[u8],
    secret: &str,
) -> Result<Reply, ureq::Error> {
    let signature = wasmhook::ingest::verify::github::sign(secret.as_bytes(), body);
    let response = agent()
        .post(format!("{base}/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", &signature)
        .send(body)?;
    Ok(reply(Ok(response)))
}

fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut response = response.expect("HTTP exchange");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = response.body_mut().read_to_string().expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON: {text:?}"));
    Reply { status, json, retry_after }
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let Reply { status, json, .. } = reply(response);
    (status, json)
}

/// POSTs `body` with `headers` and returns the whole reply.
pub fn post_reply(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut request = agent().post(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    reply(request.send(body))
}

/// POSTs `body` with `headers` and returns the status and JSON body.
pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let Reply { status, json, .. } = post_reply(url, headers, body);
    (status, json)
}

/// GETs `url` with `headers` and returns the status and JSON body.
pub fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.call())
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    /// `POST /path`.
    pub request_line: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// A local HTTP receiver for plugins' outbound requests: records each request and answers
/// with the next queued status (200 once the queue is empty).
pub struct Receiver {
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    got: Arc<Mutex<Vec<Received>>>,
    statuses: Arc<Mutex<std::collections::VecDeque<u16>>>,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    pub fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let got = Arc::new(Mutex::new(Vec::new()));
        let statuses = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let (recorded, queued) = (Arc::clone(&got), Arc::clone(&statuses));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let status = queued.lock().expect("statuses").pop_front().unwrap_or(200);
                if let Some(request) = Self::serve(stream, status) {
                    recorded.lock().expect("requests").push(request);
                }
            }
        });
        Receiver { url, got, statuses }
    }

    fn serve(stream: std::net::TcpStream, status: u16) -> Option<Received> {
        use std::io::{Read, Write};
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).ok()?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let length =
            headers.iter().find(|(name, _)| name == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        let mut stream = stream;
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        stream.write_all(answer.as_bytes()).ok()?;
        Some(Received { request_line: request_line.trim_end().to_owned(), headers, body })
    }

    /// Queues the statuses of the next answers.
    pub fn answer_with(&self, statuses: &[u16]) {
        self.statuses.lock().expect("statuses").extend(statuses);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().expect("requests").clone()
    }

    /// Waits until at least `count` requests arrived and returns them.
    pub fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let got = self.received();
            if got.len() >= count {
                return got;
            }
            assert!(Instant::now() < deadline, "the receiver got {} of {count} requests", got.len());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A stream of signed GitHub pushes to a host, in a thread, until stopped: ids `{prefix}-{n}`,
/// one every `pause`, backing off while nobody answers (a host being restarted).
pub struct EventStream {
    accepted: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl EventStream {
    /// Starts streaming to the host at `url`.
    pub fn start(url: &str, prefix: &str, pause: Duration) -> EventStream {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (accepted, stop, url, prefix) =
                (Arc::clone(&accepted), Arc::clone(&stop), url.to_owned(), prefix.to_owned());
            std::thread::spawn(move || {
                let body = example("github/push.json");
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("{prefix}-{n}");
                    match try_post_github(&url, "push", &id, &body, SECRET) {
                        Ok(reply) if reply.status == 202 => accepted.lock().expect("ids").push(id),
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                    std::thread::sleep(pause);
                }
            })
        };
        EventStream { accepted, stop, thread }
    }

    /// Stops the stream and returns the ids that got a 202.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the stream thread");
        self.accepted.lock().expect("ids").clone()
    }
}

/// The sum of the samples of metric `name` whose labels include every pair in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric_name, rest) = series.split_once('{').unwrap_or((series, ""));
            metric_name == name && labels.iter().all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// The host's `/metrics` text.
pub fn scrape(host: &TestHost) -> String {
    let mut response = ureq::get(format!("{}/metrics", host.admin)).call().expect("scrape");
    assert_eq!(response.status().as_u16(), 200);
    response.body_mut().read_to_string().expect("text")
}
