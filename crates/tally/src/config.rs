//! Configuration: built-in defaults (`config/default.toml`, compiled in), then the file given
//! with `--config`, then `TALLY_<SECTION>_<KEY>` environment variables, highest last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};

/// The documented defaults; `config/default.toml` is the single source of them.
pub(crate) const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

const SECTIONS: &[&str] = &[
    "http", "storage", "ingest", "queue", "cluster", "redis", "speed", "batch", "uniques", "query",
    "auth", "log",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) http: HttpConfig,
    pub(crate) storage: StorageConfig,
    pub(crate) ingest: IngestConfig,
    pub(crate) queue: QueueConfig,
    pub(crate) cluster: ClusterConfig,
    pub(crate) redis: RedisConfig,
    pub(crate) speed: SpeedConfig,
    pub(crate) batch: BatchConfig,
    pub(crate) uniques: UniquesConfig,
    pub(crate) query: QueryConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    pub(crate) addr: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub(crate) request_timeout: Duration,
    pub(crate) max_concurrency: usize,
    /// CIDRs or addresses of reverse proxies whose `X-Forwarded-For` is believed.
    #[serde(deserialize_with = "string_list")]
    pub(crate) trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageConfig {
    pub(crate) data_dir: PathBuf,
    /// How often compaction looks for runs of small master files (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub(crate) compact_interval: Duration,
    pub(crate) compact_small_bytes: u64,
    pub(crate) compact_target_bytes: u64,
    pub(crate) compact_min_files: usize,
    /// `forever`, or how long events are kept in the master dataset (`400d`): compaction drops
    /// older ones.
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) retention: String,
}

impl StorageConfig {
    /// `storage.retention` as a duration; `None`: keep forever.
    pub(crate) fn retention(&self) -> anyhow::Result<Option<Duration>> {
        match self.retention.trim() {
            "forever" | "" => Ok(None),
            s => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => Ok(Some(d)),
                _ => bail!(
                    "storage.retention must be \"forever\" or a duration such as \"400d\", not {s:?}"
                ),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IngestConfig {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_batch_events: usize,
    #[serde(with = "humantime_serde")]
    pub(crate) max_future: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) seal_interval: Duration,
    pub(crate) seal_max_events: usize,
    pub(crate) fsync: bool,
}

/// Cluster mode's log (`queue.url` empty: the local WAL).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueueConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) url: String,
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) stream: String,
    pub(crate) replicas: usize,
    #[serde(with = "humantime_serde")]
    pub(crate) max_age: Duration,
    pub(crate) max_bytes: i64,
    #[serde(with = "humantime_serde")]
    pub(crate) publish_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) node_id: String,
    #[serde(with = "humantime_serde")]
    pub(crate) lease_ttl: Duration,
}

