//! Pick policies: pure functions from the pool's shape (weights, loads, which backends may
//! take this request) to an index. No sockets, no clocks; tested as plain functions.
//!
//! Every policy takes `ok(i)`: whether backend `i` may take the request (healthy, not
//! ejected, not already tried by this request). `None` means nobody may.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fast per-thread random number (xorshift64*), seeded once per thread. Good enough to
/// spread load; not for anything secret.
pub fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A 64-bit hash of bytes that is stable across processes and versions (FNV-1a with a
/// final mix), so a key maps to the same backend on every balancer of a fleet.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Cumulative weights, for drawing a backend with probability proportional to its weight.
#[derive(Debug, Clone)]
pub struct Weights {
    cumulative: Vec<u64>,
}

impl Weights {
    /// From the backends' weights (each at least 1).
    pub fn new(weights: &[u32]) -> Self {
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                total += u64::from((*w).max(1));
                total
            })
            .collect();
        Weights { cumulative }
    }

    /// How many backends.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// True when there are no backends.
    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// The backend `r` lands on.
    pub fn sample(&self, r: u64) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let x = r % total;
        Some(self.cumulative.partition_point(|c| *c <= x))
    }
}

/// Power of two choices: draw two backends by weight, send to the one with fewer requests
/// in flight per unit of weight. Falls back to a scan when the draws keep hitting backends
/// that may not take the request.
pub fn p2c(
    weights: &Weights,
    mut rng: impl FnMut() -> u64,
    load: impl Fn(usize) -> u32,
    weight: impl Fn(usize) -> u32,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut draw = |not: Option<usize>| {
        (0..4)
            .filter_map(|_| weights.sample(rng()))
            .find(|&i| ok(i) && Some(i) != not)
    };
    let Some(a) = draw(None) else {
        return least_loaded(weights.len(), 0, &load, &weight, &ok);
    };
    if weights.len() < 2 {
        // No second choice to draw (the draws would all come back `a`).
        return Some(a);
    }
    let Some(b) = draw(Some(a)) else {
        return Some(a);
    };
    // load/weight compared without division: la/wa <= lb/wb  <=>  la*wb <= lb*wa.
    let (la, lb) = (u64::from(load(a)), u64::from(load(b)));
    let (wa, wb) = (u64::from(weight(a).max(1)), u64::from(weight(b).max(1)));
    Some(if la * wb <= lb * wa { a } else { b })
}

/// The backend with the fewest requests in flight per unit of weight; ties go to the
/// first one found scanning from `start`, so callers spread ties by varying `start`.
pub fn least_loaded(
    n: usize,
    start: usize,
    load: impl Fn(usize) -> u32,
    weight: impl Fn(usize) -> u32,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, u64, u64)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if !ok(i) {
            continue;
        }
        let (l, w) = (u64::from(load(i)), u64::from(weight(i).max(1)));
        match best {
            Some((_, bl, bw)) if l * bw >= bl * w => {}
            _ => best = Some((i, l, w)),
        }
    }
    best.map(|(i, _, _)| i)
}

/// An interleaved weighted round-robin order (nginx's smooth weighted round robin, computed
/// once per pool): weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`.
pub fn wrr_schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let reduced: Vec<i64> = weights.iter().map(|w| i64::from((*w).max(1) / g)).collect();
    let total: i64 = reduced.iter().sum();
    // Bounded by validation (weights ≤ 1000, backends ≤ 1000); cap anyway.
    let len = usize::try_from(total).unwrap_or(0).min(1 << 20);
    let mut current = vec![0i64; reduced.len()];
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let mut best = 0;
        for (i, w) in reduced.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(u32::try_from(best).unwrap_or(0));
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The next backend in the round-robin order that may take the request. A slot whose
/// backend may not take it is skipped by drawing the next slot from the shared counter,
/// so the skipped share spreads over the others instead of doubling its neighbour's.
pub fn round_robin(
    schedule: &[u32],
    counter: &AtomicUsize,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let len = schedule.len();
    if len == 0 {
        return None;
    }
    (0..len)
        .map(|_| schedule[counter.fetch_add(1, Ordering::Relaxed) % len] as usize)
        .find(|&i| ok(i))
        // Other threads may have drawn the slots we needed; settle with a scan.
        .or_else(|| schedule.iter().map(|i| *i as usize).find(|&i| ok(i)))
}

