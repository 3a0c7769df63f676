//! Request-id deduplication with bounded memory.
//!
//! Owns: the map from (client, request id) to either the waiter that is still
//! serving it or the answer it got. Answers are forgotten oldest first once
//! more than `capacity` are kept; a waiter in flight is never forgotten.
//! Must not: decide what a request does — it only remembers.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;

use super::records::AnswerSnapshot;
use super::types::ClientId;

/// Numbers a waiter for as long as it is queued.
pub type WaiterId = u64;

/// What is known about one (client, request id).
#[derive(Clone, Debug)]
pub enum Seen {
    /// An acquire still waiting in a queue.
    Waiting(WaiterId),
    /// Answered; a retry gets this answer again. Shared with the eviction
    /// order, so that a snapshot copies pointers, not answers.
    Answered(Arc<AnswerSnapshot>),
}

/// One (client, request id) and what is known of it; once answered, the
/// id is shared with the answer.
#[derive(Debug)]
struct Entry {
    client: ClientId,
    id: Arc<str>,
    seen: Seen,
}

impl Entry {
    /// Whether this is the entry of `(client, id)`.
    fn is(&self, client: ClientId, id: &str) -> bool {
        self.client == client && *self.id == *id
    }

    /// The entry of a new answer, sharing its id.
    fn answered(answer: &Arc<AnswerSnapshot>) -> Entry {
        Entry {
            client: answer.client,
            id: answer.request_id.clone(),
            seen: Seen::Answered(answer.clone()),
        }
    }
}

/// The dedup table. Lookups only: iteration order never reaches output.
/// One flat table probed once per lookup with a borrowed (client, id), not
/// a map of per-client maps (two probes) keyed by owned strings; hashed
/// with SipHash under the process's random keys, as std's maps are, since
/// clients choose the ids.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    seen: HashTable<Entry>,
    hasher: RandomState,
    /// Answers, oldest first, with their hashes: the eviction order and the
    /// snapshot's list. (Evicting finds its entry by hash and pointer, with
    /// no string hashed or compared.)
    order: VecDeque<(u64, Arc<AnswerSnapshot>)>,
}

