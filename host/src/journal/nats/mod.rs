//! The distributed journal, for several hosts: events in a NATS JetStream stream, one durable
//! pull consumer per plugin, dead letters in a second stream, the errors of deliveries being
//! retried in a key-value bucket, and optionally Redis for acceptance dedup.
//!
//! Any host may accept an event (202 only after JetStream's publish acknowledgement) and any
//! host may run it: a plugin's consumer hands each message to one host at a time, for an ack
//! wait of the plugin's timeout plus the lease margin. A host that dies leaves its messages
//! unacknowledged, and JetStream redelivers them to another host when the ack wait ends.
//! Retries are `nak`s with the backoff delay; the last failure publishes a dead letter and
//! then `term`s the message.

pub mod dedup;
pub mod record;
pub mod subjects;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use globset::GlobSet;
use tokio::sync::Notify;

use self::dedup::{Claim, RedisDedup};
use self::record::Dead;
use crate::event::{Event, now_ms};
use crate::journal::{
    Accepted, AttemptError, DeadLetter, DeadLetterDetail, DeadSelector, EventRecord, Expired, Journal, JournalError,
    Lease, NewEvent, Outcome, Route, Stats, Want,
};

/// How long a JetStream request may take before the journal counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the backlog (for backpressure) is counted again.
const BACKLOG_PERIOD: Duration = Duration::from_secs(1);
/// Events read into memory at a time by a replay.
const REPLAY_CHUNK: usize = 1000;
/// How long a scan of a stream waits for its next message before it stops.
const SCAN_WAIT: Duration = Duration::from_secs(2);

/// Where the distributed journal lives and how it behaves.
#[derive(Clone, PartialEq, Eq)]
pub struct Options {
    /// The NATS server, as a URL such as `nats://127.0.0.1:4222` (may hold credentials).
    pub url: String,
    /// The events stream's name; dead letters go to `{stream}_DLQ`.
    pub stream: String,
    /// The first tokens of every subject.
    pub prefix: String,
    /// Copies JetStream keeps of each stream (1 to 5; 3 is usual in a cluster).
    pub replicas: usize,
    /// How long JetStream itself refuses a repeated (source, id).
    pub duplicate_window: Duration,
    /// How long events are kept in the stream.
    pub retention: Duration,
    /// Unfinished deliveries above which ingest answers 503.
    pub max_pending: u64,
    /// Redis for acceptance dedup over each source's window, if set.
    pub redis_url: Option<String>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may hold credentials: show the servers only.
        f.debug_struct("Options")
            .field("server", &server_only(&self.url))
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .field("duplicate_window", &self.duplicate_window)
            .field("retention", &self.retention)
            .field("max_pending", &self.max_pending)
            .field("redis", &self.redis_url.as_deref().map(server_only))
            .finish()
    }
}

/// A plugin's consumer as this host last configured it.
struct Queue {
    /// What it was configured from: a want with the same needs no change.
    subscriptions: Arc<[String]>,
    ack_wait: Duration,
    consumer: consumer::PullConsumer,
    matcher: GlobSet,
}

/// The journal on NATS JetStream (and Redis).
pub struct NatsJournal {
    client: async_nats::Client,
    js: jetstream::Context,
    events: stream::Stream,
    dead: stream::Stream,
    attempts: kv::Store,
    dedup: Option<RedisDedup>,
    options: Options,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    /// Messages being worked on here, by (plugin, stream sequence, delivery count).
    leases: Mutex<HashMap<(String, u64, u32), jetstream::message::Acker>>,
    wake: Notify,
    wake_subject: async_nats::Subject,
    backlog: AtomicU64,
    turn: AtomicUsize,
}

