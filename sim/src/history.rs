//! The history of one simulated run, and the invariants checked on it.
//!
//! Two sides are recorded. The clients' side: which grants they were told
//! about (token, fencing number), which appends were acknowledged, refused or
//! left unknown, how each release ended, and every operation the server
//! accepted with a token (invoke and acknowledge times). The server's side,
//! taken from the core's outputs as it makes them: when each grant began and
//! ended (a crash ends every grant; recovery re-opens those that survived),
//! and every queue event. The invariants:
//!
//! 1. mutual exclusion — per lock, grant intervals never overlap; fencing
//!    numbers of acknowledged grants strictly increase in grant order, and,
//!    for clients of the client library (tier 2), in the order the clients
//!    learned of them: the library hands out a grant only while it lasts,
//!    never after the lock went on to a later grant (tier 1's model clients
//!    take the server's answer as it comes, which may be a remembered grant
//!    that has since run out);
//!    no operation is accepted with a token that was not current at some
//!    instant between its invocation and its acknowledgement;
//! 2. atomic critical sections — the files hold, in fencing order, the
//!    appends of exactly the committed grants: every acknowledged release's
//!    acknowledged appends once, nothing of a grant whose release was refused
//!    or never sent, all-or-nothing for an unacknowledged release;
//! 3. no duplicates — no append appears twice;
//! 4. FIFO — every grant to a waiter goes to the head of its queue;
//! 5. liveness — after the heal phase no live client's operation is pending
//!    longer than the stated bound (checked by the driver).

use std::collections::{BTreeMap, VecDeque};

use dlm::core::records::{Change, GrantSnapshot};
use dlm::core::types::{LockName, Token};
use dlm::core::Trace;

/// What a client learned of one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Refused by the server.
    Refused,
    /// No answer (retries exhausted, or the client crashed).
    Unknown,
}

/// An append a client tried, with its unique content.
#[derive(Clone, Debug)]
pub struct AppendRec {
    pub token: String,
    pub file: usize,
    pub marker: String,
    pub outcome: Outcome,
}

/// A grant a client was told about (one per token, whichever incarnation of
/// the client learned it).
#[derive(Clone, Debug, Default)]
pub struct GrantRec {
    pub lock: String,
    pub client: i32,
    pub fence: u64,
    /// Outcomes of release attempts with this token.
    pub releases: Vec<Outcome>,
}

/// An operation the server accepted with a token.
#[derive(Clone, Debug)]
pub struct TokenOp {
    pub token: String,
    pub what: &'static str,
    pub invoked: u64,
    pub acked: u64,
}

/// One grant's time on the server: `[start, end)`, end `None` while it lasts.
#[derive(Clone, Debug)]
struct Interval {
    start: u64,
    end: Option<u64>,
}

/// Everything recorded in one run, and the violations found.
#[derive(Default)]
pub struct History {
    pub grants: BTreeMap<String, GrantRec>,
    /// (lock, fence) of each grant when a client first learned of it, in
    /// the order they learned.
    learned: Vec<(String, u64)>,
    /// Whether to check that grants were learned of in fencing order.
    check_learned_order: bool,
    pub appends: Vec<AppendRec>,
    pub token_ops: Vec<TokenOp>,
    /// Server side: intervals per token, and the current grant per lock.
    intervals: BTreeMap<Token, Vec<Interval>>,
    fences: BTreeMap<Token, (LockName, u64)>,
    current: BTreeMap<LockName, (Token, u64)>,
    /// Server side: wait queues as the trace reports them.
    queues: BTreeMap<LockName, VecDeque<u64>>,
    /// Violations found while the run went on.
    pub violations: Vec<String>,
}

impl History {
    /// A history whose clients are the client library's: they must learn of
    /// each lock's grants in fencing order too.
    pub fn of_library_clients() -> History {
        History {
            check_learned_order: true,
            ..History::default()
        }
    }

    /// A change the server's core decided at `now`.
    pub fn on_change(&mut self, now: u64, change: &Change) {
        match change {
            Change::Granted {
                lock, token, fence, ..
            } => {
                if let Some((other, other_fence)) = self.current.get(lock) {
                    self.violations.push(format!(
                        "mutual exclusion: lock {lock:?} granted (fence {}) at {now} while grant fence {other_fence} ({}) still held",
                        fence.0,
                        short(other)
                    ));
                }
                self.current.insert(lock.clone(), (token.clone(), fence.0));
                self.fences.insert(token.clone(), (lock.clone(), fence.0));
                self.intervals.entry(token.clone()).or_default().push(Interval {
                    start: now,
                    end: None,
                });
            }
            Change::Released { lock, fence } | Change::Ended { lock, fence } => match self.current.remove(lock) {
                Some((token, current_fence)) if current_fence == fence.0 => self.close(&token, now),
                other => self.violations.push(format!(
                    "server ended grant fence {} of lock {lock:?} at {now}, but the current grant is {other:?}",
                    fence.0
                )),
            },
            Change::LeaseSet { lock, fence, .. } => {
                if self.current.get(lock).map(|(_, f)| *f) != Some(fence.0) {
                    self.violations.push(format!(
                        "server set the lease of grant fence {} of lock {lock:?} at {now}, which is not current",
                        fence.0
                    ));
                }
            }
            Change::Staged { .. } | Change::Answered { .. } => {}
        }
    }

