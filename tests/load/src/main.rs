//! `wasmhook-bench`: a load generator for wasmhook. It sends signed GitHub-style webhooks with
//! unique delivery ids over keep-alive connections, as fast as they go (closed loop) or at a
//! fixed rate (open loop: latency is measured from each request's scheduled time, so a slow
//! server cannot hide its queueing; a thread of its own keeps the schedule, and the tool
//! reports how late it was itself), records acknowledgement latency in an HDR histogram, and
//! measures how fast accepted events reach `done` through the admin API. `--compare` first
//! loads a bare hyper server answering 202 to the same requests: the ceiling of the same HTTP
//! stack on the same machine in the same minute.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Load a wasmhook host (and, with --compare, a bare hyper server first).
#[derive(Debug, Parser)]
#[command(name = "wasmhook-bench", version, about)]
struct Args {
    /// The webhook route of a `verify = "github"` source; several (comma-separated) spread
    /// the connections over hosts sharing one journal.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080/hooks/github")]
    url: Vec<String>,
    /// The hosts' admin APIs, to measure completion (summed over hosts); "" to skip.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:9090")]
    admin: Vec<String>,
    /// The source's webhook secret.
    #[arg(long, env = "GITHUB_WEBHOOK_SECRET", default_value = "dev-secret")]
    secret: String,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    connections: usize,
    /// How long to send, such as 10s.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Requests per second (open loop); as fast as possible when not given.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// The payload.
    #[arg(long, default_value = "examples/github/push.json")]
    body: PathBuf,
    /// Load a bare hyper server answering 202 first: wasmhook's share of its requests per
    /// second in closed loop, its latencies at the same rate in open loop.
    #[arg(long)]
    compare: bool,
    /// Only the bare hyper server.
    #[arg(long, conflicts_with = "compare")]
    baseline_only: bool,
    /// Send nothing: wait until the hosts have finished the deliveries they hold (a backlog
    /// left by an earlier run), and report how fast they were done.
    #[arg(long, conflicts_with_all = ["compare", "baseline_only", "rate"])]
    drain_only: bool,
    /// Send random (version 4) UUIDs as delivery ids, as many CloudEvents producers do,
    /// rather than ids that follow the order they are sent in, as GitHub's time-based
    /// (version 1) GUIDs do. Random ids land all over the journal's index of dedup keys.
    #[arg(long)]
    random_ids: bool,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The host's process id: its resident memory is sampled during the run, and its CPU time
    /// per accepted event reported, in all and by thread (Linux).
    #[arg(long)]
    pid: Option<u32>,
}

