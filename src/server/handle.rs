//! The server as transports see it: send a request, await its reply.
//!
//! Owns: numbering calls and telling the core when a call is cut off (the
//! transport dropped the future: client deadline or lost connection), so a
//! waiter can keep its place for a retry. Must not: know any wire format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::core::staging::FileIndex;
use crate::core::types::{CallId, RefusalCode, Reply, Request, RequestId};

use super::writer::Job;

/// A message to the core task.
pub enum CoreMsg {
    Call {
        id: CallId,
        request_id: RequestId,
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    Dropped(CallId),
}

/// The server is stopping (or stopped after a storage failure).
#[derive(Debug, thiserror::Error)]
#[error("the server is shutting down")]
pub struct ShuttingDown;

/// A cheap, cloneable way into a running server.
#[derive(Clone)]
pub struct Handle {
    pub(super) core: mpsc::UnboundedSender<CoreMsg>,
    pub(super) writer: mpsc::UnboundedSender<Job>,
    pub(super) next_call: Arc<AtomicU64>,
}

struct CutOff {
    id: CallId,
    core: mpsc::UnboundedSender<CoreMsg>,
    answered: bool,
}

impl Drop for CutOff {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.core.send(CoreMsg::Dropped(self.id));
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
        let id = CallId(self.next_call.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.core
            .send(CoreMsg::Call {
                id,
                request_id,
                request,
                reply: tx,
            })
            .map_err(|_| ShuttingDown)?;
        let mut cut_off = CutOff {
            id,
            core: self.core.clone(),
            answered: false,
        };
        let reply = rx.await.map_err(|_| ShuttingDown);
        cut_off.answered = true;
        reply
    }

    /// Reads a data file by name; bad names are refused.
    ///
    /// # Errors
    /// [`ShuttingDown`] when the server stops first.
    pub async fn read_file(&self, name: &str) -> Result<Result<Vec<u8>, Reply>, ShuttingDown> {
        let file = match FileIndex::parse(name) {
            Ok(file) => file,
            Err(reason) => return Ok(Err(Reply::refused(RefusalCode::InvalidArgument, reason))),
        };
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Read { file, reply: tx })
            .map_err(|_| ShuttingDown)?;
        match rx.await.map_err(|_| ShuttingDown)? {
            Ok(bytes) => Ok(Ok(bytes)),
            Err(e) => Ok(Err(Reply::refused(
                RefusalCode::Error,
                format!("reading {name}: {e}"),
            ))),
        }
    }
}