    fn close(&mut self, token: &str, now: u64) {
        if let Some(last) = self.intervals.get_mut(token).and_then(|v| v.last_mut()) {
            if last.end.is_none() {
                last.end = Some(now);
            }
        }
    }

    /// A queue event of the server's core.
    pub fn on_trace(&mut self, now: u64, trace: &Trace) {
        match trace {
            Trace::Enqueued { lock, waiter, .. } => self
                .queues
                .entry(lock.clone())
                .or_default()
                .push_back(*waiter),
            Trace::Dequeued {
                lock,
                waiter,
                granted,
            } => {
                let queue = self.queues.entry(lock.clone()).or_default();
                if granted.is_some() && queue.front() != Some(waiter) {
                    self.violations.push(format!(
                        "FIFO: lock {lock:?} granted at {now} to waiter {waiter}, but the head of the queue is {:?}",
                        queue.front()
                    ));
                }
                queue.retain(|w| w != waiter);
            }
        }
    }

    /// The server crashed at `now`: every grant ends there, queues are gone.
    pub fn on_crash(&mut self, now: u64) {
        let current = std::mem::take(&mut self.current);
        for (token, _) in current.values() {
            self.close(token, now);
        }
        self.queues.clear();
    }

    /// The server recovered at `now` with these grants still held.
    pub fn on_recover(&mut self, now: u64, grants: &[GrantSnapshot]) {
        for grant in grants {
            self.current
                .insert(grant.lock.clone(), (grant.token.clone(), grant.fence.0));
            self.fences
                .insert(grant.token.clone(), (grant.lock.clone(), grant.fence.0));
            self.intervals
                .entry(grant.token.clone())
                .or_default()
                .push(Interval {
                    start: now,
                    end: None,
                });
        }
    }

    /// A client was told it holds `token`.
    pub fn grant_acked(&mut self, client: i32, lock: &str, token: &str, fence: u64) {
        let rec = self.grants.entry(token.to_owned()).or_insert_with(|| {
            self.learned.push((lock.to_owned(), fence));
            GrantRec {
                lock: lock.to_owned(),
                client,
                fence,
                releases: Vec::new(),
            }
        });
        if rec.fence != fence || rec.lock != lock {
            self.violations.push(format!(
                "token {} acknowledged with fence {fence} on {lock:?}, earlier with fence {} on {:?}",
                short(token),
                rec.fence,
                rec.lock
            ));
        }
    }

    /// Checks everything that needs the whole run: mutual exclusion over the
    /// acknowledged grants, token currency, and the final files.
    pub fn check(&self, files: &[Vec<u8>]) -> Vec<String> {
        let mut out = self.violations.clone();
        self.check_grants(&mut out);
        if self.check_learned_order {
            self.check_learned_order(&mut out);
        }
        self.check_token_ops(&mut out);
        self.check_files(files, &mut out);
        out
    }

    fn check_grants(&self, out: &mut Vec<String>) {
        let mut per_lock: BTreeMap<&str, Vec<(u64, u64, &str)>> = BTreeMap::new();
        for (token, rec) in &self.grants {
            let Some(first) = self.intervals.get(token.as_str()).and_then(|v| v.first()) else {
                out.push(format!(
                    "client {} was told it holds lock {:?} with fence {} ({}), a grant the server never made",
                    rec.client,
                    rec.lock,
                    rec.fence,
                    short(token)
                ));
                continue;
            };
            if let Some((lock, fence)) = self.fences.get(token.as_str()) {
                if *fence != rec.fence || **lock != *rec.lock {
                    out.push(format!(
                        "token {} told fence {} but granted fence {fence}",
                        short(token),
                        rec.fence
                    ));
                }
            }
            per_lock
                .entry(&rec.lock)
                .or_default()
                .push((first.start, rec.fence, token));
        }
        for (lock, mut grants) in per_lock {
            grants.sort();
            for pair in grants.windows(2) {
                if pair[1].1 <= pair[0].1 {
                    out.push(format!(
                        "fencing: lock {lock:?} grant at {} has fence {} after a grant at {} with fence {}",
                        pair[1].0, pair[1].1, pair[0].0, pair[0].1
                    ));
                }
            }
        }
    }

