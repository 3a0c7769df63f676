//! Request-id deduplication with bounded memory.
//!
//! Owns: the map from (client, request id) to either the waiter that is still
//! serving it or the answer it got. Answers are forgotten oldest first once
//! more than `capacity` are kept; a waiter in flight is never forgotten.
//! Must not: decide what a request does — it only remembers.

use std::collections::{HashMap, VecDeque};

use super::records::AnswerSnapshot;
use super::types::{ClientId, Reply, RequestId, RequestKind};

/// Numbers a waiter for as long as it is queued.
pub type WaiterId = u64;

/// What is known about one (client, request id).
#[derive(Clone, Debug)]
pub enum Seen {
    /// An acquire still waiting in a queue.
    Waiting(WaiterId),
    /// Answered; a retry gets this answer again.
    Answered { kind: RequestKind, reply: Reply },
}

type Key = (ClientId, RequestId);

/// The dedup table. Lookups only: iteration order never reaches output.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    seen: HashMap<Key, Seen>,
    /// Answered keys, oldest first: the eviction order.
    order: VecDeque<Key>,
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
        self.seen.get(&(client, request_id.to_owned()))
    }

    /// Marks the request as served by a queued waiter.
    pub fn wait(&mut self, client: ClientId, request_id: &str, waiter: WaiterId) {
        self.seen
            .insert((client, request_id.to_owned()), Seen::Waiting(waiter));
    }

    /// Forgets a waiter that left without an answer (its place expired).
    pub fn forget_waiter(&mut self, client: ClientId, request_id: &str) {
        let key = (client, request_id.to_owned());
        if matches!(self.seen.get(&key), Some(Seen::Waiting(_))) {
            self.seen.remove(&key);
        }
    }

    /// Remembers the answer to a request, evicting the oldest beyond capacity.
    pub fn answer(&mut self, client: ClientId, request_id: &str, kind: RequestKind, reply: Reply) {
        let key = (client, request_id.to_owned());
        let previous = self
            .seen
            .insert(key.clone(), Seen::Answered { kind, reply });
        if !matches!(previous, Some(Seen::Answered { .. })) {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Every remembered answer, oldest first.
    pub fn answers(&self) -> Vec<AnswerSnapshot> {
        self.order
            .iter()
            .filter_map(|key| match self.seen.get(key) {
                Some(Seen::Answered { kind, reply }) => Some(AnswerSnapshot {
                    client: key.0,
                    request_id: key.1.clone(),
                    kind: *kind,
                    reply: reply.clone(),
                }),
                _ => None,
            })
            .collect()
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
        assert!(matches!(d.get(1, "a"), Some(Seen::Answered { .. })));
        d.forget_waiter(1, "a");
        assert!(d.get(1, "a").is_some(), "an answer is not a waiter");
    }
}