/// What one load run measured.
struct Run {
    name: &'static str,
    sent: u64,
    elapsed: Duration,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    latency: Histogram<u64>,
    /// This process's CPU time per answered request during the run, in µs (Linux): the load
    /// tool's alone against wasmhook, the tool's and the bare server's together in baseline.
    cpu_us_per_request: Option<f64>,
    /// Open loop: how late (µs) the tool itself sent requests, counted where a connection
    /// sat idle waiting for its next request to fall due (see [`Turn::waited`]).
    tool_late: Option<Histogram<u64>>,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "sent": self.sent,
            "seconds": self.elapsed.as_secs_f64(),
            "requests_per_second": self.per_second(),
            "statuses": self.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "errors": self.errors,
            "latency_us": quantiles(&self.latency),
            "process_cpu_us_per_request": self.cpu_us_per_request,
            "tool_late_us": self.tool_late.as_ref().filter(|late| !late.is_empty()).map(|late| {
                let mut summary = quantiles(late);
                summary["requests"] = json!(late.len());
                summary
            }),
        })
    }

    fn print(&self) {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:<10} {:>9.0} req/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  max {:>7.2} ms  statuses {:?}  errors {}",
            self.name,
            self.per_second(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            self.latency.max() as f64 / 1000.0,
            self.statuses,
            self.errors
        );
        if let Some(cpu) = self.cpu_us_per_request {
            let whose = if self.name == "baseline" { "bare server and load tool together" } else { "load tool" };
            println!("{:<10} {cpu:.0} µs of CPU per request ({whose})", "");
        }
        match &self.tool_late {
            Some(late) if late.is_empty() => {
                println!("{:<10} no connection was idle when a request fell due: the server held every one", "");
            }
            Some(late) => {
                let ms = |q: f64| late.value_at_quantile(q) as f64 / 1000.0;
                println!(
                    "{:<10} the tool itself sent requests late by p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms (part of the latencies above; {} requests found their connection idle)",
                    "",
                    ms(0.5),
                    ms(0.99),
                    ms(0.999),
                    late.max() as f64 / 1000.0,
                    late.len()
                );
            }
            None => {}
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admins: Vec<&str> = args.admin.iter().map(String::as_str).filter(|admin| !admin.is_empty()).collect();
    if args.drain_only {
        let report = json!({"hosts": admins.len(), "drain": drain_backlog(&admins, args.pid).await?});
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    let duration = humantime::parse_duration(&args.duration).context("--duration")?;
    let body = Bytes::from(std::fs::read(&args.body).with_context(|| format!("cannot read {}", args.body.display()))?);
    let signature = wasmhook::ingest::verify::github::sign(args.secret.as_bytes(), &body);
    let mut report = json!({"connections": args.connections, "rate": args.rate, "duration_s": duration.as_secs_f64(),
        "hosts": args.url.len()});
    let baseline = if args.compare || args.baseline_only {
        let address = start_baseline().await?;
        let run =
            load("baseline", &[format!("http://{address}/hooks/github")], &args, duration, &body, &signature).await?;
        run.print();
        report["baseline"] = run.to_json();
        Some(run)
    } else {
        None
    };
    if !args.baseline_only {
        let before = done_total(&admins).await;
        let sampler = args.pid.map(|pid| tokio::spawn(sample_rss(pid, duration)));
        let cpu_before = args.pid.and_then(cpu_seconds);
        let threads_before = args.pid.and_then(cpu_seconds_by_thread);
        let run = load("wasmhook", &args.url, &args, duration, &body, &signature).await?;
        run.print();
        report["wasmhook"] = run.to_json();
        if let Some(sampler) = sampler {
            let samples = sampler.await?;
            if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
                let max = samples.iter().copied().fold(0.0, f64::max);
                println!(
                    "host resident memory: {first:.1} MiB at the start, {max:.1} MiB at most, {last:.1} MiB at the end"
                );
                report["rss_mib"] = json!({"start": first, "max": max, "end": last});
            }
        }
        // In open loop both send the same rate: their latencies are what compares.
        if let Some(baseline) = baseline.as_ref().filter(|_| args.rate.is_none()) {
            let ratio = run.per_second() / baseline.per_second();
            println!("wasmhook / baseline: {ratio:.2}x the bare hyper server's requests per second");
            report["ratio_to_baseline"] = json!(ratio);
        }
        if let Some(before) = before {
            let accepted = run.statuses.get(&202).copied().unwrap_or(0);
            let (done, drained) = drain(&admins, before).await?;
            let seconds = run.elapsed.as_secs_f64() + drained.as_secs_f64();
            println!(
                "end to end: {accepted} accepted, {done} deliveries done in {seconds:.2} s ({:.0} done/s); drained {:.2} s after the last send",
                done as f64 / seconds,
                drained.as_secs_f64()
            );
            report["end_to_end"] = json!({"accepted": accepted, "deliveries_done": done, "seconds": seconds,
                "done_per_second": done as f64 / seconds, "drain_seconds": drained.as_secs_f64()});
        }
        // After the drain, when there is one, so that it counts each event's deliveries too.
        let accepted = run.statuses.get(&202).copied().unwrap_or(0);
        if let (Some(before), Some(after)) = (cpu_before, args.pid.and_then(cpu_seconds))
            && accepted > 0
        {
            let per_event = (after - before) / accepted as f64 * 1e6;
            let counts = if admins.is_empty() { "" } else { ", deliveries included" };
            println!("host CPU: {per_event:.0} µs per accepted event (user + system{counts})");
            report["host_cpu_us_per_event"] = json!(per_event);
            if let (Some(before), Some(after)) = (threads_before, args.pid.and_then(cpu_seconds_by_thread)) {
                let threads = per_event_by_thread(&before, &after, accepted);
                let line: Vec<String> = threads.iter().map(|(name, us)| format!("{name} {us:.0}")).collect();
                println!("           by thread, µs per accepted event: {}", line.join(", "));
                report["host_cpu_us_per_event_by_thread"] = json!(threads.into_iter().collect::<BTreeMap<_, _>>());
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Sends for `duration` over `args.connections` connections; open loop when a rate is given.
async fn load(
    name: &'static str,
    urls: &[String],
    args: &Args,
    duration: Duration,
    body: &Bytes,
    signature: &str,
) -> anyhow::Result<Run> {
    // Delivery ids must not repeat across runs, or the host answers them as duplicates.
    let run_id = format!("{name}-{}", wasmhook::event::now_ms());
    let mut targets = Vec::new();
    for url in urls {
        let uri: hyper::Uri = url.parse().with_context(|| format!("{url:?}"))?;
        targets.push(Arc::new(Target {
            authority: uri.authority().context("the URL has no host")?.to_string(),
            path: uri.path().to_owned(),
            body: body.clone(),
            signature: signature.to_owned(),
            run: run_id.clone(),
            random_ids: args.random_ids,
        }));
    }
    let cpu_before = cpu_seconds(std::process::id());
    let start = Instant::now();
    let deadline = start + duration;
    let schedule = Arc::new(match args.rate {
        Some(rate) => Schedule::open(start, deadline, Duration::from_secs_f64(1.0 / rate as f64), args.connections)?,
        None => Schedule::closed(deadline),
    });
    let mut tasks = Vec::new();
    for n in 0..args.connections {
        let (target, schedule) = (Arc::clone(&targets[n % targets.len()]), Arc::clone(&schedule));
        tasks.push(tokio::spawn(async move { connection(&target, &schedule).await }));
    }
    let mut run = Run {
        name,
        sent: 0,
        elapsed: Duration::ZERO,
        statuses: BTreeMap::new(),
        errors: 0,
        latency: micros()?,
        cpu_us_per_request: None,
        tool_late: None,
    };
    let mut tool_late = micros()?;
    for task in tasks {
        let (statuses, errors, latency, late) = task.await??;
        for (status, count) in statuses {
            *run.statuses.entry(status).or_default() += count;
            run.sent += count;
        }
        run.errors += errors;
        run.latency.add(latency)?;
        tool_late.add(late)?;
    }
    run.elapsed = start.elapsed();
    run.tool_late = args.rate.is_some().then_some(tool_late);
    if let Some(schedule) = Arc::into_inner(schedule) {
        schedule.finish();
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_seconds(std::process::id()))
        && run.sent > 0
    {
        run.cpu_us_per_request = Some((after - before) / run.sent as f64 * 1e6);
    }
    Ok(run)
}

/// An empty histogram of µs, from 1 µs to 60 s, to three significant digits.
fn micros() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Records the µs from `since` to now.
fn record_since(histogram: &mut Histogram<u64>, since: Instant) {
    histogram.saturating_record(u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX));
}

/// A histogram's median, tail and maximum, in its own unit.
fn quantiles(histogram: &Histogram<u64>) -> serde_json::Value {
    let at = |q: f64| histogram.value_at_quantile(q);
    json!({"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p99.9": at(0.999), "max": histogram.max()})
}

/// When request `n` of an open loop falls due.
fn due(start: Instant, interval: Duration, n: u64) -> Instant {
    start + interval.mul_f64(n as f64)
}

/// One connection's statuses, errors, latencies and (open loop) the tool's own lateness.
type Tally = (BTreeMap<u16, u64>, u64, Histogram<u64>, Histogram<u64>);

/// Where and what every connection of a run sends.
struct Target {
    authority: String,
    path: String,
    body: Bytes,
    signature: String,
    run: String,
    random_ids: bool,
}

impl Target {
    /// The delivery id of request `n`: unique across runs, in order unless random.
    fn delivery_id(&self, n: u64) -> String {
        if self.random_ids { uuid::Uuid::new_v4().to_string() } else { format!("{}-{n}", self.run) }
    }
}

/// Which request a run sends next, and from when its latency counts.
enum Schedule {
    /// As fast as the connections go: each request counts from when it is sent.
    Closed { next: AtomicU64, deadline: Instant },
    /// At a fixed rate: request n is due at `start + n × interval` whether or not the server
    /// kept up, and counts from then (so a slow server cannot hide its queueing).
    Open { next: AtomicU64, start: Instant, deadline: Instant, interval: Duration, pacer: Pacer },
}

/// A request to send now.
struct Turn {
    n: u64,
    /// When its latency counts from: its due time in open loop, now in closed loop.
    counts_from: Instant,
    /// Open loop: the connection sat idle until the request fell due, so any delay between
    /// `counts_from` and now is the tool's own (its pacer thread and the wake-up of this
    /// task), not the server's. A connection still busy with its last answer when the
    /// request fell due waited for the server instead.
    waited: bool,
}

impl Schedule {
    fn closed(deadline: Instant) -> Self {
        Schedule::Closed { next: AtomicU64::new(0), deadline }
    }

    fn open(start: Instant, deadline: Instant, interval: Duration, connections: usize) -> std::io::Result<Self> {
        let pacer = Pacer::start(start, deadline, interval, connections)?;
        Ok(Schedule::Open { next: AtomicU64::new(0), start, deadline, interval, pacer })
    }

    /// The next request to send; `None` once the run is over. In open loop, waits until a
    /// request is due.
    async fn next(&self) -> Option<Turn> {
        match self {
            Schedule::Closed { next, deadline } => {
                let now = Instant::now();
                (now < *deadline).then(|| Turn {
                    n: next.fetch_add(1, Ordering::Relaxed),
                    counts_from: now,
                    waited: false,
                })
            }
            Schedule::Open { next, start, deadline, interval, pacer } => {
                let waited = match pacer.permits.try_acquire() {
                    Ok(permit) => {
                        permit.forget();
                        false
                    }
                    Err(_) => {
                        pacer.permits.acquire().await.ok()?.forget();
                        true
                    }
                };
                // At least n + 1 permits were released before the n-th take, so request n is due.
                let n = next.fetch_add(1, Ordering::Relaxed);
                let due = due(*start, *interval, n);
                (due < *deadline).then_some(Turn { n, counts_from: due, waited })
            }
        }
    }

    /// Ends the pacer's thread, if any; every connection has ended by then.
    fn finish(self) {
        if let Schedule::Open { pacer, .. } = self {
            pacer.join();
        }
    }
}

/// Open loop's clock: a thread of its own that releases one permit per request at the
/// request's due time (at once for any it is late for). tokio's timer rounds every sleep up to
/// the next millisecond, which added up to 1 ms to each latency measured from a due time (the
/// bare server's p50 at 5 000/s read 1.31 ms); a thread's sleep wakes within tens of µs.
struct Pacer {
    permits: Arc<Semaphore>,
    thread: JoinHandle<()>,
}

impl Pacer {
    /// Releases the permits of the requests due before `deadline`, then one more per
    /// connection, so that each connection learns the run is over. Should the thread panic,
    /// the semaphore closes and every connection stops rather than waiting forever.
    fn start(start: Instant, deadline: Instant, interval: Duration, connections: usize) -> std::io::Result<Self> {
        /// Closes the semaphore if the pacer's thread unwinds.
        struct CloseOnPanic(Arc<Semaphore>);
        impl Drop for CloseOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.close();
                }
            }
        }
        let permits = Arc::new(Semaphore::new(0));
        let released = CloseOnPanic(Arc::clone(&permits));
        let thread = std::thread::Builder::new().name("pacer".into()).spawn(move || {
            let mut n = 0u64;
            loop {
                let due = due(start, interval, n);
                if due >= deadline {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                released.0.add_permits(1);
                n += 1;
            }
            released.0.add_permits(connections);
        })?;
        Ok(Pacer { permits, thread })
    }

    fn join(self) {
        let _ = self.thread.join();
    }
}

/// One keep-alive connection sending until the schedule ends; reconnects after an error.
async fn connection(target: &Target, schedule: &Schedule) -> anyhow::Result<Tally> {
    let mut statuses = BTreeMap::new();
    let mut errors = 0;
    let (mut latency, mut late) = (micros()?, micros()?);
    let mut sender = None;
    while let Some(Turn { n, counts_from: scheduled, waited }) = schedule.next().await {
        if waited {
            record_since(&mut late, scheduled);
        }
        if sender.is_none() {
            match TcpStream::connect(&target.authority).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    tokio::spawn(connection);
                    sender = Some(send);
                }
                Err(_) => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(send) = sender.as_mut() else { continue };
        let request = Request::post(target.path.as_str())
            .header("host", target.authority.as_str())
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", target.delivery_id(n))
            .header("x-hub-signature-256", target.signature.as_str())
            .body(Full::new(target.body.clone()))?;
        match send.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                record_since(&mut latency, scheduled);
                *statuses.entry(status).or_insert(0) += 1;
            }
            Err(_) => {
                errors += 1;
                sender = None;
            }
        }
    }
    Ok((statuses, errors, latency, late))
}

