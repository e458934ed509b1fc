//! Request coalescing: concurrent misses for one key make one upstream request.
//!
//! The first request for a key becomes the leader and holds a [`Flight`]; later ones get
//! a [`Wait`] and sleep until the flight ends (the leader stored the response, found it
//! uncacheable, failed, or was dropped) or their bounded wait runs out. Followers then look
//! the store up again and go upstream themselves if it has nothing for them. Ending is
//! tied to `Drop`, so a leader that panics or is cancelled still releases its followers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;

type Flights = DashMap<String, (u64, watch::Receiver<bool>)>;

/// The map of fetches in flight.
#[derive(Default)]
pub struct Coalescer {
    flights: Arc<Flights>,
    next_id: AtomicU64,
}

/// What a request becomes for a key.
pub enum Joined {
    /// Nobody is fetching it: this request does, and ends the flight when done.
    Leader(Flight),
    /// Another request is fetching it: wait for that.
    Follower(Wait),
}

/// The leader's token; dropping it wakes the followers.
pub struct Flight {
    flights: Arc<Flights>,
    key: String,
    id: u64,
    done: watch::Sender<bool>,
}

/// A follower's handle on a flight.
pub struct Wait(watch::Receiver<bool>);

impl Coalescer {
    /// Joins the flight for `key`, starting one if there is none.
    pub fn join(&self, key: &str) -> Joined {
        if let Some(f) = self.flights.get(key) {
            return Joined::Follower(Wait(f.1.clone()));
        }
        match self.flights.entry(key.to_owned()) {
            dashmap::Entry::Occupied(e) => Joined::Follower(Wait(e.get().1.clone())),
            dashmap::Entry::Vacant(v) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = watch::channel(false);
                v.insert((id, rx));
                Joined::Leader(Flight {
                    flights: self.flights.clone(),
                    key: key.to_owned(),
                    id,
                    done: tx,
                })
            }
        }
    }

    /// Fetches in flight now.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.flights
            .remove_if(&self.key, |_, (id, _)| *id == self.id);
        let _ = self.done.send(true);
    }
}

impl Wait {
    /// Waits up to `limit` for the flight to end; `false` when the wait ran out.
    pub async fn done(mut self, limit: Duration) -> bool {
        // An error means the leader is gone, which also ends the flight.
        tokio::time::timeout(limit, self.0.wait_for(|d| *d))
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers_released_on_drop() {
        let c = Coalescer::default();
        let Joined::Leader(flight) = c.join("k") else {
            panic!("first is the leader")
        };
        let waits: Vec<_> = (0..10)
            .map(|_| match c.join("k") {
                Joined::Follower(w) => w,
                Joined::Leader(_) => panic!("only one leader"),
            })
            .collect();
        let Joined::Leader(_other) = c.join("other") else {
            panic!("other keys are independent")
        };
        let handles: Vec<_> = waits
            .into_iter()
            .map(|w| tokio::spawn(w.done(Duration::from_secs(5))))
            .collect();
        drop(flight);
        for h in handles {
            assert!(h.await.unwrap());
        }
        assert!(matches!(c.join("k"), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn waits_are_bounded() {
        let c = Coalescer::default();
        let _leader = c.join("k");
        let Joined::Follower(w) = c.join("k") else {
            panic!()
        };
        assert!(!w.done(Duration::from_millis(20)).await);
    }
}
