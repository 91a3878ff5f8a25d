//! Cluster mode's log: the events and the epoch cuts on a NATS JetStream stream.
//!
//! Any node publishes a request's events as one message (all-or-nothing) with a
//! `Nats-Msg-Id`, so a publish retried inside the stream's duplicate window is stored once, and
//! answers `202` once JetStream acknowledged it. A batch run publishes a *cut marker*; its
//! position is the run's cutoff, seen at the same place by every node.
//!
//! **`seq` is the log position.** The `i`-th event of the message at stream sequence `n` has
//! `seq = n << SEQ_SHIFT | i` ([`seq_of`]); a marker at `n` cuts at `C = n << SEQ_SHIFT`. So a
//! `seq` is unique, increases in log order and is never reused, like the single node's, and
//! every node derives the same one from the log alone. `seq`s have gaps; nothing in the master
//! dataset or the speed layer needs them dense.
//!
//! **Each node follows the log into its own master dataset** ([`Follower`]): it appends every
//! message, with the `seq`s above, to its local WAL in log order, and cuts its epochs at the
//! markers. From there the single node's machinery (sealer, speed applier, batch runner) runs
//! unchanged. A node restarted, or cut off and reconnected, resumes after the last message its
//! WAL holds; a message delivered again is acknowledged without being written twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tally_core::{Event, Seq};
use tally_master::Master;
use thiserror::Error;
use tokio::sync::watch;

mod lease;
pub mod metrics;

pub use lease::{Lease, LeaseInfo, Refused, BATCH, LEASES};

/// Bits of a `seq` that number the events within one message: a message holds at most
/// `2^SEQ_SHIFT` events (`ingest.max_batch_events` is checked against it at start-up).
pub const SEQ_SHIFT: u32 = 17;
/// The most events one log message (one request) may hold.
pub const MAX_MESSAGE_EVENTS: usize = 1 << SEQ_SHIFT;

/// The `seq` of the `index`-th event of the message at stream sequence `stream_seq`.
pub fn seq_of(stream_seq: u64, index: u64) -> Seq {
    Seq(stream_seq << SEQ_SHIFT | index)
}

/// The stream sequence of the message that holds `seq` (or of the marker that cut at it).
pub fn stream_seq_of(seq: Seq) -> u64 {
    seq.0 >> SEQ_SHIFT
}

/// What marks a data directory as a copy of one stream (`data_dir/log_stream`).
const LOG_MARK_FILE: &str = "log_stream";