/// The resident memory of process `pid` in MiB, every 100 ms for `duration`.
async fn sample_rss(pid: u32, duration: Duration) -> Vec<f64> {
    let mut samples = Vec::new();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        samples.extend(kib.map(|kib| kib / 1024.0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// The unit of the CPU times in `/proc/PID/stat`: Linux reports them to user space at 100
/// ticks per second (USER_HZ) whatever the kernel's own tick rate.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// The CPU time process `pid` has used so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|(_, seconds)| seconds)
}

/// The CPU time each of process `pid`'s threads has used so far, in seconds, summed by thread
/// name (`tokio-rt-worker`, `journal-writer`, …; Linux keeps 15 bytes of a name). A thread
/// that ended before the look is not in it (its time is in [`cpu_seconds`]).
fn cpu_seconds_by_thread(pid: u32) -> Option<BTreeMap<String, f64>> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some((name, seconds)) = stat_cpu(&stat) {
            *threads.entry(name).or_insert(0.0) += seconds;
        }
    }
    Some(threads)
}

/// The command name and the CPU time (user + system, in seconds) in a `/proc/…/stat` line.
fn stat_cpu(stat: &str) -> Option<(String, f64)> {
    // The name is in parentheses and may itself hold spaces and parentheses.
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime: fields 14 and 15 of the line, and this list starts at field 3.
    Some((name, (ticks(11)? + ticks(12)?) / CLOCK_TICKS_PER_SECOND))
}

