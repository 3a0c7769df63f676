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
/// Keyed per client first, so a lookup by `&str` needs no allocation.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    seen: HashMap<ClientId, HashMap<RequestId, Seen>>,
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

    /// Remembers the answer to a request, evicting the oldest beyond capacity.
    pub fn answer(&mut self, client: ClientId, request_id: &str, kind: RequestKind, reply: Reply) {
        let ids = self.seen.entry(client).or_default();
        let answer = Seen::Answered { kind, reply };
        let fresh = match ids.get_mut(request_id) {
            Some(seen) => !matches!(std::mem::replace(seen, answer), Seen::Answered { .. }),
            None => {
                ids.insert(request_id.to_owned(), answer);
                true
            }
        };
        if fresh {
            self.order.push_back((client, request_id.to_owned()));
        }
        while self.order.len() > self.capacity {
            let Some((old_client, old_id)) = self.order.pop_front() else {
                break;
            };
            if let Some(ids) = self.seen.get_mut(&old_client) {
                ids.remove(&old_id);
                if ids.is_empty() {
                    self.seen.remove(&old_client);
                }
            }
        }
    }

    /// Every remembered answer, oldest first.
    pub fn answers(&self) -> Vec<AnswerSnapshot> {
        self.order
            .iter()
            .filter_map(|(client, request_id)| match self.get(*client, request_id) {
                Some(Seen::Answered { kind, reply }) => Some(AnswerSnapshot {
                    client: *client,
                    request_id: request_id.clone(),
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
