//! How many bytes a key or value holds, so the cache can be bounded by memory rather than by
//! entry count.

use std::sync::Arc;

use bytes::Bytes;

use crate::storage::Key;

/// The number of heap and inline bytes a cached key or value keeps alive.
///
/// The cache charges every entry `key.weight() + value.weight() +`
/// [`ENTRY_OVERHEAD`](super::ENTRY_OVERHEAD), so the byte budget tracks real memory. An
/// estimate is fine, but it must be cheap (it runs once per fill) and must not change while
/// the value sits in the cache.
pub trait Weigh {
    /// Bytes this value keeps alive, including its inline size.
    fn weight(&self) -> usize;
}

impl Weigh for Bytes {
    /// The slice length plus the handle. Several `Bytes` may share one buffer; each is
    /// charged in full, which over-counts and so errs on the safe side.
    fn weight(&self) -> usize {
        self.len() + std::mem::size_of::<Bytes>()
    }
}

impl Weigh for Vec<u8> {
    /// The allocation (capacity, not length) plus the handle.
    fn weight(&self) -> usize {
        self.capacity() + std::mem::size_of::<Vec<u8>>()
    }
}

impl Weigh for String {
    /// The allocation (capacity, not length) plus the handle.
    fn weight(&self) -> usize {
        self.capacity() + std::mem::size_of::<String>()
    }
}

impl Weigh for str {
    /// The string bytes (used through `Arc<str>` and `Box<str>`).
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for [u8] {
    /// The bytes (used through `Arc<[u8]>` and `Box<[u8]>`).
    fn weight(&self) -> usize {
        self.len()
    }
}

impl<T: Weigh + ?Sized> Weigh for Arc<T> {
    /// The pointee plus the two reference counts and the pointer. Shared `Arc`s are charged
    /// in full by every entry holding one, which errs on the safe side.
    fn weight(&self) -> usize {
        (**self).weight() + 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Arc<T>>()
    }
}

impl<T: Weigh + ?Sized> Weigh for Box<T> {
    /// The pointee plus the pointer.
    fn weight(&self) -> usize {
        (**self).weight() + std::mem::size_of::<Box<T>>()
    }
}

impl Weigh for u64 {
    /// Inline only.
    fn weight(&self) -> usize {
        std::mem::size_of::<u64>()
    }
}

impl Weigh for Key {
    /// Both parts' bytes plus the two `String` handles (capacity is not visible through the
    /// accessors; keys are built exactly sized).
    fn weight(&self) -> usize {
        self.collection().len() + self.id().len() + std::mem::size_of::<Key>()
    }
}

impl<A: Weigh, B: Weigh> Weigh for (A, B) {
    /// Both halves.
    fn weight(&self) -> usize {
        self.0.weight() + self.1.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_count_payload_and_handle() {
        let b = Bytes::from_static(b"hello");
        assert_eq!(b.weight(), 5 + std::mem::size_of::<Bytes>());
        let v = Vec::with_capacity(100);
        assert_eq!(
            Weigh::weight(&v as &Vec<u8>),
            100 + std::mem::size_of::<Vec<u8>>()
        );
        let a: Arc<str> = Arc::from("abc");
        assert!(a.weight() >= 3 + 16);
        let k = Key::new("users", "42").expect("valid key");
        assert_eq!(k.weight(), 7 + std::mem::size_of::<Key>());
        assert_eq!(
            (7u64, Bytes::new()).weight(),
            8 + std::mem::size_of::<Bytes>()
        );
    }
}
