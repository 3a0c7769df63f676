//! Request-id deduplication with bounded memory.
//!
//! Owns: the map from (client, request id) to either the waiter that is still
//! serving it or the answer it got. Answers are forgotten oldest first once
//! more than `capacity` are kept; a waiter in flight is never forgotten.
//! Must not: decide what a request does — it only remembers.
//!
//! A forgotten answer must not let its request be applied again when a late
//! retry comes. Ids of the form `UUID#SEQ` (what dlm's client library
//! sends: one random UUID per client instance, in lowercase hyphenated form,
//! SEQ counting up from 1) make that checkable in bounded memory: evicting
//! the answer of `UUID#SEQ` raises the *floor* of (client, UUID) to at
//! least SEQ, and an unknown id at or below its floor is
//! [`Dedup::expired`]: it may have been applied, so it must be refused, not
//! served. At most [`FLOORS_KEPT`] floors (or `capacity`, if larger) are
//! kept: the oldest goes first, unless it was raised since it was last
//! looked at (then it goes to the back; a snapshot keeps that flag). Other
//! ids (the Go clients' bare UUIDs, or a third party's `name#7`, whose
//! numbers need not count up) have no floor: for them an evicted answer is
//! forgotten, as before.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;

use super::records::{AnswerSnapshot, FloorSnapshot};
use super::types::{ClientId, Reply};

/// Numbers a waiter for as long as it is queued.
pub type WaiterId = u64;

/// What is known about one (client, request id).
#[derive(Clone, Copy, Debug)]
pub enum Seen<'a> {
    /// An acquire still waiting in a queue.
    Waiting(WaiterId),
    /// Answered; a retry gets this answer again. Shared with the eviction
    /// order, so that a snapshot copies pointers, not answers.
    Answered(&'a Arc<AnswerSnapshot>),
}

/// An acquire still waiting in a queue, under its (client, request id).
#[derive(Debug)]
struct Waiting {
    client: ClientId,
    id: Arc<str>,
    waiter: WaiterId,
}

impl Waiting {
    /// Whether this is the waiter of `(client, id)`.
    fn is(&self, client: ClientId, id: &str) -> bool {
        self.client == client && *self.id == *id
    }
}

/// Whether `answer` is the answer to `(client, id)`.
fn answers(answer: &AnswerSnapshot, client: ClientId, id: &str) -> bool {
    answer.client == client && *answer.request_id == *id
}

/// The dedup table. Lookups only: iteration order never reaches output.
/// Flat tables probed with a borrowed (client, id), not maps of per-client
/// maps (two probes) keyed by owned strings; hashed with SipHash-1-3, as
/// std's maps are, since clients choose the ids, under keys the core
/// derives from its seed (see [`Keys`]).
///
/// The answers' table holds only a pointer per slot: evicting an answer
/// (once per answer remembered, ~`capacity` answers after it was written,
/// long out of the CPU's caches) finds its slot by hash and pointer,
/// touching 8 bytes there, not the 40 of an entry that also carried the
/// client, the id and the kind of entry. The slots of 100,000 answers so
/// take 1-2 MB (131,072 or 262,144 of them) instead of 5-10 MB; with a
/// 2 MiB last-level cache, cachegrind counts 12 % fewer misses in the
/// `core` bench. An id has an entry in at most one of the two tables.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    /// Remembered answers, by the hash of their (client, id).
    answered: HashTable<Arc<AnswerSnapshot>>,
    /// Acquires still waiting: an id here is not in `answered`.
    waiting: HashTable<Waiting>,
    hasher: Keys,
    /// Answers, oldest first, with their hashes: the eviction order and the
    /// snapshot's list. (Evicting finds its entry by hash and pointer, with
    /// no string hashed or compared.)
    order: VecDeque<(u64, Arc<AnswerSnapshot>)>,
    /// The floor of each (client, prefix) that had an answer evicted.
    floors: HashTable<Floor>,
    /// Floors kept at most: `FLOORS_KEPT` or `capacity`, the larger.
    floor_capacity: usize,
    /// The floors' keys with their hashes, in the order they would go
    /// (the snapshot's order too).
    floor_order: VecDeque<(u64, ClientId, Prefix)>,
    /// During a replay: how many of the answers still to be replayed are
    /// ones this table would evict before the replay ends (see
    /// [`Dedup::plan_replay`]).
    doomed: u64,
}

/// The hash of a (client, request id) under one table's keys
/// ([`Dedup::id_hash`]); only that table makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdHash(u64);

/// At least this many floors are kept (one per client instance whose answers
/// were forgotten: ~100 bytes each), whatever the answers' capacity: a
/// client's floor may be dropped only after this many other instances had a
/// floor made since its own last raise.
pub const FLOORS_KEPT: usize = 65_536;

/// The UUID before the `#` of a sequenced request id, as a number.
pub type Prefix = u128;