impl NatsJournal {
    /// Connects, and creates the streams and bucket that are missing (adding `sources`'
    /// subjects to an existing events stream). Fails when NATS or Redis cannot be reached.
    pub async fn open(options: Options, sources: &[String]) -> anyhow::Result<Arc<NatsJournal>> {
        // Credentials go to the client apart from the address, which the client may log.
        let (server, credentials) = split_credentials(&options.url);
        let connect = match credentials {
            Some((user, Some(password))) => async_nats::ConnectOptions::with_user_and_password(user, password),
            Some((token, None)) => async_nats::ConnectOptions::with_token(token),
            None => async_nats::ConnectOptions::new(),
        };
        let client = connect
            .name("wasmhook")
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("lost the connection to NATS; reconnecting"),
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    other => tracing::debug!(event = %other, "NATS connection event"),
                }
            })
            .connect(server.as_str())
            .await
            .map_err(|err| anyhow::anyhow!("cannot connect to NATS ({server}): {err}"))?;
        let js = jetstream::ContextBuilder::new().timeout(REQUEST_TIMEOUT).build(client.clone());
        let events = open_events_stream(&js, &options, sources).await?;
        let dead = js
            .get_or_create_stream(stream::Config {
                name: format!("{}_DLQ", options.stream),
                subjects: vec![subjects::dead_subjects(&options.prefix)],
                num_replicas: options.replicas,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|err| anyhow::anyhow!("cannot open the dead-letter stream: {err}"))?;
        let bucket = format!("{}_ATTEMPTS", options.stream);
        let attempts = match js.get_key_value(bucket.as_str()).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    max_age: options.retention,
                    num_replicas: options.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|err| anyhow::anyhow!("cannot open the key-value bucket {bucket}: {err}"))?,
        };
        let dedup = match &options.redis_url {
            Some(url) => Some(RedisDedup::connect(url, &options.prefix).await.map_err(anyhow::Error::msg)?),
            None => None,
        };
        let mut wakeups = client.subscribe(subjects::wake_subject(&options.prefix)).await?;
        let wake_subject = subjects::wake_subject(&options.prefix).into();
        let journal = Arc::new(NatsJournal {
            client,
            js,
            events,
            dead,
            attempts,
            dedup,
            options,
            queues: Mutex::default(),
            leases: Mutex::default(),
            wake: Notify::new(),
            wake_subject,
            backlog: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&journal);
        tokio::spawn(async move {
            while wakeups.next().await.is_some() {
                let Some(journal) = weak.upgrade() else { return };
                journal.wake.notify_one();
            }
        });
        tokio::spawn(count_backlog(Arc::downgrade(&journal)));
        Ok(journal)
    }

    fn connected(&self) -> Result<(), JournalError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(JournalError::Unavailable("not connected to NATS".to_owned())),
        }
    }

    /// Publishes an event unless Redis or JetStream has seen its key.
    async fn publish(&self, event: &Event, window: Duration) -> Result<Accepted, JournalError> {
        let key = event.key();
        let (headers, payload) = record::event_message(event, &record::message_id(event));
        self.leaves_room(&headers, &payload)?;
        let mut claim = None;
        if let Some(dedup) = &self.dedup {
            let (found, token) = dedup.claim(&key).await?;
            match found {
                Claim::Ours => claim = Some(token),
                Claim::Accepted => return Ok(Accepted::Duplicate),
                Claim::InFlight => {
                    return Err(JournalError::Unavailable(
                        "the same delivery is being stored by another request".to_owned(),
                    ));
                }
            }
        }
        let subject = subjects::event_subject(&self.options.prefix, &event.source, &event.event_type);
        let ack = match self.send(subject, headers, payload).await {
            Ok(ack) => ack,
            Err(err) => {
                if let (Some(dedup), Some(token)) = (&self.dedup, &claim)
                    && let Err(release) = dedup.release(&key, token).await
                {
                    tracing::warn!(event.id = %event.id, error = %release, "cannot release a dedup claim");
                }
                return Err(err);
            }
        };
        if let Some(dedup) = &self.dedup
            && let Err(err) = dedup.confirm(&key, window).await
        {
            // Stored all the same; the claim still guards it for a while.
            tracing::warn!(event.id = %event.id, error = %err, "cannot extend a dedup key to its window");
        }
        self.signal().await;
        Ok(if ack.duplicate { Accepted::Duplicate } else { Accepted::New })
    }

    /// Publishes to JetStream and waits for the stream's acknowledgement.
    async fn send(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, JournalError> {
        self.connected()?;
        let ack = self.js.publish_with_headers(subject, headers, payload).await.map_err(|err| {
            if err.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
                JournalError::TooLarge { max: self.client.server_info().max_payload }
            } else {
                unavailable(err)
            }
        })?;
        ack.await.map_err(unavailable)
    }

    /// Refuses an event's message unless its dead letter would fit in a message too: the
    /// server refuses anything over `max_payload`, and a delivery whose outcome cannot be
    /// stored would run again and again.
    fn leaves_room(&self, headers: &HeaderMap, payload: &Bytes) -> Result<(), JournalError> {
        let max = self.max_payload().saturating_sub(record::DEAD_LETTER_ROOM);
        if record::wire_len(headers, payload.len()) > max {
            return Err(JournalError::TooLarge { max });
        }
        Ok(())
    }

    /// How long the events stream refuses a repeated message id, as the stream has it (the
    /// configured value applies only when a host creates the stream).
    pub fn duplicate_window(&self) -> Duration {
        self.events.cached_info().config.duplicate_window
    }

    /// The largest message the NATS server takes, headers included.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Tells every host (this one too) that new work is in the stream. The client only
    /// queues the message; a lost signal costs at most one idle poll.
    async fn signal(&self) {
        let _ = self.client.publish(self.wake_subject.clone(), Bytes::new()).await;
    }

    /// Creates or updates the consumers of `wants` whose settings changed, and forgets the
    /// plugins no longer wanted (the server deletes their consumers once inactive). Costs a
    /// lookup per plugin when nothing changed, which is every take but the first.
    async fn sync_queues(&self, wants: &[Want]) {
        let changed: Vec<&Want> = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            queues.retain(|plugin, _| wants.iter().any(|want| &want.plugin == plugin));
            wants
                .iter()
                .filter(|want| {
                    !queues
                        .get(&want.plugin)
                        .is_some_and(|queue| queue.subscriptions == want.subscriptions && queue.ack_wait == want.lease)
                })
                .collect()
        };
        for want in changed {
            let filters = subjects::filters(&self.options.prefix, &want.subscriptions);
            if filters.is_empty() {
                continue;
            }
            match self.configure(want, filters).await {
                Ok(queue) => {
                    self.queues.lock().unwrap_or_else(|e| e.into_inner()).insert(want.plugin.clone(), Arc::new(queue));
                }
                Err(err) => tracing::error!(plugin = %want.plugin, error = %err, "cannot set up the plugin's consumer"),
            }
        }
    }

    async fn configure(&self, want: &Want, filters: Vec<String>) -> anyhow::Result<Queue> {
        let name = consumer_name(&want.plugin);
        // A consumer's deliver policy cannot change: keep the one it was created with.
        let deliver_policy = match self.events.consumer_info(&name).await {
            Ok(info) => info.config.deliver_policy,
            Err(_) => consumer::DeliverPolicy::ByStartTime { start_time: datetime(want.since_ms) },
        };
        let config = consumer::pull::Config {
            durable_name: Some(name),
            description: Some(format!("wasmhook plugin {}", want.plugin)),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: want.lease,
            max_deliver: -1,
            // Deliveries waiting out a retry's backoff count as pending acks: no cap, or a
            // plugin with many retries waiting would get nothing new.
            max_ack_pending: -1,
            filter_subjects: filters.clone(),
            // No host has pulled for as long as events are kept: nothing is left to deliver,
            // so the server may delete the consumer (a removed plugin's backlog stays until then).
            inactive_threshold: self.options.retention,
            ..Default::default()
        };
        let consumer = self.events.create_consumer(config).await?;
        tracing::info!(plugin = %want.plugin, filters = ?filters, ack_wait_ms = want.lease.as_millis() as u64, "consumer ready");
        let matcher = crate::subscription::matcher(&want.subscriptions).map_err(anyhow::Error::msg)?;
        Ok(Queue { subscriptions: Arc::clone(&want.subscriptions), ack_wait: want.lease, consumer, matcher })
    }

    fn queue(&self, plugin: &str) -> Option<Arc<Queue>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).get(plugin).cloned()
    }

    /// Fetches what is there now, at most `max` in all and each plugin's `free`, taking the
    /// plugins in a rotating order so that none starves the others.
    async fn pull(&self, wants: &[Want], max: usize) -> Vec<Lease> {
        let mut budget = max;
        let mut fetches = Vec::new();
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % wants.len().max(1);
        for want in wants.iter().cycle().skip(start).take(wants.len()) {
            let take = want.free.min(budget);
            let Some(queue) = self.queue(&want.plugin).filter(|_| take > 0) else { continue };
            budget -= take;
            fetches.push(self.fetch(&want.plugin, queue, take));
        }
        futures_util::future::join_all(fetches).await.into_iter().flatten().collect()
    }

    async fn fetch(&self, plugin: &str, queue: Arc<Queue>, max: usize) -> Vec<Lease> {
        // A fetch that loses its connection never ends by itself: bound it, and keep what came.
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let batch = tokio::time::timeout_at(deadline, queue.consumer.fetch().max_messages(max).messages());
        let mut batch = match batch.await {
            Ok(Ok(batch)) => batch,
            Ok(Err(err)) => {
                tracing::warn!(plugin, error = %err, "cannot fetch from the plugin's consumer");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        let mut leases = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, batch.next()).await {
            match message {
                Ok(message) => leases.extend(self.lease(plugin, &queue, message).await),
                Err(err) => {
                    tracing::warn!(plugin, error = %err, "fetching from the plugin's consumer failed");
                    break;
                }
            }
        }
        leases
    }

    /// A message as a lease, or `None` when it is not for this plugin (acknowledged at once).
    async fn lease(&self, plugin: &str, queue: &Queue, message: jetstream::Message) -> Option<Lease> {
        let (sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, u32::try_from(info.delivered).unwrap_or(u32::MAX)),
            Err(err) => {
                tracing::warn!(plugin, error = %err, "a message without delivery facts");
                return None;
            }
        };
        let (message, acker) = message.split();
        let headers = message.headers.as_ref();
        let Some(event) = record::read_event(headers, &message.payload) else {
            tracing::warn!(plugin, sequence, subject = %message.subject, "not a wasmhook event; dropped");
            let _ = acker.ack_with(AckKind::Term).await;
            return None;
        };
        // Filters are wider than globs, and a replay names its plugins.
        if !record::is_for(headers, plugin) || !queue.matcher.is_match(&event.event_type) {
            let _ = acker.ack().await;
            return None;
        }
        self.leases.lock().unwrap_or_else(|e| e.into_inner()).insert((plugin.to_owned(), sequence, delivered), acker);
        Some(Lease {
            delivery: i64::try_from(sequence).unwrap_or(i64::MAX),
            plugin: plugin.to_owned(),
            attempt: delivered,
            event: Arc::new(event),
        })
    }

    fn take_acker(&self, lease: &Lease) -> Option<jetstream::message::Acker> {
        let key = (lease.plugin.clone(), u64::try_from(lease.delivery).unwrap_or_default(), lease.attempt);
        self.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(&key)
    }

    /// The bucket key of a delivery's errors.
    fn attempts_key(lease: &Lease) -> String {
        format!("{}.{}", hex::encode(&lease.plugin), lease.delivery)
    }

    async fn errors(&self, lease: &Lease) -> Vec<AttemptError> {
        match self.attempts.get(Self::attempts_key(lease)).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn record_error(&self, lease: &Lease, error: &str) -> Vec<AttemptError> {
        let mut errors = self.errors(lease).await;
        errors.push(AttemptError { attempt: lease.attempt, time_ms: now_ms(), error: error.to_owned() });
        let json = serde_json::to_vec(&errors).unwrap_or_default();
        if let Err(err) = self.attempts.put(Self::attempts_key(lease), json.into()).await {
            tracing::warn!(plugin = %lease.plugin, error = %err, "cannot record a failed attempt's error");
        }
        errors
    }

    async fn forget_errors(&self, lease: &Lease) {
        if lease.attempt > 1
            && let Err(err) = self.attempts.purge(Self::attempts_key(lease)).await
        {
            tracing::debug!(error = %err, "cannot drop a delivery's errors");
        }
    }

    /// Publishes a copy of `event` for `plugins` only, as a new message with a fresh attempt
    /// budget.
    async fn republish(&self, event: &Event, plugins: &[String]) -> Result<(), JournalError> {
        let subject = subjects::event_subject(&self.options.prefix, &event.source, &event.event_type);
        let (mut headers, payload) = record::event_message(event, &format!("replay:{}", uuid::Uuid::new_v4()));
        headers.insert(record::PLUGINS_HEADER, plugins.join(",").as_str());
        self.send(subject, headers, payload).await?;
        self.signal().await;
        Ok(())
    }

    /// The last sequence `stream` holds now.
    async fn last_sequence(&self, stream: &stream::Stream) -> Result<u64, JournalError> {
        self.connected()?;
        Ok(stream.get_info().await.map_err(unavailable)?.state.last_sequence)
    }

    /// Reads up to `limit` messages of `stream` in order from `deliver`, filtered by
    /// `filter`, stopping after sequence `until`.
    async fn scan(
        &self,
        stream: &stream::Stream,
        filter: String,
        deliver: consumer::DeliverPolicy,
        until: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, JournalError> {
        self.connected()?;
        let ordered = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut found = Vec::new();
        if ordered.cached_info().num_pending == 0 {
            return Ok(found);
        }
        let mut messages = ordered.messages().await.map_err(unavailable)?;
        while let Ok(Some(Ok(message))) = tokio::time::timeout(SCAN_WAIT, messages.next()).await {
            let Ok((sequence, pending)) = message.info().map(|info| (info.stream_sequence, info.pending)) else {
                break;
            };
            if sequence > until {
                break;
            }
            let message = message.message;
            found.push(Stored { sequence, headers: message.headers, payload: message.payload });
            if sequence == until || pending == 0 || found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    /// The dead letters `selector` names.
    async fn select_dead(&self, selector: &DeadSelector) -> Result<Vec<Stored>, JournalError> {
        let filter = match selector {
            DeadSelector::Ids(ids) => {
                let mut found = Vec::new();
                for id in ids {
                    if let Some(stored) = self.dead_message(*id).await? {
                        found.push(stored);
                    }
                }
                return Ok(found);
            }
            DeadSelector::Plugin(plugin) => subjects::dead_subject(&self.options.prefix, plugin),
            DeadSelector::All => subjects::dead_subjects(&self.options.prefix),
        };
        let until = self.last_sequence(&self.dead).await?;
        self.scan(&self.dead, filter, consumer::DeliverPolicy::All, until, usize::MAX).await
    }

    async fn dead_message(&self, id: i64) -> Result<Option<Stored>, JournalError> {
        let Ok(sequence) = u64::try_from(id) else { return Ok(None) };
        self.connected()?;
        match self.dead.get_raw_message(sequence).await {
            Ok(message) => Ok(Some(Stored { sequence, headers: Some(message.headers), payload: message.payload })),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// Unfinished deliveries per plugin this host has a consumer for.
    async fn backlogs(&self) -> Result<BTreeMap<String, (u64, u64)>, JournalError> {
        self.connected()?;
        let queues: Vec<(String, Arc<Queue>)> = self
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut backlogs = BTreeMap::new();
        for (plugin, queue) in queues {
            let info = queue.consumer.clone().info().await.map_err(unavailable)?.clone();
            backlogs.insert(plugin, (info.num_pending, u64::try_from(info.num_ack_pending).unwrap_or_default()));
        }
        Ok(backlogs)
    }
}

/// A message read back from a stream.
struct Stored {
    sequence: u64,
    headers: Option<HeaderMap>,
    payload: Bytes,
}

impl Stored {
    fn dead_letter(&self) -> Option<(DeadLetter, Dead, Event)> {
        let event = record::read_event(self.headers.as_ref(), &self.payload)?;
        let dead = record::read_dead(self.headers.as_ref())?;
        let letter = DeadLetter {
            delivery: i64::try_from(self.sequence).unwrap_or(i64::MAX),
            event_id: event.id.clone(),
            source: event.source.clone(),
            event_type: event.event_type.clone(),
            plugin: dead.plugin.clone(),
            attempts: dead.attempts,
            last_error: dead.errors.last().map(|error| error.error.clone()),
            died_ms: Some(dead.died_ms),
        };
        Some((letter, dead, event))
    }
}

#[async_trait::async_trait]
impl Journal for NatsJournal {
    fn check_size(&self, event: &Event) -> Result<(), JournalError> {
        let (headers, payload) = record::event_message(event, &record::message_id(event));
        self.leaves_room(&headers, &payload)
    }

    async fn accept(&self, new: NewEvent) -> Result<Accepted, JournalError> {
        self.has_room()?;
        self.publish(&new.event, new.dedup_window).await
    }

    fn has_room(&self) -> Result<(), JournalError> {
        self.connected()?;
        let pending = self.backlog.load(Ordering::Relaxed);
        if pending >= self.options.max_pending {
            return Err(JournalError::Full { pending, max: self.options.max_pending });
        }
        Ok(())
    }

    async fn take(&self, wants: &[Want], max: usize, wait: Duration) -> Result<Vec<Lease>, JournalError> {
        self.connected()?;
        self.sync_queues(wants).await;
        let mut leases = self.pull(wants, max).await;
        if leases.is_empty() && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, self.wake.notified()).await;
            leases = self.pull(wants, max).await;
        }
        Ok(leases)
    }

    async fn finish(
        &self,
        lease: &Lease,
        outcome: Outcome,
        _sha256: &str,
        emitted: Vec<NewEvent>,
    ) -> Result<bool, JournalError> {
        let Some(acker) = self.take_acker(lease) else { return Ok(false) };
        match outcome {
            Outcome::Done => {
                for new in &emitted {
                    self.publish(&new.event, new.dedup_window).await?;
                }
                self.forget_errors(lease).await;
                acker.double_ack().await.map_err(unavailable)?;
            }
            Outcome::Retry { error, delay } => {
                self.record_error(lease, &error).await;
                acker.ack_with(AckKind::Nak(Some(delay))).await.map_err(unavailable)?;
            }
            Outcome::Dead { error } => {
                let errors = self.record_error(lease, &error).await;
                let dead = Dead { plugin: lease.plugin.clone(), attempts: lease.attempt, errors, died_ms: now_ms() };
                // The alert first: if it cannot be published, no dead letter is written twice.
                for new in &emitted {
                    self.publish(&new.event, new.dedup_window).await?;
                }
                let (mut headers, payload) = record::dead_message(&lease.event, &dead);
                // A rerun after a crash between this publish and the `term` is stored once.
                let id = format!("dead:{}:{}", lease.plugin, lease.delivery);
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
                self.send(subjects::dead_subject(&self.options.prefix, &lease.plugin), headers, payload).await?;
                let _ = self.attempts.purge(Self::attempts_key(lease)).await;
                acker.double_ack_with(AckKind::Term).await.map_err(unavailable)?;
            }
        }
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<(), JournalError> {
        if let Some(acker) = self.take_acker(lease) {
            acker.ack_with(AckKind::Nak(None)).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn pending_by_plugin(&self) -> Result<BTreeMap<String, u64>, JournalError> {
        Ok(self.backlogs().await?.into_iter().map(|(plugin, (waiting, leased))| (plugin, waiting + leased)).collect())
    }

    async fn event(&self, _id: &str) -> Result<Option<EventRecord>, JournalError> {
        Err(JournalError::Unsupported(
            "looking an event up by id needs the embedded journal; the nats backend keeps no index of ids",
        ))
    }

    async fn dead_letters(&self, plugin: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, JournalError> {
        let selector = plugin.map_or(DeadSelector::All, |plugin| DeadSelector::Plugin(plugin.to_owned()));
        let mut letters: Vec<DeadLetter> = self
            .select_dead(&selector)
            .await?
            .iter()
            .filter_map(|stored| stored.dead_letter().map(|(letter, _, _)| letter))
            .collect();
        letters.reverse();
        letters.truncate(limit);
        Ok(letters)
    }

    async fn dead_letter(&self, delivery: i64) -> Result<Option<DeadLetterDetail>, JournalError> {
        let Some(stored) = self.dead_message(delivery).await? else { return Ok(None) };
        Ok(stored.dead_letter().map(|(letter, dead, event)| DeadLetterDetail {
            letter,
            errors: dead.errors,
            content_type: event.content_type,
            data: event.data,
        }))
    }

    async fn replay_dead(&self, selector: DeadSelector) -> Result<u64, JournalError> {
        let mut replayed = 0;
        for stored in self.select_dead(&selector).await? {
            let Some((_, dead, event)) = stored.dead_letter() else { continue };
            self.republish(&event, std::slice::from_ref(&dead.plugin)).await?;
            self.dead.delete_message(stored.sequence).await.map_err(unavailable)?;
            replayed += 1;
        }
        Ok(replayed)
    }

    async fn purge_dead(&self, selector: DeadSelector) -> Result<u64, JournalError> {
        self.connected()?;
        let purge = match selector {
            DeadSelector::Ids(ids) => {
                let mut purged = 0;
                for id in ids {
                    let Ok(sequence) = u64::try_from(id) else { continue };
                    if self.dead.delete_message(sequence).await.unwrap_or(false) {
                        purged += 1;
                    }
                }
                return Ok(purged);
            }
            DeadSelector::Plugin(plugin) => {
                self.dead.purge().filter(subjects::dead_subject(&self.options.prefix, &plugin)).await
            }
            DeadSelector::All => self.dead.purge().await,
        };
        Ok(purge.map_err(unavailable)?.purged)
    }

    async fn replay(&self, since_ms: u64, route: Route<'_>) -> Result<u64, JournalError> {
        let (mut seen, mut replayed) = (HashSet::new(), 0);
        let until = self.last_sequence(&self.events).await?;
        let mut from = consumer::DeliverPolicy::ByStartTime { start_time: datetime(since_ms) };
        loop {
            let all = format!("{}.>", self.options.prefix);
            let chunk = self.scan(&self.events, all, from, until, REPLAY_CHUNK).await?;
            for stored in &chunk {
                // Earlier replays' copies are not events of their own.
                if stored.headers.as_ref().is_some_and(|headers| headers.get(record::PLUGINS_HEADER).is_some()) {
                    continue;
                }
                let Some(event) = record::read_event(stored.headers.as_ref(), &stored.payload) else { continue };
                let plugins = route(&event.event_type);
                if plugins.is_empty() || !seen.insert((event.source.clone(), event.id.clone())) {
                    continue;
                }
                self.republish(&event, &plugins).await?;
                replayed += plugins.len() as u64;
            }
            match chunk.last() {
                Some(last) if chunk.len() == REPLAY_CHUNK && last.sequence < until => {
                    from = consumer::DeliverPolicy::ByStartSequence { start_sequence: last.sequence + 1 };
                }
                _ => return Ok(replayed),
            }
        }
    }

    async fn stats(&self) -> Result<Stats, JournalError> {
        self.connected()?;
        let events = self.events.get_info().await.map_err(unavailable)?.state.messages;
        let mut dead_by_plugin = BTreeMap::new();
        let mut subjects =
            self.dead.info_with_subjects(subjects::dead_subjects(&self.options.prefix)).await.map_err(unavailable)?;
        while let Some(entry) = subjects.next().await {
            let (subject, count) = entry.map_err(unavailable)?;
            dead_by_plugin.insert(subjects::dead_plugin(&self.options.prefix, &subject), count as u64);
        }
        let (mut pending, mut running) = (0, 0);
        for (waiting, leased) in self.backlogs().await?.into_values() {
            pending += waiting;
            running += leased;
        }
        Ok(Stats {
            events,
            pending,
            running,
            dead: dead_by_plugin.values().sum(),
            max_pending: self.options.max_pending,
            dead_by_plugin,
            ..Stats::default()
        })
    }

    async fn ping(&self) -> Result<(), JournalError> {
        self.connected()?;
        self.js.query_account().await.map_err(unavailable)?;
        if let Some(dedup) = &self.dedup {
            dedup.ping().await?;
        }
        Ok(())
    }

    async fn expire(&self) -> Result<Expired, JournalError> {
        // JetStream drops events past the stream's max age, and Redis keys expire by themselves.
        Ok(Expired::default())
    }
}

/// Opens the events stream, creating it when missing, and adds the subjects of `sources`
/// that an existing stream lacks (another host may serve other sources).
async fn open_events_stream(
    js: &jetstream::Context,
    options: &Options,
    sources: &[String],
) -> anyhow::Result<stream::Stream> {
    let wanted = subjects::stream_subjects(&options.prefix, sources.iter().map(String::as_str));
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: options.stream.clone(),
            subjects: wanted.clone(),
            retention: stream::RetentionPolicy::Limits,
            max_age: options.retention,
            duplicate_window: options.duplicate_window,
            num_replicas: options.replicas,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|err| anyhow::anyhow!("cannot open the JetStream stream {}: {err}", options.stream))?;
    let mut config = stream.info().await?.config.clone();
    if (config.num_replicas, config.duplicate_window, config.max_age)
        != (options.replicas, options.duplicate_window, options.retention)
    {
        tracing::warn!(
            stream = %options.stream,
            replicas = config.num_replicas,
            duplicate_window_s = config.duplicate_window.as_secs(),
            max_age_s = config.max_age.as_secs(),
            "the stream exists with other settings than configured; it keeps its own (change them with the nats CLI)"
        );
    }
    let missing: Vec<String> = wanted.into_iter().filter(|subject| !config.subjects.contains(subject)).collect();
    if !missing.is_empty() {
        tracing::info!(stream = %options.stream, subjects = ?missing, "adding subjects to the stream");
        config.subjects.extend(missing);
        js.update_stream(config)
            .await
            .map_err(|err| anyhow::anyhow!("cannot add subjects to {}: {err}", options.stream))?;
        stream = js.get_stream(&options.stream).await?;
    }
    Ok(stream)
}

/// Counts unfinished deliveries once a period, for backpressure, while the journal lives.
async fn count_backlog(journal: Weak<NatsJournal>) {
    let mut tick = tokio::time::interval(BACKLOG_PERIOD);
    loop {
        tick.tick().await;
        let Some(journal) = journal.upgrade() else { return };
        if let Ok(backlogs) = journal.backlogs().await {
            let total = backlogs.values().map(|(waiting, leased)| waiting + leased).sum();
            journal.backlog.store(total, Ordering::Relaxed);
        }
    }
}

/// The durable consumer's name of a plugin.
fn consumer_name(plugin: &str) -> String {
    format!("wasmhook-{}", subjects::token(plugin))
}

fn datetime(ms: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A NATS URL without its credentials, and the credentials: (user, password) or (token, None).
fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let (scheme, rest) = url.split_once("://").map_or(("nats", url), |(scheme, rest)| (scheme, rest));
    let Some((credentials, server)) = rest.rsplit_once('@') else { return (url.to_owned(), None) };
    let decode = |text: &str| percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned();
    let credentials = match credentials.split_once(':') {
        Some((user, password)) => (decode(user), Some(decode(password))),
        None => (decode(credentials), None),
    };
    (format!("{scheme}://{server}"), Some(credentials))
}

/// `url` without what may hold a secret: the user and password before `@`, and the query and
/// fragment (Redis reads a password from `?pass=`).
fn server_only(url: &str) -> String {
    let server = split_credentials(url).0;
    let end = server.find(['?', '#']).unwrap_or(server.len());
    server[..end].to_owned()
}

fn unavailable(err: impl std::fmt::Display) -> JournalError {
    JournalError::Unavailable(format!("NATS: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_the_url() {
        let user = Some(("user".to_owned(), Some("p@ss:w".to_owned())));
        assert_eq!(split_credentials("nats://user:p%40ss%3Aw@n.example:4222"), ("nats://n.example:4222".into(), user));
        let token = Some(("s3cret".to_owned(), None));
        assert_eq!(split_credentials("tls://s3cret@n.example"), ("tls://n.example".into(), token));
        assert_eq!(split_credentials("nats://127.0.0.1:4222"), ("nats://127.0.0.1:4222".into(), None));
    }

    #[test]
    fn credentials_never_reach_debug_output() {
        let options = Options {
            url: "nats://user:secret@nats.example:4222".into(),
            stream: "S".into(),
            prefix: "p".into(),
            replicas: 1,
            duplicate_window: Duration::ZERO,
            retention: Duration::ZERO,
            max_pending: 1,
            redis_url: Some("redis://:hunter2@redis.example".into()),
        };
        let shown = format!("{options:?}");
        assert!(
            shown.contains("nats.example:4222") && !shown.contains("secret") && !shown.contains("hunter2"),
            "{shown}"
        );
        let in_query = Options { redis_url: Some("redis+unix:///run/redis.sock?db=1&pass=hunter2".into()), ..options };
        let shown = format!("{in_query:?}");
        assert!(shown.contains("/run/redis.sock") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn consumer_names_are_valid_for_any_plugin_name() {
        assert_eq!(consumer_name("github-push"), "wasmhook-github-push");
        assert!(!consumer_name("a.b c").contains(['.', ' ', '*', '>']));
    }
}
