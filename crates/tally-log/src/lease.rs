//! Leases: which node does a job that one node at a time may do, cluster-wide. Today that is
//! the batch run ([`BATCH`]): the node that takes the lease publishes the cut marker and runs;
//! every other node answers `409` to a run request while it is held, and computes its own view
//! to the marker once it follows it (`Trigger::Log`).
//!
//! A lease is a key in the JetStream key-value bucket `<stream>_leases`, whose entries expire
//! `cluster.lease_ttl` after their last write (the bucket's `max_age`, enforced by the NATS
//! server's clock alone). Taking it is a create (refused while the key exists); the holder
//! renews it every third of the TTL with a compare-and-set on the revision it wrote; letting go
//! deletes it, expecting that revision. A holder that dies stops renewing, the key expires, and
//! another node's create succeeds: within one TTL, with no clock compared across machines.
//! A holder that cannot renew for a whole TTL, or finds another revision, counts the lease as
//! lost and does not delete it when done. A run whose lease was lost goes on: each cut is a
//! marker every node applies in log order, so two runs at once cost work, not exactness.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{kv, stream};

use crate::{metrics, unavailable, Error, Log, Result};

/// The batch runner's lease: one batch run at a time in the cluster.
pub const BATCH: &str = "batch";

/// Every lease tally takes (shown in `/v1/admin/status`).
pub const LEASES: &[&str] = &[BATCH];

/// Who holds a lease, as the bucket says now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseInfo {
    pub name: String,
    /// The holder's `cluster.node_id`.
    pub holder: String,
    /// What the holder does with it (the batch lease: its run's id).
    pub purpose: String,
    /// When the holder last renewed it (RFC 3339, the NATS server's clock).
    pub renewed_at: String,
}

/// Why a lease was not taken.
#[derive(Debug)]
pub enum Refused {
    /// Another node holds it.
    Held(LeaseInfo),
    /// NATS cannot say now.
    Unavailable(Error),
}

/// A lease this node holds. Renewed in the background until dropped; dropping lets it go.
pub struct Lease {
    name: &'static str,
    store: kv::Store,
    revision: Arc<AtomicU64>,
    lost: Arc<AtomicBool>,
    renewal: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("revision", &self.revision.load(Ordering::SeqCst))
            .finish()
    }
}

impl Lease {
    /// Whether this node may have lost the lease: it found another revision, or could not
    /// renew it for a whole TTL (another node may hold it now). Then dropping it deletes
    /// nothing.
    fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        ::metrics::gauge!(metrics::LEASE_HELD, "lease" => self.name).set(0.0);
        if self.lost() {
            return;
        }
        let (store, name) = (self.store.clone(), self.name);
        let revision = self.revision.load(Ordering::SeqCst);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // Expecting our revision: a lease another node took since is left alone. If
                // this fails, the key expires within one TTL.
                if let Err(e) = store.delete_expect_revision(name, Some(revision)).await {
                    tracing::debug!(lease = name, error = %e, "could not let the lease go; it expires");
                }
            });
        }
    }
}

fn refused(e: impl std::fmt::Display) -> Refused {
    Refused::Unavailable(unavailable(e))
}

fn value_of(node: &str, purpose: &str) -> bytes::Bytes {
    bytes::Bytes::from(format!("{node}\n{purpose}"))
}

fn info_of(entry: &kv::Entry) -> Option<LeaseInfo> {
    if entry.operation != kv::Operation::Put {
        return None;
    }
    let text = String::from_utf8_lossy(&entry.value);
    let (holder, purpose) = text.split_once('\n').unwrap_or((&text, ""));
    Some(LeaseInfo {
        name: entry.key.clone(),
        holder: holder.to_string(),
        purpose: purpose.to_string(),
        renewed_at: tally_core::format_rfc3339(
            (entry.created.unix_timestamp_nanos() / 1_000_000) as i64,
        ),
    })
}