#[derive(Debug, Error)]
pub enum Error {
    /// NATS or the stream cannot be reached or did not answer in time: retry later.
    #[error("the log (NATS JetStream) is unavailable: {0}")]
    Unavailable(String),
    /// The data directory does not belong to this stream, or the log no longer holds what this
    /// node has not read: a person must decide (start with a fresh data_dir).
    #[error("{0}")]
    Mismatch(String),
    /// One request's events are more than one NATS message may hold (the server's
    /// `max_payload`, 1 MiB unless configured): the client must split them.
    #[error("{bytes} bytes of events are more than the log's largest message ({max} bytes)")]
    TooLarge { bytes: usize, max: usize },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> tally_core::error::ErrorKind {
        use tally_core::error::ErrorKind;
        match self {
            Error::Unavailable(_) | Error::Io { .. } => ErrorKind::Transient,
            Error::Mismatch(_) => ErrorKind::Corrupt,
            Error::TooLarge { .. } => ErrorKind::Invalid,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `queue` section of the configuration.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `nats://host:port[,nats://host2:port…]`.
    pub url: String,
    /// The stream's name; its subjects are `<stream>.events` and `<stream>.cut`.
    pub stream: String,
    /// Copies JetStream keeps of each message (1; 3 in production).
    pub replicas: usize,
    /// Messages older than this are dropped by JetStream (retention by age).
    pub max_age: Duration,
    /// The stream keeps at most this many bytes (oldest dropped first); -1: no limit.
    pub max_bytes: i64,
    /// A publish not acknowledged within this long fails (the client answers 503).
    pub publish_timeout: Duration,
    /// This node's name in `/v1/admin/status` (`cluster.node_id`, or its data_dir's id).
    pub node_id: String,
    /// A lease not renewed for this long expires (`cluster.lease_ttl`).
    pub lease_ttl: Duration,
}

/// A connection to the log. Cheap to clone.
#[derive(Clone)]
pub struct Log {
    js: jetstream::Context,
    client: async_nats::Client,
    cfg: Arc<LogConfig>,
    /// The last stream sequence this node's follower has written to its master dataset.
    followed: watch::Receiver<u64>,
    followed_tx: Arc<watch::Sender<u64>>,
    /// The last epoch cut this node's follower has written (a marker's cutoff).
    cuts_tx: Arc<watch::Sender<Seq>>,
    /// The last deletion requests this node's follower applied: (stream sequence, files
    /// rewritten, events dropped).
    forgotten: Arc<Mutex<std::collections::VecDeque<(u64, usize, u64)>>>,
    /// The leases bucket, once opened.
    leases: Arc<Mutex<Option<async_nats::jetstream::kv::Store>>>,
    /// Why the follower stopped for good, if it did.
    failure: Arc<Mutex<Option<String>>>,
    /// Times the client (re)connected: the follower starts over after a reconnect instead of
    /// waiting for its consumer's missed heartbeats (30 s).
    connects: Arc<AtomicU64>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("url", &self.cfg.url)
            .field("stream", &self.cfg.stream)
            .finish()
    }
}

impl Log {
    /// Connects to NATS, waiting up to `publish_timeout` for the first connection. When NATS
    /// cannot be reached yet, the client keeps trying in the background: publishing fails
    /// (503) until it connects, and nothing else waits for it.
    pub async fn connect(cfg: LogConfig) -> Result<Log> {
        let connects = Arc::new(AtomicU64::new(0));
        let counter = connects.clone();
        let client = async_nats::ConnectOptions::new()
            .name("tally")
            .event_callback(move |event| {
                let counter = counter.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(cfg.url.as_str())
            .await
            .map_err(unavailable)?;
        // Start-up waits a little for the first connection, so that a node which says it
        // listens also takes events; NATS down at start is not fatal (it connects later).
        let waited = tokio::time::timeout(cfg.publish_timeout, async {
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(url = %cfg.url, "NATS is not reachable yet; ingest answers 503 until it is");
        }
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.publish_timeout);
        let (tx, rx) = watch::channel(0);
        Ok(Log {
            js,
            client,
            cfg: Arc::new(cfg),
            followed: rx,
            followed_tx: Arc::new(tx),
            cuts_tx: Arc::new(watch::channel(Seq::ZERO).0),
            leases: Arc::new(Mutex::new(None)),
            forgotten: Arc::new(Mutex::new(std::collections::VecDeque::new())),
            failure: Arc::new(Mutex::new(None)),
            connects,
        })
    }

    fn subject(&self, kind: &str) -> String {
        format!("{}.{kind}", self.cfg.stream)
    }

    /// Creates the stream when missing; returns its creation time (identifies it: a stream
    /// deleted and created again starts its sequence over).
    async fn ensure_stream(&self) -> Result<stream::Stream> {
        let config = stream::Config {
            name: self.cfg.stream.clone(),
            subjects: self.subjects(),
            num_replicas: self.cfg.replicas.max(1),
            max_age: self.cfg.max_age,
            max_bytes: self.cfg.max_bytes,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let mut stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(unavailable)?;
        // A stream created by an earlier tally lacks the subjects added since.
        let mut have = stream.cached_info().config.clone();
        let missing: Vec<String> = (self.subjects().into_iter())
            .filter(|s| !have.subjects.contains(s))
            .collect();
        if !missing.is_empty() {
            have.subjects.extend(missing);
            self.js.update_stream(have).await.map_err(unavailable)?;
            stream = self
                .js
                .get_stream(&self.cfg.stream)
                .await
                .map_err(unavailable)?;
        }
        Ok(stream)
    }

    /// The stream's subjects: events, cut markers, deletion requests.
    fn subjects(&self) -> Vec<String> {
        ["events", "cut", "forget"]
            .iter()
            .map(|k| self.subject(k))
            .collect()
    }

    /// Publishes a deletion request (`POST /v1/admin/forget`) for every node to apply at its
    /// place in the log; resolves with its stream sequence.
    pub async fn publish_forget(&self, forget: &tally_master::Forget) -> Result<u64> {
        let Some(line) = forget.encode() else {
            return Err(Error::Mismatch(format!(
                "{forget:?} is not sent through the log"
            )));
        };
        self.publish_message(self.subject("forget"), line.into_bytes(), message_id())
            .await
    }

    /// What this node's follower dropped for the deletion request at stream sequence `n`
    /// (master files rewritten, events dropped), once it has applied it (of the last few).
    pub fn forgotten(&self, n: u64) -> Option<(usize, u64)> {
        let done = tally_core::sync::lock(&self.forgotten);
        done.iter().find(|d| d.0 == n).map(|d| (d.1, d.2))
    }

    /// Publishes a request's events as one message; resolves with its stream sequence once
    /// JetStream has stored it. `events` must not be empty.
    pub async fn publish(&self, events: &[Event]) -> Result<u64> {
        self.publish_events_with_id(events, message_id()).await
    }

    /// [`Log::publish`] with a `Nats-Msg-Id` of the caller's: a second publish with the same
    /// id within the stream's duplicate window (2 min) is stored once.
    pub async fn publish_events_with_id(&self, events: &[Event], id: String) -> Result<u64> {
        // Before the first connection the server's max_payload is not known (0).
        if !self.connected() || self.max_message_bytes() == 0 {
            ::metrics::counter!(metrics::LOG_PUBLISH_ERRORS).increment(1);
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let payload = tally_master::encode_events(events);
        let max = self.max_message_bytes();
        if payload.len() > max {
            return Err(Error::TooLarge {
                bytes: payload.len(),
                max,
            });
        }
        self.publish_message(self.subject("events"), payload, id)
            .await
    }

    /// The largest encoded batch of events one message may carry: the server's `max_payload`
    /// less room for the headers.
    pub fn max_message_bytes(&self) -> usize {
        self.client.server_info().max_payload.saturating_sub(1024)
    }

    /// Publishes a cut marker; resolves with its stream sequence.
    pub async fn publish_cut(&self) -> Result<u64> {
        self.publish_message(self.subject("cut"), Vec::new(), message_id())
            .await
    }

    /// `stream@created`: names the stream, and tells it from one deleted and created again
    /// under the same name (whose sequence starts over).
    pub async fn stream_identity(&self) -> Result<String> {
        let mut stream = self.ensure_stream().await?;
        let info = stream.info().await.map_err(unavailable)?;
        Ok(format!(
            "{}@{}",
            info.config.name,
            info.created.unix_timestamp_nanos()
        ))
    }

    async fn publish_message(&self, subject: String, payload: Vec<u8>, id: String) -> Result<u64> {
        // Disconnected, the client would queue the message and send it after reconnecting,
        // long after this request was answered 503: send nothing instead.
        if !self.connected() {
            ::metrics::counter!(metrics::LOG_PUBLISH_ERRORS).increment(1);
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let t = std::time::Instant::now();
        let deadline = tally_core::now_ms() + self.cfg.publish_timeout.as_millis() as i64;
        let give_up = t + self.cfg.publish_timeout + 2 * CLOCK_SKEW;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(DEADLINE_HEADER, deadline.to_string().as_str());
        // Cheap to clone for a retry.
        let payload = bytes::Bytes::from(payload);
        // Every attempt sends the same id: JetStream stores the message once and acknowledges a
        // copy sent again with the first one's sequence (`duplicate`).
        let send = |wait: Duration| {
            let message = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(&id);
            let subject = subject.clone();
            async move {
                tokio::time::timeout(wait, async {
                    self.js
                        .send_publish(subject, message)
                        .await
                        .map_err(unavailable)?
                        .await
                        .map_err(unavailable)
                })
                .await
                .unwrap_or_else(|_| Err(unavailable("no acknowledgement in time")))
            }
        };
        let ack = loop {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            match send(left).await {
                Ok(ack) => break ack,
                Err(e) if std::time::Instant::now() >= give_up || !self.connected() => {
                    // Past `deadline + 2 × CLOCK_SKEW`, a copy sent now is stored void unless
                    // the first one was stored: then JetStream answers with the first one's
                    // sequence, whose stored time decides below. Either way the answer is
                    // exact; only with NATS out of reach does it stay 503 (a copy the client
                    // still holds lands void).
                    tokio::time::sleep_until(give_up.into()).await;
                    if self.connected() {
                        if let Ok(ack) = send(Duration::from_secs(1)).await {
                            break ack;
                        }
                    }
                    ::metrics::counter!(metrics::LOG_PUBLISH_ERRORS).increment(1);
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed; sending it again");
                    // The stream may not exist yet (a fresh NATS): create it, then retry.
                    let _ = self.ensure_stream().await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        // Acknowledged late, or as a copy of an earlier message with this id: the stored
        // message's own deadline and stored time decide, as every follower decides.
        if ack.duplicate || tally_core::now_ms() > deadline {
            let stream = self.ensure_stream().await?;
            let msg = stream
                .get_raw_message(ack.sequence)
                .await
                .map_err(unavailable)?;
            if is_void(deadline_of(Some(&msg.headers)), msg.time) {
                ::metrics::counter!(metrics::LOG_PUBLISH_ERRORS).increment(1);
                return Err(Error::Unavailable(format!(
                    "NATS stored message {} after its deadline, so no node counts it (a copy \
                     with the same id is refused for the stream's 2-minute duplicate window)",
                    ack.sequence
                )));
            }
        }
        ::metrics::histogram!(metrics::LOG_PUBLISH_SECONDS).record(t.elapsed().as_secs_f64());
        Ok(ack.sequence)
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// The last stream sequence this node's follower has written to its master dataset.
    pub fn followed(&self) -> u64 {
        *self.followed.borrow()
    }

    /// The last epoch cut this node's follower has written (durably), as it moves: a node
    /// computes its own view to every cut another node's run published.
    pub fn cuts(&self) -> watch::Receiver<Seq> {
        self.cuts_tx.subscribe()
    }

    /// Why this node stopped following the log, when it did (then `/readyz` fails).
    pub fn failure(&self) -> Option<String> {
        tally_core::sync::lock(&self.failure).clone()
    }

    /// Whether NATS is connected now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The stream's last sequence, as JetStream says now (within a second, else unavailable).
    pub async fn last_seq(&self) -> Result<u64> {
        if !self.connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let ask = async {
            let mut s = self
                .js
                .get_stream(&self.cfg.stream)
                .await
                .map_err(unavailable)?;
            Ok(s.info().await.map_err(unavailable)?.state.last_sequence)
        };
        tokio::time::timeout(Duration::from_secs(1), ask)
            .await
            .unwrap_or_else(|_| Err(unavailable("no answer within 1 s")))
    }

    /// Waits until this node's follower has written everything up to stream sequence `n`.
    pub async fn wait_followed(&self, n: u64, timeout: Duration) -> Result<()> {
        let mut rx = self.followed.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&f| f >= n)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "this node has not read the log up to message {n} within {timeout:?}"
            ))),
        }
    }
}

/// The header holding a message's deadline (ms since the epoch, the publishing node's clock).
const DEADLINE_HEADER: &str = "Tally-Deadline-Ms";

/// How far the clocks of tally nodes and NATS servers may differ (NTP keeps them within a few
/// milliseconds).
pub const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// A message JetStream stored after its deadline (plus [`CLOCK_SKEW`]) is void: its publisher
/// answered (or will answer) `503`, so no node counts it. Every node decides this from the
/// message alone, so all agree; the publisher applies the same rule to a late acknowledgement.
fn is_void(deadline_ms: Option<i64>, stored: time::OffsetDateTime) -> bool {
    let stored_ms = (stored.unix_timestamp_nanos() / 1_000_000) as i64;
    deadline_ms.is_some_and(|d| stored_ms > d + CLOCK_SKEW.as_millis() as i64)
}

fn deadline_of(headers: Option<&async_nats::HeaderMap>) -> Option<i64> {
    headers?.get(DEADLINE_HEADER)?.as_str().parse().ok()
}

/// A random `Nats-Msg-Id`: 128 bits, hex.
fn message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The data directory's mark: which stream it copies (`data_dir/log_stream`, one line:
/// [`Log::stream_identity`]).
fn load_mark(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(LOG_MARK_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.lines().next() {
            Some(line) if line.contains('@') => Ok(Some(line.to_string())),
            _ => Err(Error::Mismatch(format!(
                "{} is not a log mark; move it away to follow the log from the start",
                path.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// Writes `text` to `dir/name` durably: a temporary file, fsync, rename, fsync of the directory.
pub fn write_durably(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

/// A failed write of the log into this node's master dataset: corruption (or the log's order
/// broken) stops following for a person to decide; anything else is retried.
fn write_error(e: tally_master::Error) -> Error {
    match e.kind() {
        tally_core::error::ErrorKind::Corrupt => Error::Mismatch(e.to_string()),
        _ => unavailable(e),
    }
}

/// Follows the log into this node's master dataset: every message, in log order, appended with
/// the `seq`s the log gives, every marker a cut. Runs until the process ends; reconnects by
/// itself.
pub struct Follower {
    log: Log,
    master: Master,
    data_dir: PathBuf,
}

/// Appends and cuts handed to the WAL writer and not yet durable, at most.
const IN_FLIGHT: usize = 4096;

impl Follower {
    /// Records that message `n` (a cut at `cut`, if it is a marker) is written, or fails.
    fn done(&self, (n, cut, result): (u64, Option<Seq>, tally_master::Result<()>)) -> Result<()> {
        result.map_err(write_error)?;
        self.log.followed_tx.send_replace(n);
        if let Some(cut) = cut {
            self.log.cuts_tx.send_replace(cut);
        }
        ::metrics::gauge!(metrics::LOG_FOLLOWED_SEQ).set(n as f64);
        Ok(())
    }

    /// Applies the deletion request of message `n` to the events before it. Applied again
    /// after a restart (the message is read again), it drops nothing more.
    async fn forget(&self, n: u64, payload: &[u8]) -> Result<()> {
        let forget = std::str::from_utf8(payload)
            .ok()
            .and_then(tally_master::Forget::decode)
            .ok_or_else(|| {
                Error::Mismatch(format!(
                    "log message {n} is not a deletion request tally wrote"
                ))
            })?;
        let (files, events) = self
            .master
            .forget_through(&forget, seq_of(n, 0))
            .await
            .map_err(write_error)?;
        let mut done = tally_core::sync::lock(&self.log.forgotten);
        if done.len() >= 16 {
            done.pop_front();
        }
        done.push_back((n, files, events));
        Ok(())
    }

    pub fn new(log: Log, master: Master, data_dir: PathBuf) -> Follower {
        Follower {
            log,
            master,
            data_dir,
        }
    }

    /// The stream sequence after which this node's master dataset holds everything.
    fn position(&self) -> u64 {
        let acked = stream_seq_of(self.master.acked_seq());
        let cut = self
            .master
            .epochs()
            .last()
            .map_or(0, |&s| stream_seq_of(Seq(s.0.saturating_sub(1))));
        acked.max(cut)
    }

    /// Checks that the data directory copies this stream (marks a fresh one).
    async fn check_mark(&self) -> Result<()> {
        let here = self.log.stream_identity().await?;
        match load_mark(&self.data_dir)? {
            Some(mark) if mark == here => Ok(()),
            Some(mark) => Err(Error::Mismatch(format!(
                "{} follows the stream {mark} but the log now is {here}: the stream was deleted \
                 or replaced; start this node with a fresh data_dir",
                self.data_dir.display(),
            ))),
            None if self.master.acked_seq() > Seq::ZERO => Err(Error::Mismatch(format!(
                "{} holds events of a single-node tally; cluster mode needs a fresh data_dir \
                 (upload them with `tally master upload` instead)",
                self.data_dir.display()
            ))),
            None => write_durably(&self.data_dir, LOG_MARK_FILE, &format!("{here}\n")),
        }
    }

    /// Runs until the process ends.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.follow().await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e @ Error::Mismatch(_)) => {
                    tracing::error!(error = %e, "stopped following the log");
                    *tally_core::sync::lock(&self.log.failure) = Some(e.to_string());
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "following the log failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One connection's worth of following; returns on any error (or when the messages end).
    async fn follow(&self) -> Result<()> {
        let connects = self.log.connects.load(Ordering::SeqCst);
        // Whatever the last attempt left in flight is written (or refused) before this one asks
        // where to resume; a failed write left the writer refusing log appends until now.
        self.master.resume_log().await.map_err(unavailable)?;
        self.check_mark().await?;
        let stream = self.log.ensure_stream().await?;
        let mut next = self.position() + 1;
        self.log.followed_tx.send_replace(next - 1);
        if let Some(&start) = self.master.epochs().last() {
            let cut = Seq(start.0.saturating_sub(1));
            self.log
                .cuts_tx
                .send_if_modified(|c| std::mem::replace(c, cut) != cut);
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        type Op = std::pin::Pin<
            Box<
                dyn std::future::Future<Output = (u64, Option<Seq>, tally_master::Result<()>)>
                    + Send,
            >,
        >;
        let mut in_flight: FuturesOrdered<Op> = FuturesOrdered::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {
                    if self.log.connects.load(Ordering::SeqCst) != connects {
                        // Appends still in flight are queued to the writer and land; the next
                        // consumer may deliver them again, which the writer then ignores.
                        return Err(Error::Unavailable("reconnected to NATS".into()));
                    }
                }
                Some(done) = in_flight.next(), if !in_flight.is_empty() => self.done(done)?,
                msg = messages.next(), if in_flight.len() < IN_FLIGHT => {
                    let Some(msg) = msg else { return Ok(()) };
                    let msg = msg.map_err(unavailable)?;
                    let info = msg.info().map_err(unavailable)?;
                    let (n, stored_at) = (info.stream_sequence, info.published);
                    // The log's end as this consumer sees it: the lag gauge needs no status read.
                    ::metrics::gauge!(metrics::LOG_LAST_SEQ).set((n + info.pending) as f64);
                    if n < next {
                        continue;
                    }
                    if n > next {
                        return Err(Error::Mismatch(format!(
                            "the log no longer holds messages {next}..{}, which this node has \
                             not read (retention by age or size dropped them): copy the \
                             data_dir of a stopped node that has them, give the copy its own \
                             cluster.node_id, and raise queue.max_age or max_bytes",
                            n - 1
                        )));
                    }
                    next = n + 1;
                    if is_void(deadline_of(msg.headers.as_ref()), stored_at) {
                        tracing::warn!(stream_seq = n, "skipping a message stored after its deadline (its publisher answered 503)");
                        ::metrics::counter!(metrics::LOG_VOID_MESSAGES).increment(1);
                        in_flight.push_back(Box::pin(std::future::ready((n, None, Ok(())))));
                        continue;
                    }
                    if msg.subject.as_str().ends_with(".forget") {
                        // Applied to the events before it, all of which must be written first.
                        while let Some(done) = in_flight.next().await {
                            self.done(done)?;
                        }
                        self.forget(n, &msg.payload).await?;
                        self.done((n, None, Ok(())))?;
                        continue;
                    }
                    let fut: Op = if msg.subject.as_str().ends_with(".cut") {
                            let cut = seq_of(n, 0);
                            let f = self.master.cut_epoch_at(cut);
                            Box::pin(async move { (n, Some(cut), f.await.map(drop)) })
                        } else {
                            let events = tally_master::decode_events(&msg.payload)
                                .filter(|e| e.len() <= MAX_MESSAGE_EVENTS)
                                .ok_or_else(|| {
                                    Error::Mismatch(format!(
                                        "log message {n} is not a batch of at most \
                                         {MAX_MESSAGE_EVENTS} events tally wrote"
                                    ))
                                })?;
                            let f = self.master.append_at(seq_of(n, 0), events);
                            Box::pin(async move { (n, None, f.await.map(drop)) })
                        };
                    in_flight.push_back(fut);
                }
            }
        }
    }
}

/// The batch runner's cut in cluster mode: a marker in the log, and a wait until this node has
/// followed the log up to it (then its WAL holds every event before the marker and its epochs
/// are cut at the marker).
pub struct LogCut {
    log: Log,
    /// How long to wait for this node to read up to its own marker.
    pub timeout: Duration,
}

impl LogCut {
    pub fn new(log: Log) -> LogCut {
        LogCut {
            log,
            timeout: Duration::from_secs(60),
        }
    }
}

impl tally_batch::EpochCut for LogCut {
    fn cut<'a>(
        &'a self,
        _master: &'a Master,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = tally_batch::Result<Seq>> + Send + 'a>>
    {
        Box::pin(async move {
            let log_err = |e: Error| tally_batch::Error::Log(e.to_string());
            let n = self.log.publish_cut().await.map_err(log_err)?;
            self.log
                .wait_followed(n, self.timeout)
                .await
                .map_err(log_err)?;
            Ok(seq_of(n, 0))
        })
    }

    /// One run at a time in the cluster: the run holds the batch lease until it ends.
    fn admit<'a>(
        &'a self,
        run_id: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tally_batch::Admission, tally_batch::RunError>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            match self.log.try_lease(BATCH, run_id).await {
                Ok(lease) => Ok(Box::new(lease) as tally_batch::Admission),
                Err(Refused::Held(info)) => Err(tally_batch::RunError::HeldElsewhere {
                    node: info.holder,
                    run_id: info.purpose,
                }),
                Err(Refused::Unavailable(e)) => {
                    Err(tally_batch::RunError::Unavailable(e.to_string()))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_of_later_messages_are_above_every_seq_of_earlier_ones_and_cuts_fall_between() {
        let last_of_first = seq_of(1, MAX_MESSAGE_EVENTS as u64 - 1);
        let cut = seq_of(2, 0);
        let first_of_third = seq_of(3, 0);
        assert!(seq_of(1, 0) < last_of_first);
        assert!(last_of_first < cut && cut < first_of_third);
        assert_eq!(stream_seq_of(last_of_first), 1);
        assert_eq!(stream_seq_of(cut), 2);
        assert_eq!(stream_seq_of(Seq(cut.0 + 1)), 2);
        assert!(seq_of(1, 0) > Seq::ZERO);
    }

    #[test]
    fn a_mark_round_trips_and_a_garbled_one_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_mark(dir.path()).unwrap(), None);
        write_durably(dir.path(), LOG_MARK_FILE, "s@123\n").unwrap();
        assert_eq!(load_mark(dir.path()).unwrap().as_deref(), Some("s@123"));
        std::fs::write(dir.path().join(LOG_MARK_FILE), "x").unwrap();
        assert!(matches!(load_mark(dir.path()), Err(Error::Mismatch(_))));
    }
}