/// The floor of one (client, prefix).
#[derive(Debug)]
struct Floor {
    client: ClientId,
    prefix: Prefix,
    seq: u64,
    /// Raised since it was last put at the back of the order.
    raised: bool,
}

/// `(UUID, SEQ)` of a request id `UUID#SEQ`, or `None` for any other id.
/// Only one spelling counts, so that two different ids never share a floor:
/// the UUID lowercase and hyphenated (`8-4-4-4-12` hex digits, what the
/// `uuid` crate prints), SEQ a decimal number with no leading zero.
pub fn sequenced(id: &str) -> Option<(Prefix, u64)> {
    // On every new request's path (and every eviction's): read in place,
    // byte by byte, with no search for the `#` (it can only be at 36).
    let (uuid, rest) = id.as_bytes().split_first_chunk::<36>()?;
    let (&hash, digits) = rest.split_first()?;
    if hash != b'#' {
        return None;
    }
    let seq = parse_seq(digits)?;
    Some((parse_uuid_bytes(uuid)?, seq))
}

/// A decimal number with no sign and no leading zero, up to `u64::MAX`.
fn parse_seq(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    let mut value: u64 = 0;
    for &b in digits {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    Some(value)
}

/// A lowercase hyphenated UUID as a number (`None` for any other text).
pub fn parse_uuid(text: &str) -> Option<Prefix> {
    parse_uuid_bytes(text.as_bytes().try_into().ok()?)
}

/// [`parse_uuid`] of its 36 bytes, read eight bytes at a time (SWAR: each
/// eight hex digits are checked and packed with a dozen word operations,
/// not a table lookup and a shift per digit).
fn parse_uuid_bytes(bytes: &[u8; 36]) -> Option<Prefix> {
    let [d1, d2, d3, d4] = [bytes[8], bytes[13], bytes[18], bytes[23]];
    if [d1, d2, d3, d4] != [b'-'; 4] {
        return None;
    }
    // Every slice below is in range (the last word ends at 36): the
    // fallback is never taken, and would read as bad digits if it were.
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
    let half = |at: usize| {
        u64::from(u32::from_le_bytes(
            bytes[at..at + 4].try_into().unwrap_or([0; 4]),
        ))
    };
    // The 32 digits as four words of eight, in order: 8 | 4+4 | 4+4 | 8.
    let (a, a_bad) = hex8(word(0));
    let (b, b_bad) = hex8(half(9) | half(14) << 32);
    let (c, c_bad) = hex8(half(19) | half(24) << 32);
    let (d, d_bad) = hex8(word(28));
    if a_bad | b_bad | c_bad | d_bad != 0 {
        return None;
    }
    let high = u64::from(a) << 32 | u64::from(b);
    let low = u64::from(c) << 32 | u64::from(d);
    Some(Prefix::from(high) << 64 | Prefix::from(low))
}

/// The value of eight lowercase hex digits (the first in the lowest byte of
/// `w`, as [`u64::from_le_bytes`] reads them), and a word that is not zero
/// if any byte is not one (then the value means nothing). No branch: the
/// caller checks four words at once.
#[inline(always)]
fn hex8(w: u64) -> (u32, u64) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of 0x80 or more is bad. For the others, adding a byte constant
    // up to 0x50 carries into no other byte, and sets a byte's high bit
    // once it reaches the constant's complement: b + 0x50 ≥ 0x80 iff
    // b ≥ 0x30, and so on.
    let ascii = w & !HIGH;
    let at_least = |c: u8| ascii.wrapping_add(ONES * u64::from(0x80 - c)) & HIGH;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    let bad = (w & HIGH) | ((digit | letter) ^ HIGH);
    // A digit's low four bits are its value; a letter's (0x61..0x66) are
    // one to six, and it is the kind with bit 6 set: add nine.
    let nibbles = (w & (ONES * 0x0f)) + ((w >> 6) & ONES) * 9;
    // Pack: pairs of bytes, then pairs of those, then the two halves; the
    // first digit ends up the most significant.
    let bytes = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let pairs = ((bytes << 8) | (bytes >> 16)) & 0x0000_ffff_0000_ffff;
    ((((pairs << 16) | (pairs >> 32)) & 0xffff_ffff) as u32, bad)
}