impl Log {
    /// The leases bucket, created when missing (its `max_age` is the TTL of whoever created
    /// it: every node of a cluster should have the same `cluster.lease_ttl`).
    async fn lease_bucket(&self) -> Result<kv::Store> {
        if let Some(store) = tally_core::sync::lock(&self.leases).clone() {
            return Ok(store);
        }
        if !self.connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let bucket = format!("{}_leases", self.cfg.stream);
        let store = match self.js.get_key_value(&bucket).await {
            Ok(store) => store,
            Err(_) => {
                // The bucket's stream as `create_key_value` would make it: that call first asks
                // for the account's limits, whose reply async-nats 0.46 cannot parse from the
                // 2.9 servers Debian ships, so the stream is created directly.
                let config = stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some("tally's leases: one holder per cluster-wide job".into()),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    max_age: self.cfg.lease_ttl,
                    storage: stream::StorageType::File,
                    num_replicas: self.cfg.replicas.max(1),
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    ..Default::default()
                };
                // Another node may create it in between: then this finds it.
                self.js
                    .get_or_create_stream(config)
                    .await
                    .map_err(|e| unavailable(format!("cannot create the bucket {bucket}: {e}")))?;
                self.js.get_key_value(&bucket).await.map_err(unavailable)?
            }
        };
        *tally_core::sync::lock(&self.leases) = Some(store.clone());
        Ok(store)
    }

    /// Takes lease `name` for `purpose` (shown to others), or says who holds it. The caller
    /// holds no lease of this name: one held under this node's own id is stale (a release still
    /// in flight, or this node before a crash) and is taken over by compare-and-set.
    pub async fn try_lease(&self, name: &'static str, purpose: &str) -> Result<Lease, Refused> {
        let store = self.lease_bucket().await.map_err(Refused::Unavailable)?;
        let value = value_of(&self.cfg.node_id, purpose);
        // Twice: the holder may let go between our create and our read.
        for _ in 0..2 {
            match store.create(name, value.clone()).await {
                Ok(revision) => return Ok(self.hold(name, store, value, revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let Some(entry) = store.entry(name).await.map_err(refused)? else {
                        continue;
                    };
                    let Some(info) = info_of(&entry) else {
                        continue;
                    };
                    if info.holder != self.cfg.node_id {
                        return Err(Refused::Held(info));
                    }
                    match store.update(name, value.clone(), entry.revision).await {
                        Ok(revision) => return Ok(self.hold(name, store, value, revision)),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(refused(e)),
                    }
                }
                Err(e) => return Err(refused(e)),
            }
        }
        Err(Refused::Unavailable(Error::Unavailable(format!(
            "the lease {name} changed hands while it was being taken"
        ))))
    }

    fn hold(&self, name: &'static str, store: kv::Store, value: bytes::Bytes, rev: u64) -> Lease {
        let revision = Arc::new(AtomicU64::new(rev));
        let lost = Arc::new(AtomicBool::new(false));
        let ttl = self.cfg.lease_ttl;
        ::metrics::gauge!(metrics::LEASE_HELD, "lease" => name).set(1.0);
        tracing::info!(lease = name, revision = rev, "lease taken");
        let renewal = tokio::spawn({
            let (store, revision, lost) = (store.clone(), revision.clone(), lost.clone());
            async move {
                let mut renewed = Instant::now();
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let attempt = Instant::now();
                    let rev = revision.load(Ordering::SeqCst);
                    let result =
                        tokio::time::timeout(ttl / 3, store.update(name, value.clone(), rev)).await;
                    match result {
                        Ok(Ok(new)) => {
                            revision.store(new, Ordering::SeqCst);
                            renewed = attempt;
                        }
                        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            tracing::error!(
                                lease = name,
                                "lease lost: it expired or another node holds it"
                            );
                            break;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(lease = name, error = %e, "lease renewal failed; retrying")
                        }
                        Err(_) => tracing::warn!(lease = name, "lease renewal timed out; retrying"),
                    }
                    if renewed.elapsed() >= ttl {
                        tracing::error!(
                            lease = name,
                            "lease lost: not renewed for a whole lease_ttl"
                        );
                        break;
                    }
                }
                lost.store(true, Ordering::SeqCst);
                ::metrics::gauge!(metrics::LEASE_HELD, "lease" => name).set(0.0);
            }
        });
        Lease {
            name,
            store,
            revision,
            lost,
            renewal,
        }
    }

    /// Who holds each of tally's leases now (within a second, else unavailable).
    pub async fn lease_holders(&self) -> Result<Vec<LeaseInfo>> {
        let ask = async {
            let store = self.lease_bucket().await?;
            let mut out = Vec::new();
            for name in LEASES {
                if let Some(info) = store
                    .entry(*name)
                    .await
                    .map_err(unavailable)?
                    .as_ref()
                    .and_then(info_of)
                {
                    out.push(info);
                }
            }
            Ok(out)
        };
        tokio::time::timeout(Duration::from_secs(1), ask)
            .await
            .unwrap_or_else(|_| Err(unavailable("no answer within 1 s")))
    }
}
