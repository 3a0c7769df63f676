//! The server as transports see it: send a request, await its reply.
//!
//! Owns: numbering calls and telling the core when a call is cut off (the
//! transport dropped the future: client deadline or lost connection), so a
//! waiter can keep its place for a retry. Must not: know any wire format.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::core::staging::FileIndex;
use crate::core::types::{CallId, RefusalCode, Reply, Request, RequestId};
use crate::core::Input;

use super::engine::Engine;
use super::writer::Job;

/// Files up to this long are read on the caller's thread.
const INLINE_READ_BYTES: u64 = 256 << 10;

/// Data-file reads in progress at once; more wait their turn.
pub(super) const MAX_READS: usize = 8;

/// The longest file a read returns: what one gRPC message may carry, less
/// room for the rest of the reply (the content's tag and length, a status).
/// At the message's whole size, a file of its last few bytes was read and
/// then refused by tonic's encoder as OUT_OF_RANGE, not as dlm's refusal.
const MAX_READ_BYTES: u64 = (crate::transport::grpc::MAX_MESSAGE_BYTES - 64) as u64;

/// The default of `--max-read-reply-bytes`: the bytes of file-read replies
/// the server holds at once, from the read until the reply has left.
pub const READ_REPLY_BUDGET: u64 = 256 << 20;

/// The bytes of one file-read reply, counted against the server's budget
/// (`--max-read-reply-bytes`) until this is dropped. A transport keeps it
/// until the reply has left: a peer that never reads its replies then
/// holds up other reads (until its connection ends), not the server's
/// memory.
#[derive(Debug)]
pub struct HeldReply {
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

/// The server is stopping (or stopped after a storage failure).
#[derive(Debug, thiserror::Error)]
#[error("the server is shutting down")]
pub struct ShuttingDown;

/// A cheap, cloneable way into a running server.
#[derive(Clone)]
pub struct Handle {
    pub(super) engine: Arc<Engine>,
}

/// Tells the core when a call's future is dropped before its reply.
struct CutOff<'a> {
    id: CallId,
    engine: &'a Engine,
    answered: bool,
}

impl Drop for CutOff<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.engine.dropped(self.id);
            // Not here: a drop may run anywhere; the writer carries it out.
            self.engine.wake_writer();
        }
    }
}

impl Handle {
    /// Sends `request` to the core and waits for its reply (which the server
    /// sends only once everything it depends on is durable).
    ///
    /// # Errors
    /// [`ShuttingDown`] when the server stops first.
    pub async fn call(
        &self,
        request_id: RequestId,
        request: Request,
    ) -> Result<Reply, ShuttingDown> {
        let engine = &*self.engine;
        let id = engine.call_id();
        let (tx, rx) = oneshot::channel();
        let input = Input::Call {
            id,
            request_id,
            request,
        };
        if !engine.step(input, Some((id, tx))) {
            return Err(ShuttingDown);
        }
        let mut cut_off = CutOff {
            id,
            engine,
            answered: false,
        };
        engine.flush_here();
        let reply = rx.await.map_err(|_| ShuttingDown);
        cut_off.answered = true;
        reply
    }

    /// Reads a data file by name; bad names are refused. The content comes
    /// with its share of the server's read-reply budget, which the caller
    /// holds until the reply has left; a read waits for the share first.
    ///
    /// # Errors
    /// [`ShuttingDown`] when the server stops first.
    pub async fn read_file(
        &self,
        name: &str,
    ) -> Result<Result<(Vec<u8>, HeldReply), Reply>, ShuttingDown> {
        let file = match FileIndex::parse(name) {
            Ok(file) => file,
            Err(reason) => return Ok(Err(Reply::refused(RefusalCode::InvalidArgument, reason))),
        };
        let (tx, rx) = oneshot::channel();
        if !self.engine.queue(Job::Read { file, reply: tx }) {
            return Err(ShuttingDown);
        }
        self.engine.flush_here();
        // The writer says how long the file is once every earlier write is
        // in it; the bytes are read here, outside the writer (appends only
        // ever go past that length).
        let read = match rx.await.map_err(|_| ShuttingDown)? {
            Ok(len) if len > MAX_READ_BYTES => {
                let reason = format!("{name} holds {len} bytes, more than a reply may carry");
                return Ok(Err(Reply::refused(RefusalCode::Error, reason)));
            }
            Ok(len) => {
                let held = self.hold_reply(len).await?;
                self.read_prefix(file, len, held).await?
            }
            Err(e) => Err(e),
        };
        match read {
            Ok(read) => Ok(Ok(read)),
            Err(e) => Ok(Err(Reply::refused(
                RefusalCode::Error,
                format!("reading {name}: {e}"),
            ))),
        }
    }

