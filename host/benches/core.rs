//! Micro-benchmarks of the hot paths, in-process: signature verification per scheme (1 KiB
//! body), one plugin call (a fresh instance from the pre-instantiated component, the call, the
//! drop) of a no-op plugin and of `github-push`, journal acceptance with group commit, and
//! routing against 100 subscriptions. Run with `make bench-core`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wasmhook::config::{Algorithm, Encoding, HmacScheme, Secret, SignedContent, Verify};
use wasmhook::event::Event;
use wasmhook::ingest::verify;
use wasmhook::journal::sqlite::{Options, SqliteJournal};
use wasmhook::journal::{Journal, NewEvent};
use wasmhook::runtime::{Limits, Runtime};
use wasmhook::send;

const NOW: u64 = 1_800_000_000;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn verification(c: &mut Criterion) {
    let body = vec![b'x'; 1024];
    let secret = b"a-webhook-secret-of-some-length";
    let secrets = vec![Secret::new(secret.to_vec())];
    let tolerance = Duration::from_secs(300);
    let hmac = HmacScheme {
        secrets: secrets.clone(),
        header: "x-signature".into(),
        algorithm: Algorithm::Sha256,
        encoding: Encoding::Hex,
        prefix: "sha256=".into(),
        timestamp_header: None,
        tolerance,
        signed: SignedContent::parse("{body}").expect("template"),
    };
    let cases = [
        ("github", Verify::Github { secrets: secrets.clone() }, send::github(secret, "push", "d", body.clone())),
        ("stripe", Verify::Stripe { secrets: secrets.clone(), tolerance }, send::stripe(secret, NOW, body.clone())),
        ("slack", Verify::Slack { secrets: secrets.clone(), tolerance }, send::slack(secret, NOW, body.clone())),
        (
            "standard-webhooks",
            Verify::StandardWebhooks { keys: secrets.clone(), tolerance },
            send::standard_webhooks(secret, "msg_1", NOW, body.clone()),
        ),
        ("hmac", Verify::Hmac(hmac.clone()), send::hmac(&hmac, secret, NOW, body.clone())),
        ("token", Verify::Token { secrets: secrets.clone(), header: "x-token".into() }, {
            send::token("x-token", std::str::from_utf8(secret).expect("text"), body.clone())
        }),
    ];
    let mut group = c.benchmark_group("verify 1 KiB");
    for (name, scheme, outgoing) in cases {
        let headers = outgoing.header_map();
        assert!(verify::verify(&scheme, &headers, &body, NOW).is_ok(), "{name} must verify");
        group.bench_function(name, |b| b.iter(|| verify::verify(&scheme, &headers, &body, NOW)));
    }
    group.finish();
}

fn plugin_calls(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let host = Runtime::new(None).expect("wasmtime");
    let load = |dir: &str, name: &str, reuse: u32| {
        let path = workspace().join(dir).join(format!("{name}.wasm"));
        let bytes =
            std::fs::read(&path).unwrap_or_else(|_| panic!("{} is missing: run `make plugins`", path.display()));
        runtime.block_on(host.load(name, bytes, Limits { reuse, ..Limits::default() })).expect("load")
    };
    let event = Event {
        id: "bench-1".into(),
        source: "github".into(),
        event_type: "github.push".into(),
        time_ms: 0,
        content_type: "application/json".into(),
        data: Bytes::from(std::fs::read(workspace().join("examples/github/push.json")).expect("payload")),
        attributes: Vec::new(),
    };
    let mut group = c.benchmark_group("plugin call, 1.4 KiB event");
    for (dir, name) in [("target/test-plugins", "noop"), ("target/plugins", "github-push")] {
        for (how, reuse) in [("fresh instance", 0), ("reused instance", u32::MAX)] {
            let component = load(dir, name, reuse);
            assert!(runtime.block_on(component.invoke(&event, 1)).is_ok());
            group
                .bench_function(format!("{name}, {how}"), |b| b.iter(|| runtime.block_on(component.invoke(&event, 1))));
        }
    }
    group.finish();
}

fn journal_accept(c: &mut Criterion) {
    const BURST: u64 = 256;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options { max_pending: u64::MAX, ..Options::default() };
    let journal: Arc<dyn Journal> = Arc::new(SqliteJournal::open(dir.path(), options).expect("journal"));
    let next = Arc::new(AtomicU64::new(0));
    let data = Bytes::from(vec![b'x'; 1024]);
    let mut group = c.benchmark_group("journal accept, synchronous = FULL, 256 at once");
    group.throughput(Throughput::Elements(BURST));
    group.bench_function("1 KiB events", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut burst = tokio::task::JoinSet::new();
                for _ in 0..BURST {
                    let (journal, data) = (Arc::clone(&journal), data.clone());
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    burst.spawn(async move {
                        let event = Event {
                            id: format!("e-{id}"),
                            source: "github".into(),
                            event_type: "github.push".into(),
                            time_ms: 0,
                            content_type: "application/json".into(),
                            data,
                            attributes: Vec::new(),
                        };
                        let new =
                            NewEvent { event, plugins: vec!["echo".into()], dedup_window: Duration::from_secs(60) };
                        journal.accept(new).await.expect("accept");
                    });
                }
                burst.join_all().await;
            });
        });
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let patterns: Vec<String> = (0..100).map(|n| format!("source{}.event{}.*", n / 10, n % 10)).collect();
    let matcher = wasmhook::subscription::matcher(&patterns).expect("patterns");
    c.bench_function("route against 100 subscriptions", |b| b.iter(|| matcher.is_match("source5.event7.created")));
}

criterion_group!(benches, verification, plugin_calls, journal_accept, routing);
criterion_main!(benches);