impl QueueConfig {
    /// The log's settings when cluster mode is on (`node_id` filled in by the caller).
    pub(crate) fn log(&self, cluster: &ClusterConfig) -> Option<tally_log::LogConfig> {
        (!self.url.trim().is_empty()).then(|| tally_log::LogConfig {
            url: self.url.trim().to_string(),
            stream: self.stream.clone(),
            replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            publish_timeout: self.publish_timeout,
            node_id: String::new(),
            lease_ttl: cluster.lease_ttl,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) url: String,
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) key_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpeedConfig {
    #[serde(with = "humantime_serde")]
    pub(crate) gc_grace: Duration,
    pub(crate) apply_batch_max: usize,
    pub(crate) tail_capacity: usize,
    pub(crate) fallback_views: usize,
    pub(crate) applier_nice: i32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) schedule: String,
    pub(crate) keep_versions: usize,
    pub(crate) max_retries: u32,
    pub(crate) partials: bool,
    #[serde(with = "humantime_serde")]
    pub(crate) retry_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UniquesConfig {
    pub(crate) precision: u8,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueryConfig {
    pub(crate) result_cache: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) admin_token: String,
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) read_token: String,
    /// Keys of `POST /api/v2/query` (a list, or one comma-separated string).
    #[serde(deserialize_with = "string_list")]
    pub(crate) api_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    pub(crate) format: LogFormat,
    #[serde(deserialize_with = "string_or_number")]
    pub(crate) level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Environment values are parsed as TOML-ish scalars (`TALLY_AUTH_ADMIN_TOKEN=1234` is a
/// number); string keys accept either.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::Text(s) => s,
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

/// A list of strings, or one string of comma-separated items (what an environment variable
/// such as `TALLY_HTTP_TRUSTED_PROXIES=10.0.0.0/8,127.0.0.1` gives).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Many(Vec<String>),
        One(String),
    }
    Ok(match List::deserialize(d)? {
        List::Many(v) => v,
        List::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

impl Config {
    /// Loads defaults, then `file`, then the environment.
    pub(crate) fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        Self::load_with_env(file, Env::prefixed("TALLY_"))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            fig = fig.merge(Toml::file(path));
        }
        // TALLY_STORAGE_DATA_DIR -> storage.data_dir: split at the first underscore only, and
        // only for known sections, so unrelated TALLY_* variables are not configuration.
        let env = env.filter_map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            let (section, rest) = key.split_once('_')?;
            SECTIONS
                .contains(&section)
                .then(|| format!("{section}.{rest}").into())
        });
        let cfg: Config = fig.merge(env).extract().context("invalid configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if !self.http.addr.ip().is_loopback() && self.auth.admin_token.is_empty() {
            bail!(
                "refusing to listen on non-loopback address {} without auth.admin_token \
                 (set TALLY_AUTH_ADMIN_TOKEN)",
                self.http.addr
            );
        }
        if !(4..=18).contains(&self.uniques.precision) {
            bail!(
                "uniques.precision must be between 4 and 18, not {}",
                self.uniques.precision
            );
        }
        if self.ingest.max_batch_events == 0 || self.ingest.max_body_bytes == 0 {
            bail!("ingest.max_batch_events and ingest.max_body_bytes must be positive");
        }
        if self.batch.keep_versions == 0 {
            bail!("batch.keep_versions must be at least 1");
        }
        if self.queue.log(&self.cluster).is_some() {
            let q = &self.queue;
            if !q.url.split(',').all(|u| u.trim().starts_with("nats://")) {
                bail!(
                    "queue.url must be nats://host:port[,nats://host:port…], not {:?}",
                    q.url
                );
            }
            let name_ok = !q.stream.is_empty()
                && q.stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                bail!(
                    "queue.stream must be letters, digits, '_' or '-', not {:?}",
                    q.stream
                );
            }
            if !(1..=5).contains(&q.replicas) {
                bail!("queue.replicas must be between 1 and 5, not {}", q.replicas);
            }
            if self.ingest.max_batch_events > tally_log::MAX_MESSAGE_EVENTS {
                bail!(
                    "with queue.url set, ingest.max_batch_events must be at most {} (one request \
                     is one log message), not {}",
                    tally_log::MAX_MESSAGE_EVENTS,
                    self.ingest.max_batch_events
                );
            }
            // The bucket's max_age: JetStream expires entries with a resolution of about a second.
            if self.cluster.lease_ttl < Duration::from_secs(1)
                || self.cluster.lease_ttl > Duration::from_secs(3600)
            {
                bail!(
                    "cluster.lease_ttl must be between 1s and 1h, not {:?}",
                    self.cluster.lease_ttl
                );
            }
            // A retry inside a request must stay within JetStream's 2-minute duplicate window.
            if q.publish_timeout.is_zero() || q.publish_timeout > Duration::from_secs(60) {
                bail!(
                    "queue.publish_timeout must be between 1ms and 60s, not {:?}",
                    q.publish_timeout
                );
            }
        }
        self.storage.retention()?;
        if self.storage.compact_min_files < 2 {
            bail!(
                "storage.compact_min_files must be at least 2, not {}",
                self.storage.compact_min_files
            );
        }
        if self.storage.compact_target_bytes < self.storage.compact_small_bytes {
            bail!("storage.compact_target_bytes must be at least storage.compact_small_bytes");
        }
        if self.speed.tail_capacity == 0 || self.speed.apply_batch_max == 0 {
            bail!("speed.tail_capacity and speed.apply_batch_max must be positive");
        }
        if self.ingest.seal_max_events == 0 {
            bail!("ingest.seal_max_events must be positive");
        }
        self.trusted_proxies()?;
        Ok(())
    }

    pub(crate) fn trusted_proxies(
        &self,
    ) -> anyhow::Result<tally_serving::client_ip::TrustedProxies> {
        tally_serving::client_ip::TrustedProxies::parse(&self.http.trusted_proxies)
            .map_err(|e| anyhow::anyhow!("http.trusted_proxies: {e}"))
    }

    pub(crate) fn admin_token(&self) -> Option<String> {
        (!self.auth.admin_token.is_empty()).then(|| self.auth.admin_token.clone())
    }

    pub(crate) fn read_token(&self) -> Option<String> {
        (!self.auth.read_token.is_empty()).then(|| self.auth.read_token.clone())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    fn no_env() -> Env {
        Env::prefixed("TALLY_TEST_NOTHING_SET_")
    }

    #[test]
    fn default_toml_loads_and_equals_builtin_defaults() {
        let cfg = Config::load_with_env(None, no_env()).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let from_file = Config::load_with_env(Some(&path), no_env()).unwrap();
        assert_eq!(cfg, from_file);
        assert_eq!(cfg.http.addr.port(), 8080);
        assert_eq!(cfg.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(cfg.ingest.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(cfg.ingest.max_future, Duration::from_secs(300));
        assert_eq!(cfg.ingest.max_age, Duration::from_secs(3650 * 86400));
        assert_eq!(cfg.batch.schedule, "0 0 */8 * * *");
        assert_eq!(cfg.batch.keep_versions, 5);
        assert_eq!(cfg.uniques.precision, 14);
        assert_eq!(cfg.admin_token(), None);
        assert!(cfg.http.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_from_a_file_or_a_comma_separated_variable() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n",
            )?;
            let cfg = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(cfg.http.trusted_proxies, vec!["10.0.0.0/8", "::1"]);
            jail.set_env("TALLY_HTTP_TRUSTED_PROXIES", "127.0.0.1, 192.168.0.0/16");
            let cfg = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                cfg.http.trusted_proxies,
                vec!["127.0.0.1", "192.168.0.0/16"]
            );
            jail.set_env("TALLY_HTTP_TRUSTED_PROXIES", "10.0.0.0/8,nginx");
            let err = format!("{:#}", Config::load(None).unwrap_err());
            assert!(
                err.contains("trusted_proxies") && err.contains("nginx"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_and_unknown_keys_fail() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "[http]\naddr = \"127.0.0.1:9000\"\n[batch]\nkeep_versions = 2\n",
            )?;
            jail.set_env("TALLY_HTTP_ADDR", "127.0.0.1:0");
            jail.set_env("TALLY_STORAGE_DATA_DIR", "./data-test");
            jail.set_env("TALLY_AUTH_ADMIN_TOKEN", "12345");
            jail.set_env("TALLY_BIN", "/not/config");
            let cfg = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(cfg.http.addr.port(), 0);
            assert_eq!(cfg.batch.keep_versions, 2);
            assert_eq!(cfg.storage.data_dir, PathBuf::from("./data-test"));
            assert_eq!(cfg.admin_token().as_deref(), Some("12345"));
            jail.set_env("TALLY_HTTP_NOPE", "1");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn non_loopback_without_token_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TALLY_HTTP_ADDR", "0.0.0.0:8080");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("admin_token"), "{err}");
            jail.set_env("TALLY_AUTH_ADMIN_TOKEN", "secret");
            assert!(Config::load(None).is_ok());
            Ok(())
        });
    }
}