    /// Per lock, each grant a client learned of has a higher fence than every
    /// grant learned of before it: a client is never handed a grant the lock
    /// has already moved on from.
    fn check_learned_order(&self, out: &mut Vec<String>) {
        let mut highest: BTreeMap<&str, u64> = BTreeMap::new();
        for (lock, fence) in &self.learned {
            let seen = highest.entry(lock).or_default();
            if *fence <= *seen {
                out.push(format!(
                    "fencing: a client learned of lock {lock:?}'s grant with fence {fence} after one with fence {seen} was learned of"
                ));
            }
            *seen = (*seen).max(*fence);
        }
    }

    fn check_token_ops(&self, out: &mut Vec<String>) {
        for op in &self.token_ops {
            let current = self
                .intervals
                .get(op.token.as_str())
                .is_some_and(|intervals| {
                    intervals
                        .iter()
                        .any(|i| i.start <= op.acked && i.end.is_none_or(|end| end >= op.invoked))
                });
            if !current {
                out.push(format!(
                    "stale token: {} accepted with token {} that was not current between {} and {}",
                    op.what,
                    short(&op.token),
                    op.invoked,
                    op.acked
                ));
            }
        }
    }

    fn check_files(&self, files: &[Vec<u8>], out: &mut Vec<String>) {
        // Every byte of every file must belong to a marker `<…>`.
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let markers: BTreeMap<&str, &AppendRec> = self
            .appends
            .iter()
            .map(|a| (a.marker.as_str(), a))
            .collect();
        for (file, content) in files.iter().enumerate() {
            let Ok(text) = std::str::from_utf8(content) else {
                out.push(format!("file_{file} is not text"));
                continue;
            };
            let mut last_fence = 0;
            let mut rest = text;
            while !rest.is_empty() {
                let Some(end) = rest.find('>').filter(|_| rest.starts_with('<')) else {
                    out.push(format!(
                        "file_{file} has bytes no append wrote: {:?}",
                        &rest[..rest.len().min(40)]
                    ));
                    break;
                };
                let marker = &rest[..=end];
                rest = &rest[end + 1..];
                let Some(append) = markers.get(marker) else {
                    out.push(format!(
                        "file_{file} has {marker}, which no client appended"
                    ));
                    continue;
                };
                if append.file != file {
                    out.push(format!(
                        "{marker} appended to file_{} but found in file_{file}",
                        append.file
                    ));
                }
                *seen.entry(marker).or_insert(0) += 1;
                let fence = self.grants.get(&append.token).map_or(0, |g| g.fence);
                if fence < last_fence {
                    out.push(format!("file_{file}: {marker} (fence {fence}) after an append of fence {last_fence}"));
                }
                last_fence = fence;
            }
        }
        for (marker, count) in &seen {
            if *count > 1 {
                out.push(format!("duplicate: {marker} appears {count} times"));
            }
        }
        // Per grant: committed, not committed, or unknown.
        let mut by_grant: BTreeMap<&str, Vec<&AppendRec>> = BTreeMap::new();
        for append in &self.appends {
            by_grant.entry(&append.token).or_default().push(append);
        }
        let count = |a: &AppendRec| seen.get(a.marker.as_str()).copied().unwrap_or(0);
        for (token, appends) in by_grant {
            let releases = self
                .grants
                .get(token)
                .map(|g| g.releases.as_slice())
                .unwrap_or(&[]);
            let committed = releases.contains(&Outcome::Ok);
            let unknown = releases.contains(&Outcome::Unknown);
            let acked: Vec<usize> = appends
                .iter()
                .filter(|a| a.outcome == Outcome::Ok)
                .map(|a| count(a))
                .collect();
            let any_present = appends.iter().any(|a| count(a) > 0);
            if committed {
                if acked.iter().any(|c| *c != 1) {
                    out.push(format!(
                        "atomicity: release of {} acknowledged but its acknowledged appends appear {acked:?} times",
                        short(token)
                    ));
                }
            } else if unknown {
                let all = acked.iter().all(|c| *c == 1);
                let none = !any_present;
                if !(all || none) {
                    out.push(format!(
                        "atomicity: unacknowledged release of {} applied in part: {acked:?}",
                        short(token)
                    ));
                }
            } else if any_present {
                out.push(format!(
                    "atomicity: grant {} was never released (or its release was refused) but its appends are in the files",
                    short(token)
                ));
            }
        }
    }
}

fn short(token: &str) -> &str {
    &token[..token.len().min(8)]
}