/// Each thread name's CPU time between two looks, in µs per event, most first; names that
/// used none are left out.
fn per_event_by_thread(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    events: u64,
) -> Vec<(String, f64)> {
    let mut threads: Vec<(String, f64)> = after
        .iter()
        .map(|(name, seconds)| (name.clone(), (seconds - before.get(name).unwrap_or(&0.0)) / events as f64 * 1e6))
        .filter(|(_, us)| *us > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    threads
}

/// A bare hyper server that reads each body and answers 202: the same HTTP stack, no work.
async fn start_baseline() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(br#"{"id":"x","type":"github.push"}"#)));
                    *response.status_mut() = StatusCode::ACCEPTED;
                    Ok::<_, Infallible>(response)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}

/// The hosts' `wasmhook_deliveries_done_total` summed over plugins and hosts; `None`
/// without an admin API.
async fn done_total(admins: &[&str]) -> Option<f64> {
    if admins.is_empty() {
        return None;
    }
    let mut total = 0.0;
    for admin in admins {
        let (_, text) =
            wasmhook::client::request(hyper::Method::GET, &format!("{admin}/metrics"), &[], Vec::new()).await.ok()?;
        total += text
            .lines()
            .filter(|line| line.starts_with("wasmhook_deliveries_done_total"))
            .filter_map(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum::<f64>();
    }
    Some(total)
}

/// `--drain-only`: waits for the hosts' unfinished deliveries, printing and returning how many
/// were done and how fast. With `pid` (a host just started on a backlog), it counts from that
/// host's start, as its counters do, so that what the host did before the tool looked is in
/// the figures, and adds the host's CPU time per delivery, in all and by thread.
async fn drain_backlog(admins: &[&str], pid: Option<u32>) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(!admins.is_empty(), "--drain-only needs the admin API (--admin)");
    let (before, already) = match pid {
        Some(pid) => (0.0, seconds_since_start(pid).context("cannot read the host's start time (Linux /proc)")?),
        None => (done_total(admins).await.unwrap_or(0.0), 0.0),
    };
    let (done, waited) = drain(admins, before).await?;
    let seconds = already + waited.as_secs_f64();
    let counted = if pid.is_some() { "since the host started" } else { "since the tool looked" };
    println!("drain: {done} deliveries done in {seconds:.2} s {counted} ({:.0} done/s)", done as f64 / seconds);
    let mut report = json!({"deliveries_done": done, "seconds": seconds, "done_per_second": done as f64 / seconds,
        "counted_from_host_start": pid.is_some()});
    if let (Some(cpu), Some(threads)) = (pid.and_then(cpu_seconds), pid.and_then(cpu_seconds_by_thread))
        && done > 0
    {
        // The host's whole CPU time: opening the journal and loading its plugins included.
        let per_delivery = cpu / done as f64 * 1e6;
        println!("host CPU: {per_delivery:.0} µs per delivery (user + system, start-up included)");
        report["host_cpu_us_per_delivery"] = json!(per_delivery);
        let threads = per_event_by_thread(&BTreeMap::new(), &threads, done);
        let line: Vec<String> = threads.iter().map(|(name, us)| format!("{name} {us:.0}")).collect();
        println!("           by thread, µs per delivery: {}", line.join(", "));
        report["host_cpu_us_per_delivery_by_thread"] = json!(threads.into_iter().collect::<BTreeMap<_, _>>());
    }
    Ok(report)
}

/// How long ago process `pid` started, in seconds (Linux: its start in `/proc/PID/stat`,
/// against `/proc/uptime`).
fn seconds_since_start(pid: u32) -> Option<f64> {
    let started = stat_start(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(uptime - started)
}

/// When the process of a `/proc/…/stat` line started, in seconds after the machine booted.
fn stat_start(stat: &str) -> Option<f64> {
    // starttime: field 22 of the line; the list after the name starts at field 3.
    Some(stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse::<f64>().ok()? / CLOCK_TICKS_PER_SECOND)
}

/// Waits until no host reports an unfinished delivery; returns the deliveries done since
/// `before` and how long the wait took.
async fn drain(admins: &[&str], before: f64) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    loop {
        let mut unfinished = 0;
        for admin in admins {
            let (_, text) =
                wasmhook::client::request(hyper::Method::GET, &format!("{admin}/v1/stats"), &[], Vec::new()).await?;
            let stats: serde_json::Value = serde_json::from_str(&text)?;
            unfinished +=
                ["pending", "running", "retrying"].iter().map(|key| stats[key].as_u64().unwrap_or(0)).sum::<u64>();
        }
        if unfinished == 0 {
            let done = done_total(admins).await.unwrap_or(before) - before;
            return Ok((done as u64, started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{unfinished} deliveries still unfinished after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_thread_name_cpu_seconds_and_start_even_with_spaces_and_parentheses_in_the_name() {
        // utime 250 and stime 50 ticks (fields 14 and 15): 3 s at 100 ticks a second.
        let stat = "4242 (odd (name) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu(stat), Some(("odd (name) x".to_owned(), 3.0)));
        assert_eq!(stat_cpu("4242 (cut"), None, "a line without its fields is refused");
        // starttime 100 ticks (field 22): 1 s after boot.
        assert_eq!(stat_start(stat), Some(1.0));
        assert_eq!(stat_start("4242 (cut) S 1"), None, "a line without its fields is refused");
    }

    #[test]
    fn the_cpu_by_thread_is_the_difference_per_event_most_first_without_idle_threads() {
        let before = BTreeMap::from([("journal-writer".to_owned(), 1.0), ("tokio-rt-worker".to_owned(), 2.0)]);
        let after = BTreeMap::from([
            ("epoch-ticker".to_owned(), 0.0),
            ("journal-writer".to_owned(), 1.5),
            ("journal-sync".to_owned(), 0.1),
            ("tokio-rt-worker".to_owned(), 4.0),
        ]);
        let threads = per_event_by_thread(&before, &after, 10_000);
        let expect = [("tokio-rt-worker", 200.0), ("journal-writer", 50.0), ("journal-sync", 10.0)];
        assert_eq!(threads.len(), expect.len(), "{threads:?}");
        for ((name, us), (want_name, want_us)) in threads.iter().zip(expect) {
            assert_eq!(name, want_name);
            assert!((us - want_us).abs() < 1e-6, "{name}: {us} µs, want {want_us}");
        }
    }

    #[test]
    fn delivery_ids_follow_the_send_order_unless_random() {
        let target = |random_ids| Target {
            authority: String::new(),
            path: String::new(),
            body: Bytes::new(),
            signature: String::new(),
            run: "wasmhook-1700000000000".to_owned(),
            random_ids,
        };
        let ordered = target(false);
        assert_eq!(ordered.delivery_id(7), "wasmhook-1700000000000-7");
        let random = target(true);
        let (first, second) = (random.delivery_id(7), random.delivery_id(7));
        assert_ne!(first, second, "a random id is new each time, even for the same request number");
        let parsed = uuid::Uuid::parse_str(&first).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4, "random, like a CloudEvents producer's");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_hands_out_each_request_once_and_never_before_it_is_due() {
        let interval = Duration::from_millis(2);
        let start = Instant::now();
        let schedule = Arc::new(Schedule::open(start, start + interval * 20, interval, 3).expect("pacer"));
        let mut connections = Vec::new();
        for _ in 0..3 {
            let schedule = Arc::clone(&schedule);
            connections.push(tokio::spawn(async move {
                let mut taken = Vec::new();
                while let Some(Turn { n, counts_from, .. }) = schedule.next().await {
                    assert!(Instant::now() >= counts_from, "request {n} was handed out before it was due");
                    assert_eq!(
                        counts_from,
                        start + interval * u32::try_from(n).expect("small"),
                        "request {n} counts from its due time"
                    );
                    taken.push(n);
                }
                taken
            }));
        }
        let mut taken = Vec::new();
        for connection in connections {
            // A miscounted end of run would leave a connection waiting: fail instead of hanging.
            let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
            taken.extend(ended.expect("every connection learns the run is over").expect("connection"));
        }
        taken.sort_unstable();
        assert_eq!(taken, (0..20).collect::<Vec<_>>(), "each request due before the deadline, once");
        Arc::into_inner(schedule).expect("the connections are done").finish();
    }

    #[tokio::test]
    async fn an_open_loop_connection_that_sat_idle_waited_for_the_tool_and_a_busy_one_did_not() {
        let interval = Duration::from_millis(5);
        // The first request falls due well after the connection asks for it.
        let start = Instant::now() + Duration::from_secs(1);
        let schedule = Schedule::open(start, start + interval * 20, interval, 1).expect("pacer");
        let first = schedule.next().await.expect("request 0");
        assert!(first.waited, "nothing was due yet when the connection asked, so it waited for the pacer");
        // Busy long past the next due times: those requests are released when it asks again.
        tokio::time::sleep(interval * 10).await;
        let second = schedule.next().await.expect("request 1");
        assert_eq!(second.n, 1);
        assert!(!second.waited, "request 1 fell due while the connection was busy: the wait was the server's");
        schedule.finish();
    }

    #[tokio::test]
    async fn closed_loop_numbers_requests_in_turn_until_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(500);
        let schedule = Schedule::closed(deadline);
        let mut expected = 0;
        while let Some(turn) = schedule.next().await {
            assert_eq!(turn.n, expected);
            assert!(!turn.waited, "a closed loop never waits for a due time");
            expected += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(expected > 0, "requests were handed out before the deadline");
        assert!(Instant::now() >= deadline, "the schedule ended at its deadline");
    }
}
