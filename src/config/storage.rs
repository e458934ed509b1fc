//! The config of the storage role (`[storage]`) and of an app's link to a remote storage
//! server (`[app] storage = { primary = ... }`).
//!
//! Both ends of the storage protocol are configured here so the two halves of one link
//! (listener TLS and client TLS, frame limits, timeouts) are read side by side.

use std::path::PathBuf;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::units::{Dur, Size};

/// `[storage]`: this node serves its engine to apps over TCP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where apps (and, later, replicas) connect. Needs a restart to change.
    pub listen: std::net::SocketAddr,
    /// `primary` takes writes; `replica` follows a primary by log shipping, serves reads
    /// and refuses writes.
    #[serde(default)]
    pub mode: StorageMode,
    /// The primary a replica follows, `host:port`. Required with `mode = "replica"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<String>,
    /// TLS a replica uses to reach the primary it follows (like the app's link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_tls: Option<ClientTls>,
    /// On a primary: a write is acknowledged only once this many replicas hold it
    /// durably. 0 (the default) acknowledges after the primary's own fsync.
    #[serde(default)]
    pub sync_replicas: usize,
    /// How long a write waits for `sync_replicas` acknowledgements before the policy
    /// applies.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout: Dur,
    /// What happens when too few replicas confirm a write in time: `fail` answers the
    /// client that the outcome is unknown (the write is durable on the primary only),
    /// `degrade` acknowledges anyway, counts it and logs it.
    #[serde(default)]
    pub sync_policy: SyncPolicy,
    /// On a replica: largest lag (time since it last held everything the primary had)
    /// at which it still reports ready.
    #[serde(default = "default_replica_max_lag")]
    pub max_lag: Dur,
    /// Largest frame a peer may send; a bigger one closes the connection. Bounds the
    /// memory one connection can make the server allocate.
    #[serde(default = "default_max_frame")]
    pub max_frame: Size,
    /// Most requests one connection may have in progress; beyond that the server stops
    /// reading from it, so a fast client cannot queue unbounded work.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Most open connections; further peers wait in the accept backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a peer has to finish the TLS and Strata handshakes.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
    /// Time a started frame may take to arrive whole (and a reply to be taken by the peer);
    /// a peer that stalls longer is disconnected, so it cannot pin buffers forever.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout: Dur,
    /// TLS on the storage port; without it the link is plain TCP (still authenticated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

fn default_max_frame() -> Size {
    Size(16 << 20)
}
fn default_max_in_flight() -> usize {
    256
}
fn default_max_connections() -> usize {
    1024
}
fn default_handshake_timeout() -> Dur {
    Dur::secs(5)
}
fn default_frame_timeout() -> Dur {
    Dur::secs(10)
}
fn default_sync_timeout() -> Dur {
    Dur::secs(2)
}
fn default_replica_max_lag() -> Dur {
    Dur::secs(30)
}

/// What a primary with `sync_replicas` does when too few replicas confirm in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// Answer "outcome unknown" (504): never claim a replication that did not happen.
    #[default]
    Fail,
    /// Acknowledge with only the primary's copy; counted in
    /// `strata_replication_sync_degraded` and logged.
    Degrade,
}

/// Whether a storage node takes writes or follows another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// Takes writes; the source of truth.
    #[default]
    Primary,
    /// Follows a primary by log shipping (stage 4).
    Replica,
}

/// TLS of the storage listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM CA bundle; when set, every client must present a certificate it signed (mutual
    /// TLS), on top of the cluster secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// Where the app's records live: `"embedded"` or a remote storage server.
#[derive(Clone, Debug, Default, PartialEq)]
// Built once per config load; the size difference costs nothing on a hot path.
#[allow(clippy::large_enum_variant)]
pub enum StorageTarget {
    /// The sled engine inside this process.
    #[default]
    Embedded,
    /// A storage server reached over the network.
    Remote(RemoteStorage),
}

impl Serialize for StorageTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StorageTarget::Embedded => s.serialize_str("embedded"),
            StorageTarget::Remote(r) => r.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for StorageTarget {
    // Hand-written instead of `#[serde(untagged)]` so a mistake inside the table keeps
    // serde's precise message ("unknown field `primray`") instead of "did not match any
    // variant".
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = StorageTarget;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"embedded\" or a table such as { primary = \"10.0.0.5:7000\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StorageTarget, E> {
                match v {
                    "embedded" => Ok(StorageTarget::Embedded),
                    other => Err(E::custom(format!(
                        "unknown storage {other:?}; use \"embedded\" or {{ primary = \"host:port\" }}"
                    ))),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<StorageTarget, A::Error> {
                RemoteStorage::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(StorageTarget::Remote)
            }
        }
        d.deserialize_any(V)
    }
}

/// An app's link to a storage server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteStorage {
    /// The primary, `host:port`: every request goes there in stage 2.
    pub primary: String,
    /// Read replicas, `host:port` each: reads go to a healthy one (least outstanding
    /// requests of two random choices), writes always to the primary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// A replica lagging more than this is skipped for reads; when none qualifies the
    /// primary serves them.
    #[serde(default = "default_app_max_lag")]
    pub max_lag: Dur,
    /// How long a read carrying a consistency token waits for a replica to reach it
    /// before it goes to the primary.
    #[serde(default = "default_token_wait")]
    pub token_wait: Dur,
    /// How many multiplexed connections to keep to the primary. A few spread the work of
    /// one busy app over the server's cores and survive the loss of one.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Time to open a connection, TLS and handshake included.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Time to wait for the answer to one request. A write that times out is reported as
    /// of unknown outcome (504), never retried.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Dur,
    /// Largest request this app sends; keep it at or below the server's `max_frame`, so
    /// an oversize batch is refused here instead of costing the whole connection.
    #[serde(default = "default_max_frame")]
    pub max_frame: Size,
    /// TLS to the storage server; must match the server's `[storage] tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

fn default_app_max_lag() -> Dur {
    Dur::secs(5)
}
fn default_token_wait() -> Dur {
    Dur::millis(50)
}
fn default_connections() -> usize {
    4
}
fn default_connect_timeout() -> Dur {
    Dur::secs(2)
}
fn default_request_timeout() -> Dur {
    Dur::secs(10)
}

/// TLS of an app's connections to storage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA bundle the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate chain, for servers that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Name to verify the server's certificate against; default: the host of `primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize)]
    struct T {
        storage: StorageTarget,
    }

    #[test]
    fn storage_target_is_a_word_or_a_table() {
        let t: T = toml::from_str("storage = \"embedded\"").unwrap();
        assert_eq!(t.storage, StorageTarget::Embedded);
        let t: T = toml::from_str("storage = { primary = \"db:7000\" }").unwrap();
        let StorageTarget::Remote(r) = &t.storage else {
            panic!("remote expected")
        };
        assert_eq!(r.primary, "db:7000");
        assert_eq!(r.connections, 4);
        let back = toml::to_string(&t).unwrap();
        let again: T = toml::from_str(&back).unwrap();
        assert_eq!(again.storage, t.storage);
        let e = toml::from_str::<T>("storage = { primray = \"x\" }")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown field `primray`"), "{e}");
        let e = toml::from_str::<T>("storage = \"remote\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown storage"), "{e}");
    }
}
