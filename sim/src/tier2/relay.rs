//! The relay host: a gRPC proxy between some clients and the server that
//! duplicates requests.
//!
//! turmoil's TCP delivers every byte once and in order, so duplicates have
//! to be made above it. The relay forwards each unary call to the server
//! with the caller's deadline, and, drawn from the seed, issues some calls a
//! second time, at once or up to a few hundred milliseconds later (then
//! often after the first answer: a late duplicate, reordered behind later
//! traffic). The second answer is thrown away. The server must answer a
//! duplicate with the first answer and never apply it twice.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dlm::proto::lock_service_client::LockServiceClient;
use dlm::proto::lock_service_server::{LockService, LockServiceServer};
use dlm::proto::{
    self, ClientInitArgs, FileArgs, FileReadArgs, FileReadResponse, LeaseArgs, LeaseResponse,
    LockArgs, LockResponse, StatusArgs, StatusResponse,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::net::{self, Incoming};
use super::{ms, Shared};

/// The header that carries a call's deadline.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The proxy: where calls go, and the state that decides duplicates.
#[derive(Clone)]
struct Relay {
    upstream: LockServiceClient<Channel>,
    shared: Arc<Shared>,
}

impl Relay {
    /// Whether to send this call twice, and after how long.
    fn duplicate(&self, method: &'static str) -> Option<u64> {
        self.shared.with(|s| {
            if s.healed || !s.relay_rng.chance(s.scenario.duplicate) {
                return None;
            }
            s.faults.duplicates += 1;
            let delay = s.relay_rng.between(0, s.scenario.duplicate_delay_max);
            s.log(|| format!("relay duplicates a {method} after {delay} ms"));
            Some(delay)
        })
    }

    /// Forwards `request` with `call`, maybe twice.
    async fn forward<T, R, F, Fut>(
        &self,
        method: &'static str,
        request: Request<T>,
        call: F,
    ) -> Result<Response<R>, Status>
    where
        T: Clone + Send + 'static,
        R: Send + 'static,
        F: Fn(LockServiceClient<Channel>, Request<T>) -> Fut + Copy + Send + 'static,
        Fut: Future<Output = Result<Response<R>, Status>> + Send + 'static,
    {
        let deadline: Option<MetadataValue<_>> = request.metadata().get(GRPC_TIMEOUT).cloned();
        let message = request.into_inner();
        let outgoing = move |message: T| {
            let mut request = Request::new(message);
            if let Some(deadline) = &deadline {
                request
                    .metadata_mut()
                    .insert(GRPC_TIMEOUT, deadline.clone());
            }
            request
        };
        let answered = Arc::new(AtomicBool::new(false));
        if let Some(delay) = self.duplicate(method) {
            let (upstream, shared, answered) =
                (self.upstream.clone(), self.shared.clone(), answered.clone());
            let second = outgoing(message.clone());
            // The task ban of clippy.toml is for dlm's core; this is a host.
            #[allow(clippy::disallowed_methods)]
            tokio::spawn(async move {
                tokio::time::sleep(ms(delay)).await;
                if answered.load(Ordering::Relaxed) {
                    shared.with(|s| s.faults.reorders += 1);
                }
                let _ = call(upstream, second).await;
            });
        }
        let result = call(self.upstream.clone(), outgoing(message)).await;
        answered.store(true, Ordering::Relaxed);
        result
    }
}

#[tonic::async_trait]
impl LockService for Relay {
    async fn client_init(
        &self,
        request: Request<ClientInitArgs>,
    ) -> Result<Response<proto::Response>, Status> {
        self.forward(
            "init",
            request,
            |mut c, r| async move { c.client_init(r).await },
        )
        .await
    }

    async fn lock_acquire(
        &self,
        request: Request<LockArgs>,
    ) -> Result<Response<LockResponse>, Status> {
        self.forward("acquire", request, |mut c, r| async move {
            c.lock_acquire(r).await
        })
        .await
    }

    async fn lock_release(
        &self,
        request: Request<LockArgs>,
    ) -> Result<Response<LockResponse>, Status> {
        self.forward("release", request, |mut c, r| async move {
            c.lock_release(r).await
        })
        .await
    }

    async fn file_append(
        &self,
        request: Request<FileArgs>,
    ) -> Result<Response<proto::Response>, Status> {
        self.forward("append", request, |mut c, r| async move {
            c.file_append(r).await
        })
        .await
    }

    async fn renew_lease(
        &self,
        request: Request<LeaseArgs>,
    ) -> Result<Response<LeaseResponse>, Status> {
        self.forward("renew", request, |mut c, r| async move {
            c.renew_lease(r).await
        })
        .await
    }

    async fn client_close(
        &self,
        request: Request<ClientInitArgs>,
    ) -> Result<Response<proto::Response>, Status> {
        self.forward("close", request, |mut c, r| async move {
            c.client_close(r).await
        })
        .await
    }

    async fn file_read(
        &self,
        request: Request<FileReadArgs>,
    ) -> Result<Response<FileReadResponse>, Status> {
        self.forward(
            "read",
            request,
            |mut c, r| async move { c.file_read(r).await },
        )
        .await
    }

    async fn lock_status(
        &self,
        request: Request<StatusArgs>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.forward("status", request, |mut c, r| async move {
            c.lock_status(r).await
        })
        .await
    }
}

/// The relay host: serves the proxy on `PORT` until the host goes down.
pub(crate) async fn run(shared: Arc<Shared>) -> turmoil::Result {
    let channel = net::channel("relay", "server", shared.clone(), || {});
    let upstream = LockServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let relay = Relay {
        upstream,
        shared: shared.clone(),
    };
    match Incoming::bind("relay", shared.clone()).await {
        Ok(incoming) => {
            let served = tonic::transport::Server::builder()
                .add_service(LockServiceServer::new(relay))
                .serve_with_incoming(incoming)
                .await;
            shared.with(|s| s.problems.push(format!("the relay stopped: {served:?}")));
        }
        Err(e) => shared.with(|s| s.problems.push(format!("the relay cannot listen: {e}"))),
    }
    std::future::pending::<()>().await;
    Ok(())
}
