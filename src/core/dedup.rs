//! Request-id deduplication with bounded memory.
//!
//! Owns: the map from (client, request id) to either the waiter that is still
//! serving it or the answer it got. Answers are forgotten oldest first once
//! more than `capacity` are kept; a waiter in flight is never forgotten.
//! Must not: decide what a request does — it only remembers.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::records::AnswerSnapshot;
use super::types::{ClientId, Reply, RequestId, RequestKind};

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

/// The dedup table. Lookups only: iteration order never reaches output.
/// Keyed per client first, so a lookup by `&str` needs no allocation.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    seen: HashMap<ClientId, HashMap<RequestId, Seen>>,
    /// Answers, oldest first: the eviction order and the snapshot's list.
    order: VecDeque<Arc<AnswerSnapshot>>,
}

impl Dedup {
    /// An empty table that keeps at most `capacity` answers.
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            capacity: capacity.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// What is known of `(client, request_id)`.
    pub fn get(&self, client: ClientId, request_id: &str) -> Option<&Seen> {
        self.seen.get(&client)?.get(request_id)
    }

    /// Marks the request as served by a queued waiter.
    pub fn wait(&mut self, client: ClientId, request_id: &str, waiter: WaiterId) {
        self.seen
            .entry(client)
            .or_default()
            .insert(request_id.to_owned(), Seen::Waiting(waiter));
    }

    /// Forgets a waiter that left without an answer (its place expired).
    pub fn forget_waiter(&mut self, client: ClientId, request_id: &str) {
        if let Some(ids) = self.seen.get_mut(&client) {
            if matches!(ids.get(request_id), Some(Seen::Waiting(_))) {
                ids.remove(request_id);
                if ids.is_empty() {
                    self.seen.remove(&client);
                }
            }
        }
    }

    /// Remembers the answer to a request, evicting the oldest beyond
    /// capacity. An answer already remembered for the id is replaced in its
    /// place in the eviction order. (The core never answers a remembered id
    /// twice; a replay does when the live server had evicted the first
    /// answer and a restart keeps more answers: the replay must end with the
    /// answer the live server gave last.)
    pub fn answer(&mut self, client: ClientId, request_id: &str, kind: RequestKind, reply: Reply) {
        let answer = Arc::new(AnswerSnapshot {
            client,
            request_id: request_id.to_owned(),
            kind,
            reply,
        });
        let ids = self.seen.entry(client).or_default();
        match ids.get_mut(request_id) {
            Some(seen) => {
                let old = std::mem::replace(seen, Seen::Answered(answer.clone()));
                if let Seen::Answered(old) = old {
                    // Rare (see above): a scan of the order is fine.
                    if let Some(slot) = self.order.iter_mut().find(|a| Arc::ptr_eq(a, &old)) {
                        *slot = answer;
                    }
                    return;
                }
            }
            None => {
                ids.insert(request_id.to_owned(), Seen::Answered(answer.clone()));
            }
        }
        self.order.push_back(answer);
        self.evict();
    }

    /// Takes back an answer from a snapshot (oldest first).
    pub fn restore(&mut self, answer: Arc<AnswerSnapshot>) {
        let ids = self.seen.entry(answer.client).or_default();
        if ids.contains_key(answer.request_id.as_str()) {
            return;
        }
        ids.insert(answer.request_id.clone(), Seen::Answered(answer.clone()));
        self.order.push_back(answer);
        self.evict();
    }

    fn evict(&mut self) {
        while self.order.len() > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(ids) = self.seen.get_mut(&old.client) {
                if matches!(ids.get(old.request_id.as_str()), Some(Seen::Answered(a)) if Arc::ptr_eq(a, &old))
                {
                    ids.remove(old.request_id.as_str());
                }
                if ids.is_empty() {
                    self.seen.remove(&old.client);
                }
            }
        }
    }

    /// Every remembered answer, oldest first: shared, not copied (a
    /// snapshot of 100,000 answers under the state lock costs pointer
    /// copies instead of ~50 ms of string copies).
    pub fn answers(&self) -> Vec<Arc<AnswerSnapshot>> {
        self.order.iter().cloned().collect()
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
    use crate::core::types::RefusalCode;

    #[test]
    fn memory_is_bounded_oldest_first() {
        let mut d = Dedup::new(2);
        for i in 0..3 {
            d.answer(1, &format!("r{i}"), RequestKind::Renew, Reply::Done);
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
        d.answer(1, "a", RequestKind::Acquire, Reply::Done);
        assert!(matches!(d.get(1, "a"), Some(Seen::Answered(_))));
        d.forget_waiter(1, "a");
        assert!(d.get(1, "a").is_some(), "an answer is not a waiter");
    }

    #[test]
    fn answers_are_shared_oldest_first_and_a_new_answer_replaces_in_place() {
        let mut d = Dedup::new(2);
        d.answer(1, "a", RequestKind::Renew, Reply::Done);
        d.answer(2, "b", RequestKind::Release, Reply::Done);
        d.answer(
            1,
            "a",
            RequestKind::Release,
            Reply::refused(RefusalCode::LockNotHeld, "x"),
        );
        let answers = d.answers();
        let keys: Vec<_> = answers
            .iter()
            .map(|a| (a.client, a.request_id.as_str()))
            .collect();
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
        restored.answer(3, "c", RequestKind::Renew, Reply::Done);
        assert!(
            restored.get(1, "a").is_none(),
            "restored answers are evicted oldest first"
        );
        assert!(restored.get(2, "b").is_some());
        assert_eq!(restored.len(), 2);
    }
}