    /// Waits for `len` bytes of the read-reply budget (all of it when `len`
    /// is more), before the file's bytes are read into memory.
    async fn hold_reply(&self, len: u64) -> Result<HeldReply, ShuttingDown> {
        let budget = &self.engine.reply_bytes;
        let share = len.min(budget.total) as u32;
        let _waiting = Waiting::count(&budget.waiting);
        let permit = budget.bytes.clone().acquire_many_owned(share).await;
        Ok(HeldReply {
            _bytes: permit.map_err(|_| ShuttingDown)?,
        })
    }

    /// Bytes of the read-reply budget taken now (by replies, and by the
    /// read at the head of the queue, which takes what frees up as it
    /// waits, so that smaller reads do not pass a large one), and the reads
    /// waiting for their share: for tests and diagnostics.
    pub fn read_replies(&self) -> (u64, usize) {
        let budget = &self.engine.reply_bytes;
        let held = budget.total - budget.bytes.available_permits() as u64;
        (held, budget.waiting.load(Ordering::Relaxed))
    }

    /// The request budget (`--max-inflight-request-bytes`), which every
    /// transport's requests take their share of while they arrive.
    pub fn request_budget(&self) -> &std::sync::Arc<crate::transport::budget::RequestBudget> {
        &self.engine.request_bytes
    }

    /// Reads the first `len` bytes of `file`, a few reads at once: each
    /// holds a descriptor (the log needs some too) and the file's bytes.
    /// The bytes come back with `held`, their share of the budget.
    async fn read_prefix(
        &self,
        file: FileIndex,
        len: u64,
        held: HeldReply,
    ) -> Result<std::io::Result<(Vec<u8>, HeldReply)>, ShuttingDown> {
        let turn = self
            .engine
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ShuttingDown)?;
        let engine = &*self.engine;
        if engine.blocking_reads && len > INLINE_READ_BYTES {
            // A large file is read on a blocking thread, not on the
            // runtime's (a few MiB take milliseconds). The thread owns the
            // turn and the share: if the call is cut off meanwhile, they
            // go back when the read is over, not while its bytes are still
            // being read into memory.
            let data = engine.data.clone();
            let read = tokio::task::spawn_blocking(move || {
                let read = crate::files::read_prefix(&*data, file, len);
                drop(turn);
                read.map(|bytes| (bytes, held))
            });
            Ok(read
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))))
        } else {
            // A small one, and every read of the simulation, in line.
            let read = crate::files::read_prefix(&*engine.data, file, len);
            drop(turn);
            Ok(read.map(|bytes| (bytes, held)))
        }
    }
}

/// Counts a read as waiting for its share while it lives (also when the
/// read is cut off while waiting).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Waiting<'a> {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::MAX_READ_BYTES;
    use crate::proto::FileReadResponse;
    use crate::transport::grpc::MAX_MESSAGE_BYTES;

    #[test]
    fn the_longest_file_a_read_returns_fits_one_message() {
        let reply = FileReadResponse {
            status: i32::MAX,
            error_message: String::new(),
            content: vec![0; MAX_READ_BYTES as usize],
        };
        assert!(reply.encoded_len() <= MAX_MESSAGE_BYTES);
    }
}