/// Weighted rendezvous (highest random weight) hashing: each backend scores the key, the
/// best score wins. Removing a backend moves only its keys; adding one takes a share
/// proportional to its weight from every other, and nothing else moves.
pub fn rendezvous(
    key: u64,
    seeds: &[u64],
    weight: impl Fn(usize) -> u32,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, seed) in seeds.iter().enumerate() {
        if !ok(i) {
            continue;
        }
        let h = mix(key ^ seed);
        // A uniform draw in (0, 1), then the weighted score -w / ln(u).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(weight(i).max(1)) / u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: usize, picks: impl Iterator<Item = Option<usize>>) -> Vec<usize> {
        let mut c = vec![0; n];
        for i in picks.flatten() {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn weighted_sampling_follows_weights() {
        let w = Weights::new(&[1, 3]);
        let c = counts(2, (0..40_000).map(|_| w.sample(random())));
        let share = c[1] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{c:?}");
        assert_eq!(Weights::new(&[]).sample(5), None);
    }

    #[test]
    fn wrr_interleaves_and_honours_weights() {
        let s = wrr_schedule(&[5, 1, 1]);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(wrr_schedule(&[2, 2]), vec![0, 1], "reduced by the gcd");
        let counter = AtomicUsize::new(0);
        let s = wrr_schedule(&[3, 1]);
        let c = counts(2, (0..400).map(|_| round_robin(&s, &counter, |_| true)));
        assert_eq!(c, vec![300, 100]);
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let s = wrr_schedule(&[1, 1, 1]);
        let counter = AtomicUsize::new(0);
        let c = counts(3, (0..300).map(|_| round_robin(&s, &counter, |i| i != 1)));
        assert_eq!(c, vec![150, 0, 150]);
        assert_eq!(round_robin(&s, &counter, |_| false), None);
    }

    #[test]
    fn p2c_prefers_the_less_loaded_and_respects_ok() {
        let w = Weights::new(&[1, 1, 1]);
        let loads = [10u32, 0, 10];
        let c = counts(
            3,
            (0..3000).map(|_| p2c(&w, random, |i| loads[i], |_| 1, |_| true)),
        );
        // Backend 1 wins every draw it is part of: 1 - (2/3)^2 ≈ 5/9 of them, plus ties.
        assert!(c[1] > 1500, "{c:?}");
        let c = counts(
            3,
            (0..300).map(|_| p2c(&w, random, |_| 0, |_| 1, |i| i == 2)),
        );
        assert_eq!(c, vec![0, 0, 300], "only the available one");
        assert_eq!(p2c(&w, random, |_| 0, |_| 1, |_| false), None);
    }

    #[test]
    fn p2c_weights_shift_load() {
        let w = Weights::new(&[1, 4]);
        let c = counts(
            2,
            (0..10_000).map(|_| p2c(&w, random, |_| 0, |i| [1, 4][i], |_| true)),
        );
        assert!(c[1] > 7_000, "{c:?}");
    }

    #[test]
    fn least_loaded_divides_by_weight() {
        let loads = [4u32, 6, 1];
        let weights = [1u32, 3, 1];
        // 4/1, 6/3 = 2, 1/1 = 1 → index 2; without 2 → index 1.
        assert_eq!(
            least_loaded(3, 0, |i| loads[i], |i| weights[i], |_| true),
            Some(2)
        );
        assert_eq!(
            least_loaded(3, 0, |i| loads[i], |i| weights[i], |i| i != 2),
            Some(1)
        );
        assert_eq!(least_loaded(3, 0, |_| 0, |_| 1, |_| false), None);
        assert_eq!(
            least_loaded(3, 1, |_| 0, |_| 1, |_| true),
            Some(1),
            "ties from start"
        );
    }

    #[test]
    fn rendezvous_is_sticky_and_moves_few_keys() {
        let seeds: Vec<u64> = (0..5)
            .map(|i| stable_hash(format!("10.0.0.{i}:80").as_bytes()))
            .collect();
        let keys: Vec<u64> = (0..5000)
            .map(|k| stable_hash(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| rendezvous(*k, &seeds, |_| 1, |_| true).unwrap())
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| rendezvous(*k, &seeds, |_| 1, |_| true).unwrap())
            .collect();
        assert_eq!(before, again, "same key, same backend");
        let c = counts(5, before.iter().map(|i| Some(*i)));
        assert!(
            c.iter().all(|n| (800..1200).contains(n)),
            "even spread {c:?}"
        );
        // Backend 3 leaves: only its keys move.
        let after: Vec<usize> = keys
            .iter()
            .map(|k| rendezvous(*k, &seeds, |_| 1, |i| i != 3).unwrap())
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(b, a, "a key not on the removed backend moved");
            }
        }
        // Weights: backend 0 at weight 4 of 8 total takes about half.
        let c = counts(
            5,
            keys.iter()
                .map(|k| rendezvous(*k, &seeds, |i| if i == 0 { 4 } else { 1 }, |_| true)),
        );
        assert!((2200..2800).contains(&c[0]), "{c:?}");
    }
}
