//! `TokenTable`: the recent idempotency tokens a repository remembers,
//! each with the commit that carried it; at most a fixed number, the
//! oldest forgotten first.
//!
//! It owns memory only, never a file: the tokens come back at open from
//! the log (see `Repository::open`). Its room is reserved when it is made,
//! so remembering a token on the commit path never grows a table. A
//! growing hash table moves every entry at once into new memory: with the
//! default 100 000 tokens that held the storage thread for 25–28 ms on the
//! development machine (rehashing, and the kernel zeroing the fresh
//! memory, then in 2 MiB huge pages), and every commit, and on a secondary
//! every replicated record, waited meanwhile.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::types::CommitNumber;

pub(crate) struct TokenTable {
    /// Shared with `order`: one copy of each token.
    by_token: HashMap<Arc<[u8]>, CommitNumber>,
    /// Oldest first.
    order: VecDeque<Arc<[u8]>>,
    max: usize,
}

impl TokenTable {
    /// Room for `max` tokens, reserved now.
    pub(crate) fn new(max: usize) -> TokenTable {
        TokenTable {
            // Twice what it holds: at most half full, so a removal nearly
            // always frees its slot outright rather than leaving a marker,
            // and the table does not rehash in place either (it must when
            // markers use up its free slots).
            by_token: HashMap::with_capacity(max.saturating_mul(2)),
            order: VecDeque::with_capacity(max.saturating_add(1)),
            max,
        }
    }

    /// The commit that carried `token`, if it is remembered.
    pub(crate) fn get(&self, token: &[u8]) -> Option<CommitNumber> {
        self.by_token.get(token).copied()
    }

    /// Remember `token` as carried by `number`, forgetting the oldest
    /// beyond the bound. A token remembered already takes the new number
    /// and keeps its age.
    pub(crate) fn remember(&mut self, token: &[u8], number: CommitNumber) {
        // One lookup: a token seen again is rare (a client's retry), so
        // the key is built whether or not it is needed.
        let token: Arc<[u8]> = Arc::from(token);
        match self.by_token.entry(token.clone()) {
            Entry::Occupied(mut seen) => {
                seen.insert(number);
                return;
            }
            Entry::Vacant(new) => {
                new.insert(number);
            }
        }
        self.order.push_back(token);
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.by_token.remove(&old);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_token.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_newest_and_forgets_the_oldest_beyond_the_bound() {
        let mut t = TokenTable::new(3);
        for (i, tok) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
            t.remember(*tok, i as CommitNumber + 10);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(b"a"), None);
        assert_eq!(t.get(b"b"), Some(11));
        assert_eq!(t.get(b"d"), Some(13));
        // Seen again: the new number, the old age ("b" is still oldest).
        t.remember(b"b", 20);
        assert_eq!(t.get(b"b"), Some(20));
        t.remember(b"e", 21);
        assert_eq!(t.get(b"b"), None);
        assert_eq!(t.get(b"c"), Some(12));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn never_grows_its_reserved_room() {
        let max = 1000;
        let mut t = TokenTable::new(max);
        let (cap, order_cap) = (t.by_token.capacity(), t.order.capacity());
        for i in 0..(5 * max as u64) {
            t.remember(&i.to_le_bytes(), i);
        }
        assert_eq!(t.len(), max);
        // Markers left by removals may lower what it reports; a growth
        // would double it.
        assert!(t.by_token.capacity() <= cap, "the map grew");
        assert_eq!(t.order.capacity(), order_cap, "the queue grew");
        assert_eq!(t.get(&(5 * max as u64 - 1).to_le_bytes()), Some(4999));
        assert_eq!(t.get(&(4 * max as u64 - 1).to_le_bytes()), None);
    }
}
