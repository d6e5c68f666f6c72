//! `faulty`: a test plugin that misbehaves the way its manifest's `[config] fault` says, to
//! prove each sandbox limit ends only its own call. Not an example to copy.
use std::hint::black_box;
use std::time::{Duration, Instant};

use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, config, emit, export_plugin, http, info, warn};

struct Faulty;

#[expect(unconditional_recursion, reason = "the point: overflow the wasm stack")]
fn recurse(depth: u64) -> u64 {
    black_box(recurse(black_box(depth + 1))) + 1
}

impl Plugin for Faulty {
    fn metadata() -> Metadata {
        if config("fault").as_deref() == Some("metadata-loop") {
            loop {
                black_box(0);
            }
        }
        Metadata::new("faulty", env!("CARGO_PKG_VERSION"), ["*"])
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        let permanent = |message: String| Err(HandlerError::Permanent(message));
        match config("fault").as_deref().unwrap_or("none") {
            "loop" => loop {
                black_box(&event);
            },
            "panic" => panic!("faulty plugin panicked on purpose"),
            "memory" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(vec![7_u8; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "recursion" => {
                black_box(recurse(0));
                Ok(())
            }
            "log-spam" => {
                for line in 0..100_000 {
                    info!("spam {line}");
                }
                Ok(())
            }
            "print-spam" => {
                for line in 0..100_000 {
                    println!("spam {line}");
                }
                Ok(())
            }
            "emit-storm" => {
                for _ in 0..100_000 {
                    let _ = emit("test.storm", b"{}", "application/json");
                }
                Ok(())
            }
            "emit-content-type" => match emit("test.typed", b"{}", &"x".repeat(100_000)) {
                Ok(id) => permanent(format!("emitted {id} with a 100 000-byte content type")),
                Err(reason) => permanent(format!("emit refused: {reason}")),
            },
            // 1 MiB, as much as the host lets a plugin emit, and more than NATS takes in one message.
            "emit-large" if event.event_type != "wasmhook.dead_letter" => {
                emit("test.large", &vec![b'x'; 1 << 20], "application/octet-stream")
                    .map_err(HandlerError::Permanent)?;
                Ok(())
            }
            "emit-chain" => {
                match emit("test.chain", b"{}", "application/json") {
                    Ok(id) => info!("emitted {id}"),
                    Err(reason) => warn!("emit refused: {reason}"),
                }
                Ok(())
            }
            "http" => {
                let url = config("url").unwrap_or_default();
                match http::post(&url, &[("content-type", "application/json")], b"{}") {
                    Ok(response) => {
                        info!("outbound request answered {}", response.status);
                        Ok(())
                    }
                    Err(err) => permanent(format!("outbound request failed: {err}")),
                }
            }
            "read-file" => match std::fs::read_to_string(config("path").unwrap_or_else(|| "/etc/hostname".into())) {
                Ok(contents) => permanent(format!("read a file: {contents}")),
                Err(err) => permanent(format!("file read failed: {err}")),
            },
            "read-env" => {
                let var = config("var").unwrap_or_default();
                match std::env::var(&var) {
                    Ok(value) => permanent(format!("{var} = {value}")),
                    Err(err) => permanent(format!("{var}: {err}")),
                }
            }
            "count" => {
                // Memory that outlives a call only when the operator grants `reuse`.
                static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                info!("call number {call} for {}", event.id);
                Ok(())
            }
            "slow" => {
                info!("enter {}", event.id);
                let started = Instant::now();
                let ms = config("slow_ms").and_then(|ms| ms.parse().ok()).unwrap_or(50);
                while started.elapsed() < Duration::from_millis(ms) {
                    black_box(&started);
                }
                info!("leave {}", event.id);
                Ok(())
            }
            _ => {
                info!("well behaved: {}", event.id);
                Ok(())
            }
        }
    }
}

export_plugin!(Faulty);
