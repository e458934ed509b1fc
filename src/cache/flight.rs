//! Single flight: concurrent misses for one key share one load.
//!
//! Each key being loaded has a `tokio::sync::OnceCell` in the cache's flight map. The first
//! caller runs its loader inside the cell's initialiser; the others await the cell. The
//! loader's result passes the LSN gate like any fill, and the flight leaves the map before
//! its value is published, so a caller arriving afterwards reads the cache (or starts a
//! new load) rather than joining a finished flight.
//!
//! Failure and cancellation are not shared: if the running loader fails or its caller is
//! dropped, the cell stays empty and the next waiter runs its own loader (one at a time).
//! Waiting is unbounded here; a caller that needs a bound wraps `get_or_load` in
//! `tokio::time::timeout`, and giving up only drops that caller's wait (or hands the load
//! to the next waiter).

use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::OnceCell;

use super::stats::bump;
use super::{Cache, Lookup, Weigh};

/// One load in progress: the value it produced, `None` meaning "absent".
pub(crate) type Flight<V> = OnceCell<Option<V>>;

/// What a loader reports: the value (or `None` when the key does not exist) and the LSN the
/// read was made at, which the LSN gate checks before the result is cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<V> {
    /// The value read, or `None` if the key was absent (cached as a negative entry).
    pub value: Option<V>,
    /// The storage LSN the read observed.
    pub read_lsn: u64,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Weigh + Send + Sync + 'static,
    V: Clone + Weigh + Send + Sync + 'static,
{
    /// Returns the cached value for `key`, or runs `load` once for all concurrent callers
    /// missing on `key` and caches its result if the LSN gate admits it. `Ok(None)` means
    /// the key does not exist. The loader's error goes to its own caller only; other waiters
    /// then run their own loaders. See the module notes on bounding the wait.
    pub async fn get_or_load<F, Fut, E>(&self, key: K, load: F) -> Result<Option<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<V>, E>>,
    {
        Ok(self.get_or_load_traced(&key, load).await?.0)
    }

    /// [`get_or_load`](Self::get_or_load), also saying how the answer came about, for
    /// callers that report it (the app's `Cache-Status` header).
    /// Takes the key by reference so that a hit clones nothing but the value.
    pub async fn get_or_load_traced<F, Fut, E>(
        &self,
        key: &K,
        load: F,
    ) -> Result<(Option<V>, Fill), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<V>, E>>,
    {
        match self.get(key) {
            Lookup::Hit(v) => return Ok((Some(v), Fill::Hit)),
            Lookup::Absent => return Ok((None, Fill::Hit)),
            Lookup::Miss => {}
        }
        // 0: joined another caller's load; 1: loaded, refused; 2: loaded and stored.
        let how = AtomicU8::new(0);
        let cell = self.flights.entry(key.clone()).or_default().clone();
        let run = async {
            let _leave = LeaveOnDrop {
                flights: &self.flights,
                key,
                cell: &cell,
            };
            bump(&self.counters.loads);
            let loaded = load().await?;
            // A refused fill (stale or too large) still answers this flight: the value was
            // current when read, and every waiter asked before it was replaced.
            let stored = match &loaded.value {
                Some(v) => self.insert_if_fresh(key.clone(), v.clone(), loaded.read_lsn),
                None => self.insert_absent_if_fresh(key.clone(), loaded.read_lsn),
            }
            .is_ok();
            how.store(1 + u8::from(stored), Ordering::Relaxed);
            Ok(loaded.value)
        };
        let value = cell.get_or_try_init(|| run).await?;
        let fill = match how.load(Ordering::Relaxed) {
            0 => Fill::Joined,
            n => Fill::Loaded { stored: n == 2 },
        };
        Ok((value.clone(), fill))
    }
}

/// How [`Cache::get_or_load_traced`] produced its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// From the cache (a value or a negative entry).
    Hit,
    /// This caller ran the load; `stored` says whether the LSN gate admitted the result.
    Loaded {
        /// Whether the result entered the cache.
        stored: bool,
    },
    /// Another caller's load for the same key answered this one (single flight).
    Joined,
}

/// Takes a flight out of the map when its loader finishes, fails or is cancelled, unless
/// an invalidation or a newer flight already replaced it.
struct LeaveOnDrop<'a, K: Hash + Eq, V> {
    flights: &'a DashMap<K, Arc<Flight<V>>>,
    key: &'a K,
    cell: &'a Arc<Flight<V>>,
}

impl<K: Hash + Eq, V> Drop for LeaveOnDrop<'_, K, V> {
    fn drop(&mut self) {
        self.flights
            .remove_if(self.key, |_, c| Arc::ptr_eq(c, self.cell));
    }
}