/// The spelling [`parse_uuid`] takes back.
pub fn format_uuid(value: Prefix) -> String {
    let hex = format!("{value:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// How far ahead of an eviction its answer is prefetched.
const EVICT_AHEAD: usize = 2;

/// A hint to the CPU that `at` will be read soon. No effect on what the
/// program computes, on any architecture.
#[inline(always)]
fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it reads nothing into the
    // program, and never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The dedup table's hash keys: SipHash-1-3 keyed by two numbers the core
/// draws from its seed (OS entropy in production). The core reads no
/// randomness of its own, and a simulation hashes the same way on every
/// run of a seed.
#[derive(Clone, Copy, Debug)]
pub struct Keys(pub u64, pub u64);

impl BuildHasher for Keys {
    type Hasher = siphasher::sip::SipHasher13;

    fn build_hasher(&self) -> Self::Hasher {
        siphasher::sip::SipHasher13::new_with_keys(self.0, self.1)
    }
}

impl Keys {
    /// The hash of a (client, request id): the client and the id's length
    /// in one word, then the id's bytes. Whole words from the start, so
    /// SipHash takes the id eight bytes at a time (hashing the pair as a
    /// tuple wrote a 4-byte client first, which left every word of the id
    /// to be assembled across two: ~30 % more instructions). One word of
    /// fixed layout, then the bytes: two different pairs never write the
    /// same bytes.
    #[inline]
    pub fn id(&self, client: ClientId, id: &str) -> u64 {
        let mut h = self.build_hasher();
        h.write_u64(u64::from(client as u32) | (id.len() as u64) << 32);
        h.write(id.as_bytes());
        h.finish()
    }

    /// The hash of a (client, prefix): three whole words.
    #[inline]
    pub fn floor(&self, client: ClientId, prefix: Prefix) -> u64 {
        let mut h = self.build_hasher();
        h.write_u64(u64::from(client as u32));
        h.write_u64((prefix >> 64) as u64);
        h.write_u64(prefix as u64);
        h.finish()
    }
}

impl Dedup {
    /// An empty table that keeps at most `capacity` answers, hashing with
    /// `keys`.
    pub fn new(capacity: usize, keys: Keys) -> Dedup {
        Dedup {
            capacity: capacity.max(1),
            answered: HashTable::new(),
            waiting: HashTable::new(),
            hasher: keys,
            order: VecDeque::new(),
            floors: HashTable::new(),
            floor_capacity: capacity.max(FLOORS_KEPT),
            floor_order: VecDeque::new(),
            doomed: 0,
        }
    }

    fn hash(&self, client: ClientId, id: &str) -> u64 {
        self.hasher.id(client, id)
    }

    /// The hash of `(client, id)` under this table's keys: for a caller
    /// that looks an id up and then remembers its answer, so that the id
    /// is hashed once, not twice ([`Dedup::get_hashed`],
    /// [`Dedup::answer_hashed`]).
    pub fn id_hash(&self, client: ClientId, id: &str) -> IdHash {
        IdHash(self.hash(client, id))
    }

    fn floor_hash(&self, client: ClientId, prefix: Prefix) -> u64 {
        self.hasher.floor(client, prefix)
    }

    /// The answers' slot of `(client, id)` whose hash is `hash`, found or
    /// vacant.
    fn answer_slot(
        &mut self,
        hash: u64,
        client: ClientId,
        id: &str,
    ) -> Slot<'_, Arc<AnswerSnapshot>> {
        let hasher = &self.hasher;
        self.answered.entry(
            hash,
            |a| answers(a, client, id),
            |a| hasher.id(a.client, &a.request_id),
        )
    }

    /// The waiters' slot of `(client, id)` whose hash is `hash`, found or
    /// vacant.
    fn waiting_slot(&mut self, hash: u64, client: ClientId, id: &str) -> Slot<'_, Waiting> {
        let hasher = &self.hasher;
        self.waiting
            .entry(hash, |w| w.is(client, id), |w| hasher.id(w.client, &w.id))
    }

    /// Takes the waiter of `(client, id)` whose hash is `hash` out of its
    /// table, if there is one.
    fn remove_waiting(&mut self, hash: u64, client: ClientId, id: &str) {
        // Usually empty (a lone client's, or a bench's): no probe then.
        if self.waiting.is_empty() {
            return;
        }
        if let Ok(slot) = self.waiting.find_entry(hash, |w| w.is(client, id)) {
            slot.remove();
        }
    }

    /// What is known of `(client, request_id)`.
    pub fn get(&self, client: ClientId, request_id: &str) -> Option<Seen<'_>> {
        self.get_hashed(self.id_hash(client, request_id), client, request_id)
    }

    /// [`Dedup::get`] of an id whose [`Dedup::id_hash`] is `hash`.
    pub fn get_hashed(&self, hash: IdHash, client: ClientId, request_id: &str) -> Option<Seen<'_>> {
        if let Some(w) = self.waiting.find(hash.0, |w| w.is(client, request_id)) {
            return Some(Seen::Waiting(w.waiter));
        }
        self.answered
            .find(hash.0, |a| answers(a, client, request_id))
            .map(Seen::Answered)
    }

    /// Whether `(client, request_id)`, which has no entry, may have been
    /// answered and forgotten: its id is at or below its prefix's floor.
    pub fn expired(&self, client: ClientId, request_id: &str) -> bool {
        let Some((prefix, seq)) = sequenced(request_id) else {
            return false;
        };
        let hash = self.floor_hash(client, prefix);
        self.floors
            .find(hash, |f| f.client == client && f.prefix == prefix)
            .is_some_and(|f| seq <= f.seq)
    }

    /// Raises the floor of the prefix of a forgotten answer's id.
    fn raise_floor(&mut self, client: ClientId, request_id: &str) {
        let Some((prefix, seq)) = sequenced(request_id) else {
            return;
        };
        self.set_floor(client, prefix, seq);
    }

    /// Sets the floor of (client, prefix) to at least `seq`. Beyond the
    /// bound, floors go in the order they were made, except that one raised
    /// since it was last looked at gets a second chance (put at the back):
    /// one raise costs a lookup and no more, and a floor in use stays.
    fn set_floor(&mut self, client: ClientId, prefix: Prefix, seq: u64) {
        self.put_floor(client, prefix, seq, true);
    }

    /// Sets the floor of (client, prefix) to at least `seq`, marking it
    /// raised; a new floor goes to the back of the order, flagged
    /// `new_raised`. Then drops floors beyond the bound.
    fn put_floor(&mut self, client: ClientId, prefix: Prefix, seq: u64, new_raised: bool) {
        let hash = self.floor_hash(client, prefix);
        let hasher = &self.hasher;
        match self.floors.entry(
            hash,
            |f| f.client == client && f.prefix == prefix,
            |f| hasher.floor(f.client, f.prefix),
        ) {
            Slot::Occupied(mut slot) => {
                let floor = slot.get_mut();
                floor.seq = floor.seq.max(seq);
                floor.raised = true;
                return;
            }
            Slot::Vacant(slot) => {
                // Made by an eviction just now: as recent as a raise (else a
                // sweep past flagged floors would drop it first). A restored
                // floor keeps the flag it had.
                slot.insert(Floor {
                    client,
                    prefix,
                    seq,
                    raised: new_raised,
                });
                self.floor_order.push_back((hash, client, prefix));
            }
        }
        while self.floors.len() > self.floor_capacity {
            let Some((hash, client, prefix)) = self.floor_order.pop_front() else {
                break;
            };
            let mine = |f: &Floor| f.client == client && f.prefix == prefix;
            let Ok(mut slot) = self.floors.find_entry(hash, mine) else {
                continue;
            };
            if std::mem::take(&mut slot.get_mut().raised) {
                self.floor_order.push_back((hash, client, prefix));
            } else {
                slot.remove();
            }
        }
    }

    /// Takes back a floor from a snapshot, in the snapshot's order and
    /// with its flag, before the answers. A prefix that is not a UUID in
    /// its one spelling (a snapshot of a version that took any prefix) is
    /// dropped: ids of that form have no floor now.
    pub fn restore_floor(&mut self, floor: &FloorSnapshot, raised: bool) {
        if let Some(prefix) = parse_uuid(&floor.prefix) {
            self.put_floor(floor.client, prefix, floor.seq, raised);
        }
    }

    /// Every floor in the order they would go, and whether each was raised
    /// since it was last looked at: what a restore needs to drop the same
    /// floors, in the same order, as this table would.
    pub fn floors(&self) -> (Vec<FloorSnapshot>, Vec<bool>) {
        self.floor_order
            .iter()
            .filter_map(|(hash, client, prefix)| {
                self.floors
                    .find(*hash, |f| f.client == *client && f.prefix == *prefix)
            })
            .map(|f| {
                let floor = FloorSnapshot {
                    client: f.client,
                    prefix: format_uuid(f.prefix).into(),
                    seq: f.seq,
                };
                (floor, f.raised)
            })
            .unzip()
    }

    /// Marks the request as served by a queued waiter.
    pub fn wait(&mut self, client: ClientId, request_id: &str, waiter: WaiterId) {
        self.wait_hashed(self.id_hash(client, request_id), client, request_id, waiter);
    }

    /// [`Dedup::wait`] of an id whose [`Dedup::id_hash`] is `hash`.
    pub fn wait_hashed(
        &mut self,
        hash: IdHash,
        client: ClientId,
        request_id: &str,
        waiter: WaiterId,
    ) {
        debug_assert_eq!(hash.0, self.hash(client, request_id));
        // The core asks only for ids it has no answer to; if one did, its
        // answer leaves the order too (table and order agree, and a
        // snapshot holds no answer the table lost).
        // (`find_entry`, not `entry`: a vacant entry would reserve room in
        // a table this call does not add to.)
        let found = self
            .answered
            .find_entry(hash.0, |a| answers(a, client, request_id));
        if let Ok(slot) = found {
            let (old, _) = slot.remove();
            self.order.retain(|(_, a)| !Arc::ptr_eq(a, &old));
        }
        match self.waiting_slot(hash.0, client, request_id) {
            Slot::Occupied(mut slot) => slot.get_mut().waiter = waiter,
            Slot::Vacant(slot) => {
                slot.insert(Waiting {
                    client,
                    id: request_id.into(),
                    waiter,
                });
            }
        }
    }

    /// Forgets a waiter that left without an answer (its place expired).
    pub fn forget_waiter(&mut self, client: ClientId, request_id: &str) {
        let hash = self.hash(client, request_id);
        self.remove_waiting(hash, client, request_id);
    }

    /// Remembers the answer to a request, evicting the oldest beyond
    /// capacity. An answer already remembered for the id is replaced in its
    /// place in the eviction order. (The core never answers a remembered id
    /// twice; a replay does when the live server had evicted the first
    /// answer and a restart keeps more answers: the replay must end with the
    /// answer the live server gave last.)
    pub fn answer(&mut self, answer: Arc<AnswerSnapshot>) {
        let hash = self.id_hash(answer.client, &answer.request_id);
        self.answer_hashed(hash, answer);
    }

    /// [`Dedup::answer`] of an answer whose id's [`Dedup::id_hash`] is
    /// `hash`.
    pub fn answer_hashed(&mut self, hash: IdHash, answer: Arc<AnswerSnapshot>) {
        debug_assert_eq!(hash.0, self.hash(answer.client, &answer.request_id));
        let hash = hash.0;
        // A waiter answered: its entry goes, the answer takes its place.
        self.remove_waiting(hash, answer.client, &answer.request_id);
        match self.answer_slot(hash, answer.client, &answer.request_id) {
            Slot::Occupied(mut slot) => {
                let old = std::mem::replace(slot.get_mut(), answer.clone());
                // Rare (see above): a scan of the order is fine.
                if let Some(place) = self.order.iter_mut().find(|(_, a)| Arc::ptr_eq(a, &old)) {
                    place.1 = answer;
                }
                return;
            }
            Slot::Vacant(slot) => {
                slot.insert(answer.clone());
            }
        }
        self.order.push_back((hash, answer));
        self.evict();
    }

    /// Takes back an answer from a snapshot (oldest first).
    pub fn restore(&mut self, answer: Arc<AnswerSnapshot>) {
        let hash = self.hash(answer.client, &answer.request_id);
        if self
            .waiting
            .find(hash, |w| w.is(answer.client, &answer.request_id))
            .is_some()
        {
            return;
        }
        match self.answer_slot(hash, answer.client, &answer.request_id) {
            Slot::Occupied(_) => return,
            Slot::Vacant(slot) => {
                slot.insert(answer.clone());
            }
        }
        self.order.push_back((hash, answer));
        self.evict();
    }

    /// Before a replay of a log that holds `answers` answers. Answers leave
    /// the table oldest first, so all but the last `capacity` of the log's
    /// answers, and every answer the table holds before the replay, would
    /// be evicted before the replay ends. [`Dedup::replayed`] passes over
    /// the log's doomed ones: the answers already held are evicted first,
    /// then each doomed answer's floor is raised as it comes (the order in
    /// which their evictions would raise them), and none of them enters the
    /// table. That leaves the table an answer-by-answer replay leaves,
    /// because the core never answers an id it remembers: an answer in a
    /// log never replaces one in the table. (A log written under a smaller
    /// capacity can break that; then an id answered twice keeps its last
    /// answer or its floor, as an eviction would leave it.) A count that is
    /// too low only passes over fewer; one too high would pass over answers
    /// that should stay, so it must come from the log itself.
    pub fn plan_replay(&mut self, answers: u64) {
        self.doomed = answers.saturating_sub(self.capacity as u64);
    }

    /// Takes a replayed answer: remembers it, or passes over it if the
    /// plan says it would be evicted before the replay ends.
    pub fn replayed(&mut self, answer: Arc<AnswerSnapshot>) {
        if self.doomed == 0 {
            self.answer(answer);
            return;
        }
        self.doomed -= 1;
        // Everything remembered is older than this answer, so it would go
        // first, in its order.
        self.evict_to(0);
        // Only waiters are left, and a replay has none; if one had this id,
        // the answer would replace it and go with it.
        if !self.waiting.is_empty() {
            let hash = self.hash(answer.client, &answer.request_id);
            self.remove_waiting(hash, answer.client, &answer.request_id);
        }
        self.raise_floor(answer.client, &answer.request_id);
    }

    fn evict(&mut self) {
        self.evict_to(self.capacity);
    }

    /// Evicts the oldest answers until at most `keep` are left.
    fn evict_to(&mut self, keep: usize) {
        while self.order.len() > keep {
            let Some((hash, old)) = self.order.pop_front() else {
                break;
            };
            self.prefetch_next_evictions();
            // By pointer: the slot's 8 bytes are all this reads there.
            if let Ok(slot) = self.answered.find_entry(hash, |a| Arc::ptr_eq(a, &old)) {
                slot.remove();
            }
            self.raise_floor(old.client, &old.request_id);
        }
    }

    /// Asks the CPU to bring into cache what the next evictions will touch,
    /// an operation or two before they do: the answer two places on, and
    /// the id and token of the next one (whose answer the previous call
    /// asked for). Evicting is otherwise a chain of cache misses on memory
    /// written ~`capacity` operations ago.
    #[inline]
    fn prefetch_next_evictions(&self) {
        if let Some((_, later)) = self.order.get(EVICT_AHEAD) {
            prefetch(Arc::as_ptr(later).cast());
        }
        if let Some((_, next)) = self.order.front() {
            prefetch(next.request_id.as_ptr());
            if let Reply::Granted(grant) = &next.reply {
                prefetch(grant.token.as_ptr());
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

    const KEYS: Keys = Keys(1, 2);

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

    /// A client instance's prefix, and another.
    const P: &str = "6f1c2e0a-5d3b-4f7e-9a2b-1c3d4e5f6a7b";
    const Q: &str = "00000000-0000-0000-0000-0000000000ff";

    /// The request id `P#n`.
    fn p(n: u64) -> String {
        format!("{P}#{n}")
    }

    fn prefix() -> Prefix {
        parse_uuid(P).expect("a UUID")
    }

    #[test]
    fn only_uuid_hash_number_ids_are_sequenced() {
        let value = 0x6f1c2e0a_5d3b_4f7e_9a2b_1c3d4e5f6a7b;
        assert_eq!(sequenced(&p(12)), Some((value, 12)));
        assert_eq!(sequenced(&p(0)), Some((value, 0)));
        assert_eq!(sequenced(&p(u64::MAX)), Some((value, u64::MAX)));
        assert_eq!(format_uuid(value), P);
        assert_eq!(parse_uuid(&format_uuid(0)), Some(0));
        assert_eq!(parse_uuid(&format_uuid(u128::MAX)), Some(u128::MAX));
        for id in [
            String::new(),
            "#1".to_owned(),
            "abc#12".to_owned(),
            "name#7".to_owned(),
            P.to_owned(),
            format!("{P}#"),
            format!("{P}#01"),
            format!("{P}#1x"),
            format!("{P}#+1"),
            format!("{P}#1#2"),
            format!("{P}#18446744073709551616"),
            format!("{}#1", P.to_uppercase()),
            format!("{}#1", P.replace('-', "")),
            format!("{{{P}}}#1"),
            format!("x{P}#1"),
            format!("{}-#1", &P[..35]),
            format!("{}g#1", &P[..35]),
            format!("{P}#\u{e9}"),
            format!("{}\u{e9}#1", &P[..34]),
        ] {
            assert_eq!(sequenced(&id), None, "{id:?}");
        }
    }

    /// The plain reading of the one spelling, to check the fast one by.
    fn sequenced_plainly(id: &str) -> Option<(Prefix, u64)> {
        let (prefix, seq) = id.split_once('#')?;
        let hex: String = prefix.split('-').collect();
        let groups: Vec<usize> = prefix.split('-').map(str::len).collect();
        let canonical_uuid = groups == [8, 4, 4, 4, 12]
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let canonical_seq = !seq.is_empty()
            && seq.bytes().all(|b| b.is_ascii_digit())
            && (seq == "0" || !seq.starts_with('0'));
        if !(canonical_uuid && canonical_seq) {
            return None;
        }
        Some((Prefix::from_str_radix(&hex, 16).ok()?, seq.parse().ok()?))
    }

    #[test]
    fn the_fast_reading_of_an_id_is_the_plain_one() {
        let mut ids = vec![p(1), p(0), p(u64::MAX), format!("{P}#18446744073709551616")];
        // Every byte value at every place of a sequenced id (those above
        // 0x7f as the two bytes of a UTF-8 character), and every digit
        // and letter in each place of the UUID.
        let base = p(907);
        for at in 0..base.len() {
            for b in 0..=255u8 {
                let mut chars: Vec<char> = base.chars().collect();
                chars[at] = char::from(b);
                ids.push(chars.into_iter().collect());
            }
            ids.push(format!("{}{}", &base[..at], &base[at + 1..]));
            ids.push(format!("{}0{}", &base[..at], &base[at..]));
        }
        let hex = b"0123456789abcdef";
        let mut digits = P.as_bytes().to_vec();
        for (i, at) in (0..36).filter(|&at| P.as_bytes()[at] != b'-').enumerate() {
            digits[at] = hex[(i * 7 + at) % 16];
        }
        let varied = String::from_utf8(digits).expect("ASCII");
        for uuid in [P, Q, varied.as_str()] {
            for at in (0..36).filter(|&at| uuid.as_bytes()[at] != b'-') {
                for &digit in hex {
                    let mut bytes = uuid.as_bytes().to_vec();
                    bytes[at] = digit;
                    let uuid = String::from_utf8(bytes).expect("ASCII");
                    ids.push(format!("{uuid}#1"));
                }
            }
        }
        for id in ids {
            assert_eq!(sequenced(&id), sequenced_plainly(&id), "{id:?}");
        }
    }

    #[test]
    fn an_evicted_answer_raises_its_prefix_floor() {
        let mut d = Dedup::new(2, KEYS);
        d.answer(answer(1, &p(5), RequestKind::Renew, Reply::Done));
        d.answer(answer(1, &p(3), RequestKind::Renew, Reply::Done));
        assert!(!d.expired(1, &p(1)), "nothing forgotten yet");
        d.answer(answer(1, &p(9), RequestKind::Renew, Reply::Done));
        // p#5 went: everything of p up to 5 that is not remembered may have
        // been answered.
        for (n, expired) in [(1, true), (5, true), (6, false), (10, false)] {
            assert_eq!(d.expired(1, &p(n)), expired, "{n}");
        }
        assert!(!d.expired(2, &p(1)), "another client's prefix");
        assert!(!d.expired(1, &format!("{Q}#1")), "another prefix");
        d.answer(answer(2, "x", RequestKind::Renew, Reply::Done));
        d.answer(answer(2, "name#7", RequestKind::Renew, Reply::Done));
        d.answer(answer(2, "name#8", RequestKind::Renew, Reply::Done));
        d.answer(answer(2, "y", RequestKind::Renew, Reply::Done));
        assert!(d.get(2, "name#7").is_none(), "name#7 was forgotten");
        assert!(d.expired(1, &p(3)), "the floor only rises");
        assert_eq!(d.floors().0.len(), 1, "ids of other forms leave no floor");
        assert!(
            !d.expired(2, "name#1"),
            "a third party's numbers need not count up"
        );
    }

    #[test]
    fn floors_are_bounded_oldest_unraised_first_and_restore_in_order() {
        let mut d = Dedup::new(1, KEYS);
        d.floor_capacity = 2;
        let clients = |d: &Dedup| d.floors().0.iter().map(|f| f.client).collect::<Vec<_>>();
        d.set_floor(1, prefix(), 3);
        d.set_floor(2, prefix(), 7);
        // All three as recent: one pass clears the flags, the oldest goes.
        d.set_floor(3, prefix(), 1);
        assert!(!d.expired(1, &p(3)) && d.expired(2, &p(7)) && d.expired(3, &p(1)));
        // 2 raised since: it stays, and 3, the oldest not raised, goes.
        d.set_floor(2, prefix(), 8);
        d.set_floor(4, prefix(), 1);
        assert!(d.expired(2, &p(8)) && d.expired(4, &p(1)) && !d.expired(3, &p(1)));
        // The snapshot lists them in the order they would go, with their
        // flags (4 is new, so as recent as a raise; 2's flag was spent);
        // a restore then drops the same one next.
        assert_eq!(clients(&d), [4, 2]);
        assert_eq!(d.floors().1, [true, false]);
        let mut restored = Dedup::new(1, KEYS);
        restored.floor_capacity = 2;
        let (floors, raised) = d.floors();
        for (floor, raised) in floors.iter().zip(raised) {
            restored.restore_floor(floor, raised);
        }
        assert_eq!(restored.floors(), d.floors());
        d.set_floor(5, prefix(), 1);
        restored.set_floor(5, prefix(), 1);
        assert_eq!(clients(&d), clients(&restored));
        assert!(!d.expired(2, &p(8)), "2 went");
        assert!(!restored.expired(2, &p(8)), "2 went there too");
        // Many raises of one floor keep one place for it.
        for n in 0..1000 {
            d.answer(answer(5, &p(10 + n), RequestKind::Renew, Reply::Done));
        }
        assert_eq!(d.floor_order.len(), d.floors.len());
        assert!(d.expired(5, &p(1008)) && !d.expired(5, &p(1009)));
    }

    /// A restore keeps each floor's second chance: a floor the live table
    /// would keep (raised since it was last looked at) is not the one a
    /// restarted server drops instead.
    #[test]
    fn a_restore_keeps_each_floors_second_chance() {
        let mut live = Dedup::new(1, KEYS);
        live.floor_capacity = 2;
        for client in 1..=3 {
            live.set_floor(client, prefix(), 5);
        }
        // Floors of 2 and 3, neither raised since the sweep that dropped 1.
        assert_eq!(live.floors().1, [false, false]);
        let mut restored = Dedup::new(1, KEYS);
        restored.floor_capacity = 2;
        let (floors, raised) = live.floors();
        for (floor, raised) in floors.iter().zip(raised) {
            restored.restore_floor(floor, raised);
        }
        // 2 is raised, then a new floor drops the oldest not raised: 3.
        for d in [&mut live, &mut restored] {
            d.set_floor(2, prefix(), 6);
            d.set_floor(9, prefix(), 1);
            assert!(d.expired(2, &p(6)), "2 was in use and stays");
            assert!(!d.expired(3, &p(5)), "3 went");
        }
        assert_eq!(live.floors(), restored.floors());
    }

    #[test]
    fn a_restored_floor_whose_prefix_is_not_a_uuid_is_dropped() {
        let mut d = Dedup::new(1, KEYS);
        for prefix in ["c1", "a#b", &P.to_uppercase()] {
            d.restore_floor(
                &FloorSnapshot {
                    client: 1,
                    prefix: prefix.into(),
                    seq: 9,
                },
                true,
            );
        }
        assert!(d.floors().0.is_empty());
        d.restore_floor(
            &FloorSnapshot {
                client: 1,
                prefix: P.into(),
                seq: 9,
            },
            false,
        );
        assert!(d.expired(1, &p(9)) && !d.expired(1, &p(10)));
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let mut d = Dedup::new(2, KEYS);
        for i in 0..3 {
            d.answer(answer(1, &format!("r{i}"), RequestKind::Renew, Reply::Done));
        }
        assert!(d.get(1, "r0").is_none());
        assert!(d.get(1, "r1").is_some());
        assert!(d.get(1, "r2").is_some());
        assert_eq!(d.len(), 2);
    }

    /// The two tables against a plain model (a list of answers, oldest
    /// first, and a map of waiters) over thousands of mixed operations: the
    /// answers' table grows and rehashes, answers leave oldest first,
    /// waiters are never evicted, and an id is known one way at a time.
    #[test]
    fn the_tables_agree_with_a_plain_model() {
        use std::collections::BTreeMap;
        const CAPACITY: usize = 50;
        let mut d = Dedup::new(CAPACITY, KEYS);
        let mut answered: VecDeque<(ClientId, String)> = VecDeque::new();
        let mut waiting: BTreeMap<(ClientId, String), WaiterId> = BTreeMap::new();
        // A fixed sequence from a small linear congruential generator.
        let mut x: u64 = 12345;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for step in 0..20_000u64 {
            let client = next(3) as ClientId;
            let id = format!("r{}", next(400));
            let key = (client, id.clone());
            match next(4) {
                0 => {
                    // An answer under the id leaves with it (the core does
                    // not do this; the table allows it).
                    d.wait(client, &id, step);
                    answered.retain(|k| *k != key);
                    waiting.insert(key, step);
                }
                1 => {
                    d.forget_waiter(client, &id);
                    waiting.remove(&key);
                }
                _ => {
                    d.answer(answer(client, &id, RequestKind::Renew, Reply::Done));
                    waiting.remove(&key);
                    // An answer already kept is replaced in its place.
                    if !answered.contains(&key) {
                        answered.push_back(key);
                        if answered.len() > CAPACITY {
                            answered.pop_front();
                        }
                    }
                }
            }
            assert_eq!(d.len(), answered.len());
            if step % 97 == 0 {
                for client in 0..3 as ClientId {
                    for n in 0..400 {
                        let key = (client, format!("r{n}"));
                        let seen = d.get(client, &key.1);
                        match (waiting.get(&key), answered.contains(&key)) {
                            (Some(&w), _) => {
                                assert!(matches!(seen, Some(Seen::Waiting(v)) if v == w), "{key:?}")
                            }
                            (None, true) => assert!(
                                matches!(seen, Some(Seen::Answered(a)) if a.client == client && *a.request_id == *key.1),
                                "{key:?}"
                            ),
                            (None, false) => assert!(seen.is_none(), "{key:?}"),
                        }
                    }
                }
                let order: Vec<_> = d
                    .answers()
                    .iter()
                    .map(|a| (a.client, a.request_id.to_string()))
                    .collect();
                assert_eq!(order, Vec::from(answered.clone()));
            }
        }
    }

    #[test]
    fn waiter_is_replaced_by_its_answer() {
        let mut d = Dedup::new(4, KEYS);
        d.wait(1, "a", 7);
        assert!(matches!(d.get(1, "a"), Some(Seen::Waiting(7))));
        d.answer(answer(1, "a", RequestKind::Acquire, Reply::Done));
        assert!(matches!(d.get(1, "a"), Some(Seen::Answered(_))));
        d.forget_waiter(1, "a");
        assert!(d.get(1, "a").is_some(), "an answer is not a waiter");
    }

    #[test]
    fn a_waiter_over_an_answer_takes_the_answer_out_of_the_order_too() {
        let mut d = Dedup::new(4, KEYS);
        d.answer(answer(1, "a", RequestKind::Acquire, Reply::Done));
        d.answer(answer(1, "b", RequestKind::Acquire, Reply::Done));
        d.wait(1, "a", 9);
        assert!(matches!(d.get(1, "a"), Some(Seen::Waiting(9))));
        let ids: Vec<_> = d.answers().iter().map(|a| a.request_id.clone()).collect();
        assert_eq!(ids, [Box::from("b")], "no answer the table no longer holds");
    }

    #[test]
    fn answers_are_shared_oldest_first_and_a_new_answer_replaces_in_place() {
        let mut d = Dedup::new(2, KEYS);
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

        let mut restored = Dedup::new(2, KEYS);
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
