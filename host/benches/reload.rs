//! Hot-reload figures, through the real binary (not a test: it asserts nothing about time).
//!
//! - swap latency: from the rename of a new version into the plugins folder to the first
//!   delivery that ran on it, over 50 swaps between two versions; median and p99;
//! - start-up with 20 distinct plugins, with an empty compile cache and with a warm one.
//!
//! Run with `make bench-reload` (it builds the plugins first).

#[path = "../../tests/e2e/util.rs"]
#[allow(dead_code, reason = "the shared test fixture has more than this benchmark needs")]
mod util;

use std::time::{Duration, Instant};

use util::{SECRET, TestHost, example, plugin_wasm};

const SWAPS: usize = 50;
const PLUGINS: usize = 20;
const STARTS: usize = 3;

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return; // `cargo bench -- --list` asks benchmarks to name themselves; this one is whole.
    }
    let swap = swap_latencies();
    let (cold, warm) = start_up_times();
    println!("\nhot reload ({} swaps, {} plugins at start-up):", SWAPS, PLUGINS);
    println!("  rename → first delivery on the new version: median {:>6.1} ms   p99 {:>6.1} ms", swap.0, swap.1);
    println!("  start-up, empty compile cache:              median {:>6.1} ms", cold);
    println!("  start-up, warm compile cache:               median {:>6.1} ms   ({:.1}x faster)", warm, cold / warm);
}

/// Milliseconds from each rename to the first delivery observed on the new version.
fn swap_latencies() -> (f64, f64) {
    let versions =
        [std::fs::read(plugin_wasm("echo")).expect("echo"), std::fs::read(plugin_wasm("flaky")).expect("flaky")];
    let shas: Vec<String> =
        versions.iter().map(|bytes| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))).collect();
    let host = TestHost::builder().file("target.wasm", versions[0].clone()).start();
    let body = example("github/push.json");
    let mut samples = Vec::new();
    let mut sent = 0;
    for swap in 1..=SWAPS {
        let version = swap % 2;
        let staging = host.plugins_dir().join(".target.wasm.partial");
        std::fs::write(&staging, &versions[version]).expect("stage");
        let renamed = Instant::now();
        std::fs::rename(&staging, host.plugins_dir().join("target.wasm")).expect("rename");
        loop {
            sent += 1;
            let id = format!("bench-{sent}");
            host.post_github("push", &id, &body, SECRET);
            let event = host.wait_for_event(&id);
            if event["deliveries"][0]["sha256"] == shas[version].as_str() {
                samples.push(renamed.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    (percentile(&mut samples, 0.5), percentile(&mut samples, 0.99))
}

/// Median start-up time (process start to both listeners bound), cold and warm cache.
fn start_up_times() -> (f64, f64) {
    let component = std::fs::read(plugin_wasm("github-push")).expect("github-push");
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for start in 0..STARTS {
        let mut builder = TestHost::builder();
        for n in 0..PLUGINS {
            // A custom section makes each file a distinct component, so each compiles on its own.
            builder = builder.file(&format!("p{n}.wasm"), with_custom_section(&component, &format!("{start}-{n}")));
        }
        let started = Instant::now();
        let mut host = builder.start();
        cold.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        host.restart();
        warm.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    (percentile(&mut cold, 0.5), percentile(&mut warm, 0.5))
}

/// `component` with a custom section named `wasmhook-bench` holding `tag` appended.
fn with_custom_section(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"wasmhook-bench";
    let mut payload = vec![u8::try_from(name.len()).expect("short name")];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    bytes.push(u8::try_from(payload.len()).expect("short payload"));
    bytes.extend_from_slice(&payload);
    bytes
}

fn percentile(samples: &mut [f64], quantile: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * quantile).round() as usize;
    samples[index]
}
