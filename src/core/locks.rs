//! One lock: its current grant and its queue of waiters.
//!
//! Owns: the holder (token, fencing number, lease deadline, staged appends)
//! and the FIFO wait queue. Must not: decide policy (who is granted next,
//! when a lease ends); `Core` does that and keeps timers in step.

use std::collections::VecDeque;

use super::dedup::{IdHash, WaiterId};
use super::staging::StagedAppend;
use super::time::{Millis, Time};
use super::types::{CallId, ClientId, Fence, GrantInfo, LockName, RequestId, Token};

/// The current grant of a lock.
#[derive(Clone, Debug)]
pub struct Grant {
    pub client: ClientId,
    pub token: Token,
    pub fence: Fence,
    /// Lease length; renewals without a length reuse it.
    pub lease: Millis,
    /// When the lease runs out (the grant is gone at exactly this time).
    pub deadline: Time,
    /// Appends staged under this grant (default lock only), in order.
    pub staged: Vec<StagedAppend>,
    /// Bytes staged, to bound memory.
    pub staged_bytes: u64,
}

impl Grant {
    /// The grant as its holder sees it.
    pub fn info(&self, lock: &LockName) -> GrantInfo {
        GrantInfo {
            lock: lock.clone(),
            token: self.token.clone(),
            fence: self.fence,
            lease: self.lease,
        }
    }
}

/// A queued acquire.
#[derive(Clone, Debug)]
pub struct Waiter {
    pub id: WaiterId,
    pub client: ClientId,
    pub request_id: RequestId,
    /// Its [`super::dedup::Dedup::id_hash`], when it is deduplicated.
    pub request_hash: Option<IdHash>,
    /// Calls waiting for the answer: one, or more when a retry arrived while
    /// the first call was still open; none while cut off.
    pub calls: Vec<CallId>,
    /// Lease the grant will carry.
    pub lease: Millis,
    /// When the waiter's own wait timeout passes.
    pub wait_deadline: Option<Time>,
    /// While cut off: until when its place is kept for a retry.
    pub detached_until: Option<Time>,
}

/// A lock: a grant or none, and the waiters in arrival order.
///
/// Invariant kept by `Core`: a lock without a holder has no waiters.
#[derive(Debug, Default)]
pub struct LockState {
    pub holder: Option<Grant>,
    pub waiters: VecDeque<Waiter>,
}

impl LockState {
    /// True when the lock can be forgotten.
    pub fn is_idle(&self) -> bool {
        self.holder.is_none() && self.waiters.is_empty()
    }

    /// The waiter with `id`.
    pub fn waiter_mut(&mut self, id: WaiterId) -> Option<&mut Waiter> {
        self.waiters.iter_mut().find(|w| w.id == id)
    }

    /// Takes the waiter with `id` out of the queue, wherever it stands.
    pub fn remove_waiter(&mut self, id: WaiterId) -> Option<Waiter> {
        let at = self.waiters.iter().position(|w| w.id == id)?;
        self.waiters.remove(at)
    }
}

/// Checks a name given for a lock.
///
/// # Errors
/// A one-line reason when the name is too long or has control characters.
pub fn validate_lock_name(name: &LockName) -> Result<(), String> {
    if name.len() > 256 {
        return Err(format!("lock name is {} bytes; at most 256", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err("lock name has control characters".to_owned());
    }
    Ok(())
}
