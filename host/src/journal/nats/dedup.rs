//! Acceptance dedup in Redis, for windows longer than JetStream's duplicate window is cheap
//! for: one key per event key ([`Event::key`](crate::event::Event::key): source, id and any
//! producer), set with `SET NX PX`.
//!
//! A key is first *claimed* for [`CLAIM`] only, then *confirmed* for the whole window once
//! the event is in the stream. A host that dies between the two leaves a claim that runs out
//! on its own, so the sender's retry is accepted; the stream's own duplicate window (longer
//! than a claim) keeps that retry from being stored twice if the first publish did land.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::journal::JournalError;

/// How long a key is held before the event it guards is known to be stored.
pub const CLAIM: Duration = Duration::from_secs(60);
/// The start of the value of a key whose event is being stored (a token follows).
const CLAIMED: &str = "claimed:";
/// The value of a key whose event is stored.
const ACCEPTED: &str = "accepted";

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and is now held by this request.
    Ours,
    /// Another request is storing an event with the same key right now, or died doing so less than
    /// [`CLAIM`] ago: not known to be stored yet, so the sender must come back.
    InFlight,
    /// The event is stored: a duplicate.
    Accepted,
}

/// How long one Redis command may take before the journal counts as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to the Redis that holds the dedup keys; it reconnects by itself.
#[derive(Clone)]
pub struct RedisDedup {
    connection: ConnectionManager,
    prefix: String,
}

impl RedisDedup {
    /// Connects to `url`; keys start with `{prefix}:dedup:`.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisDedup, String> {
        let client = redis::Client::open(url).map_err(|err| format!("the Redis URL is not valid: {err}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_max_delay(Duration::from_secs(5));
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|err| format!("cannot connect to Redis: {err}"))?;
        Ok(RedisDedup { connection, prefix: prefix.to_owned() })
    }

    /// Claims the event key `key` for [`CLAIM`], unless it is already held. The claim's token
    /// lets only its holder [`release`](Self::release) it.
    pub async fn claim(&self, key: &str) -> Result<(Claim, String), JournalError> {
        let token = format!("{CLAIMED}{}", uuid::Uuid::new_v4());
        // SET … NX GET sets the key only when absent and answers what it held (Redis 7).
        let held: Option<String> = redis::cmd("SET")
            .arg(self.key(key))
            .arg(&token)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(CLAIM))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(unreachable)?;
        let claim = match held {
            None => Claim::Ours,
            Some(held) if held.starts_with(CLAIMED) => Claim::InFlight,
            Some(_) => Claim::Accepted,
        };
        Ok((claim, token))
    }

    /// Holds `key` for the whole dedup window: its event is stored.
    pub async fn confirm(&self, key: &str, window: Duration) -> Result<(), JournalError> {
        redis::cmd("SET")
            .arg(self.key(key))
            .arg(ACCEPTED)
            .arg("PX")
            .arg(millis(window))
            .query_async::<()>(&mut self.connection.clone())
            .await
            .map_err(unreachable)
    }

    /// Lets go of the claim `token` whose event could not be stored, so the sender's retry is
    /// taken; a key held by anyone else (a later claim, a stored event) stays.
    pub async fn release(&self, key: &str, token: &str) -> Result<(), JournalError> {
        const IF_OURS: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
        redis::cmd("EVAL")
            .arg(IF_OURS)
            .arg(1)
            .arg(self.key(key))
            .arg(token)
            .query_async::<()>(&mut self.connection.clone())
            .await
            .map_err(unreachable)
    }

    /// Checks Redis answers.
    pub async fn ping(&self) -> Result<(), JournalError> {
        redis::cmd("PING").query_async::<()>(&mut self.connection.clone()).await.map_err(unreachable)
    }

    fn key(&self, key: &str) -> String {
        format!("{}:dedup:{key}", self.prefix)
    }
}

/// Redis refuses `PX 0`: at least one millisecond.
fn millis(duration: Duration) -> u64 {
    crate::event::millis(duration).max(1)
}

fn unreachable(err: redis::RedisError) -> JournalError {
    JournalError::Unavailable(format!("Redis: {err}"))
}
