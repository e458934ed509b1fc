//! The retry budget: retries may add at most a percentage to the request rate, plus a small
//! floor per second, so a failing backend cannot turn into a retry storm that buries the
//! healthy ones. Lock-free: a token balance in milli-tokens.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

const TOKEN: i64 = 1000;

/// A token bucket: every request deposits `percent`/100 of a token, every retry spends a
/// whole one, and `min_per_second` tokens arrive each second regardless.
#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    floor: i64,
    cap: i64,
    balance: AtomicI64,
    last_second: AtomicU64,
}

impl RetryBudget {
    /// A budget allowing retries of `percent` of requests plus `min_per_second`.
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        let floor = i64::from(min_per_second) * TOKEN;
        // Unspent tokens pile up to ten seconds of the floor plus 100 retries: enough for a
        // burst when a backend dies, not enough to let a storm through.
        let cap = floor * 10 + 100 * TOKEN;
        RetryBudget {
            deposit: i64::from(percent) * TOKEN / 100,
            floor,
            cap,
            balance: AtomicI64::new(floor),
            last_second: AtomicU64::new(0),
        }
    }

    /// Counts a request (call once per client request, not per attempt).
    pub fn on_request(&self) {
        if self.deposit == 0 {
            return;
        }
        let after = self.balance.fetch_add(self.deposit, Ordering::Relaxed) + self.deposit;
        if after > self.cap {
            // Racy but bounded: another thread may add between these two, never by much.
            self.balance.fetch_min(self.cap, Ordering::Relaxed);
        }
    }

    /// Spends a token for a retry if there is one; `now_second` is any clock in seconds.
    pub fn try_retry(&self, now_second: u64) -> bool {
        self.refill(now_second);
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= TOKEN).then_some(b - TOKEN)
            })
            .is_ok()
    }

    /// Tokens available now (whole ones), for status pages.
    pub fn available(&self) -> i64 {
        self.balance.load(Ordering::Relaxed) / TOKEN
    }

    fn refill(&self, now: u64) {
        let last = self.last_second.load(Ordering::Relaxed);
        if now <= last || self.floor == 0 {
            return;
        }
        if self
            .last_second
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let secs = i64::try_from(now - last).unwrap_or(i64::MAX).min(1000);
            let after = self.balance.fetch_add(self.floor * secs, Ordering::Relaxed);
            if after + self.floor * secs > self.cap {
                self.balance.fetch_min(self.cap, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_a_percentage_plus_a_floor() {
        let b = RetryBudget::new(20, 2);
        // The floor of the first second: two retries, then none.
        assert!(b.try_retry(0));
        assert!(b.try_retry(0));
        assert!(!b.try_retry(0));
        // 100 requests earn 20 retries.
        for _ in 0..100 {
            b.on_request();
        }
        let granted = (0..50).filter(|_| b.try_retry(0)).count();
        assert_eq!(granted, 20);
        // A new second brings the floor back.
        assert!(b.try_retry(1));
        assert!(b.try_retry(1));
        assert!(!b.try_retry(1));
    }

    #[test]
    fn a_storm_is_bounded() {
        let b = RetryBudget::new(20, 10);
        let mut retries = 0;
        for second in 0..60u64 {
            for _ in 0..1000 {
                b.on_request();
                // Every request fails and wants a retry.
                if b.try_retry(second) {
                    retries += 1;
                }
            }
        }
        // 20% of 60k plus 10/s, plus the initial cap at most.
        assert!(retries <= 12_000 + 600 + 200, "{retries}");
        assert!(retries >= 12_000, "{retries}");
    }

    #[test]
    fn the_balance_is_capped() {
        let b = RetryBudget::new(100, 0);
        for _ in 0..10_000 {
            b.on_request();
        }
        assert_eq!(b.available(), 100);
        let zero = RetryBudget::new(0, 0);
        zero.on_request();
        assert!(!zero.try_retry(5));
    }
}