impl Dedup {
    /// An empty table that keeps at most `capacity` answers.
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            capacity: capacity.max(1),
            seen: HashTable::new(),
            hasher: RandomState::new(),
            order: VecDeque::new(),
        }
    }

    fn hash(&self, client: ClientId, id: &str) -> u64 {
        self.hasher.hash_one((client, id))
    }

    /// The slot of `(client, id)`, found or vacant, and its hash.
    fn slot(&mut self, client: ClientId, id: &str) -> (Slot<'_, Entry>, u64) {
        let hash = self.hash(client, id);
        let hasher = &self.hasher;
        let slot = self.seen.entry(
            hash,
            |e| e.is(client, id),
            |e| hasher.hash_one((e.client, &*e.id)),
        );
        (slot, hash)
    }

    /// What is known of `(client, request_id)`.
    pub fn get(&self, client: ClientId, request_id: &str) -> Option<&Seen> {
        let hash = self.hash(client, request_id);
        self.seen
            .find(hash, |e| e.is(client, request_id))
            .map(|e| &e.seen)
    }

    /// Marks the request as served by a queued waiter.
    pub fn wait(&mut self, client: ClientId, request_id: &str, waiter: WaiterId) {
        match self.slot(client, request_id).0 {
            Slot::Occupied(mut slot) => {
                let old = std::mem::replace(&mut slot.get_mut().seen, Seen::Waiting(waiter));
                // The core asks only for ids it has no answer to; if one
                // did, its answer leaves the order too (table and order
                // agree, and a snapshot holds no answer the table lost).
                if let Seen::Answered(old) = old {
                    self.order.retain(|(_, a)| !Arc::ptr_eq(a, &old));
                }
            }
            Slot::Vacant(slot) => {
                slot.insert(Entry {
                    client,
                    id: request_id.into(),
                    seen: Seen::Waiting(waiter),
                });
            }
        }
    }

    /// Forgets a waiter that left without an answer (its place expired).
    pub fn forget_waiter(&mut self, client: ClientId, request_id: &str) {
        let hash = self.hash(client, request_id);
        let waiting = |e: &Entry| e.is(client, request_id) && matches!(e.seen, Seen::Waiting(_));
        if let Ok(slot) = self.seen.find_entry(hash, waiting) {
            slot.remove();
        }
    }

    /// Remembers the answer to a request, evicting the oldest beyond
    /// capacity. An answer already remembered for the id is replaced in its
    /// place in the eviction order. (The core never answers a remembered id
    /// twice; a replay does when the live server had evicted the first
    /// answer and a restart keeps more answers: the replay must end with the
    /// answer the live server gave last.)
    pub fn answer(&mut self, answer: Arc<AnswerSnapshot>) {
        let (slot, hash) = self.slot(answer.client, &answer.request_id);
        match slot {
            Slot::Occupied(mut slot) => {
                let entry = slot.get_mut();
                // A waiter's entry made its own copy of the id: share the
                // answer's from now on.
                entry.id = answer.request_id.clone();
                let old = std::mem::replace(&mut entry.seen, Seen::Answered(answer.clone()));
                if let Seen::Answered(old) = old {
                    // Rare (see above): a scan of the order is fine.
                    if let Some(place) = self.order.iter_mut().find(|(_, a)| Arc::ptr_eq(a, &old)) {
                        place.1 = answer;
                    }
                    return;
                }
            }
            Slot::Vacant(slot) => {
                slot.insert(Entry::answered(&answer));
            }
        }
        self.order.push_back((hash, answer));
        self.evict();
    }

    /// Takes back an answer from a snapshot (oldest first).
    pub fn restore(&mut self, answer: Arc<AnswerSnapshot>) {
        let (slot, hash) = self.slot(answer.client, &answer.request_id);
        match slot {
            Slot::Occupied(_) => return,
            Slot::Vacant(slot) => {
                slot.insert(Entry::answered(&answer));
            }
        }
        self.order.push_back((hash, answer));
        self.evict();
    }

    fn evict(&mut self) {
        while self.order.len() > self.capacity {
            let Some((hash, old)) = self.order.pop_front() else {
                break;
            };
            let mine = |e: &Entry| matches!(&e.seen, Seen::Answered(a) if Arc::ptr_eq(a, &old));
            if let Ok(slot) = self.seen.find_entry(hash, mine) {
                slot.remove();
            }
        }
    }

    /// Every remembered answer, oldest first: shared, not copied (a
    /// snapshot of 100,000 answers under the state lock costs pointer
    /// copies instead of ~50 ms of string copies).
    pub fn answers(&self) -> Vec<Arc<AnswerSnapshot>> {
        self.order.iter().map(|(_, a)| a.clone()).collect()
    }

    /// How many answers are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when no answer is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::{RefusalCode, Reply, RequestKind};

    fn answer(
        client: ClientId,
        request_id: &str,
        kind: RequestKind,
        reply: Reply,
    ) -> Arc<AnswerSnapshot> {
        Arc::new(AnswerSnapshot {
            client,
            request_id: request_id.into(),
            kind,
            reply,
        })
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let mut d = Dedup::new(2);
        for i in 0..3 {
            d.answer(answer(1, &format!("r{i}"), RequestKind::Renew, Reply::Done));
        }
        assert!(d.get(1, "r0").is_none());
        assert!(d.get(1, "r1").is_some());
        assert!(d.get(1, "r2").is_some());
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn waiter_is_replaced_by_its_answer() {
        let mut d = Dedup::new(4);
        d.wait(1, "a", 7);
        assert!(matches!(d.get(1, "a"), Some(Seen::Waiting(7))));
        d.answer(answer(1, "a", RequestKind::Acquire, Reply::Done));
        assert!(matches!(d.get(1, "a"), Some(Seen::Answered(_))));
        d.forget_waiter(1, "a");
        assert!(d.get(1, "a").is_some(), "an answer is not a waiter");
    }

    #[test]
    fn a_waiter_over_an_answer_takes_the_answer_out_of_the_order_too() {
        let mut d = Dedup::new(4);
        d.answer(answer(1, "a", RequestKind::Acquire, Reply::Done));
        d.answer(answer(1, "b", RequestKind::Acquire, Reply::Done));
        d.wait(1, "a", 9);
        assert!(matches!(d.get(1, "a"), Some(Seen::Waiting(9))));
        let ids: Vec<_> = d.answers().iter().map(|a| a.request_id.clone()).collect();
        assert_eq!(ids, [Arc::from("b")], "no answer the table no longer holds");
    }

    #[test]
    fn answers_are_shared_oldest_first_and_a_new_answer_replaces_in_place() {
        let mut d = Dedup::new(2);
        d.answer(answer(1, "a", RequestKind::Renew, Reply::Done));
        d.answer(answer(2, "b", RequestKind::Release, Reply::Done));
        d.answer(answer(
            1,
            "a",
            RequestKind::Release,
            Reply::refused(RefusalCode::LockNotHeld, "x"),
        ));
        let answers = d.answers();
        let keys: Vec<_> = answers.iter().map(|a| (a.client, &*a.request_id)).collect();
        assert_eq!(
            keys,
            [(1, "a"), (2, "b")],
            "replaced in place, none evicted"
        );
        assert_eq!(
            answers[0].kind,
            RequestKind::Release,
            "the last answer is kept"
        );
        assert!(matches!(d.get(1, "a"), Some(Seen::Answered(a)) if Arc::ptr_eq(a, &answers[0])));

        let mut restored = Dedup::new(2);
        for answer in answers {
            restored.restore(answer);
        }
        restored.answer(answer(3, "c", RequestKind::Renew, Reply::Done));
        assert!(
            restored.get(1, "a").is_none(),
            "restored answers are evicted oldest first"
        );
        assert!(restored.get(2, "b").is_some());
        assert_eq!(restored.len(), 2);
    }
}
