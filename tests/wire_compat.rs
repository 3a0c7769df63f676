//! A client built only from the original Go service's wire contract — the
//! five methods and their field numbers, declared here by hand rather than
//! taken from dlm's proto — can init, acquire, append, renew and release.

mod common;

use common::ServerProcess;
use tonic::codegen::http::uri::PathAndQuery;

#[derive(Clone, PartialEq, prost::Message)]
struct OrigInit {
    #[prost(int32, tag = "1")]
    client_id: i32,
    #[prost(string, tag = "2")]
    request_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OrigLock {
    #[prost(int32, tag = "1")]
    client_id: i32,
    #[prost(string, tag = "2")]
    token: String,
    #[prost(string, tag = "3")]
    request_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OrigFile {
    #[prost(int32, tag = "1")]
    client_id: i32,
    #[prost(string, tag = "2")]
    filename: String,
    #[prost(bytes = "vec", tag = "3")]
    content: Vec<u8>,
    #[prost(string, tag = "4")]
    token: String,
    #[prost(string, tag = "5")]
    request_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OrigLease {
    #[prost(int32, tag = "1")]
    client_id: i32,
    #[prost(string, tag = "2")]
    token: String,
    #[prost(string, tag = "3")]
    request_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OrigResponse {
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(string, tag = "2")]
    error_message: String,
    #[prost(string, tag = "3")]
    token: String,
}

const OK: i32 = 0;
const INVALID_TOKEN: i32 = 4;

async fn unary<Req: prost::Message + 'static>(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &'static str,
    req: Req,
) -> OrigResponse {
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<Req, OrigResponse>::default();
    grpc.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(method),
        codec,
    )
    .await
    .expect("rpc")
    .into_inner()
}

#[tokio::test]
async fn original_client_can_init_acquire_append_renew_release() {
    let server = ServerProcess::start(&[]);
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);

    let r = unary(
        &mut grpc,
        "/lock.LockService/ClientInit",
        OrigInit {
            client_id: 1,
            request_id: "i1".into(),
        },
    )
    .await;
    assert_eq!(r.status, OK, "{}", r.error_message);

    let r = unary(
        &mut grpc,
        "/lock.LockService/LockAcquire",
        OrigLock {
            client_id: 1,
            token: String::new(),
            request_id: "a1".into(),
        },
    )
    .await;
    assert_eq!(r.status, OK, "{}", r.error_message);
    let token = r.token;
    assert!(!token.is_empty());

    for (i, content) in ["A", "A"].iter().enumerate() {
        let r = unary(
            &mut grpc,
            "/lock.LockService/FileAppend",
            OrigFile {
                client_id: 1,
                filename: "file_0".into(),
                content: content.as_bytes().to_vec(),
                token: token.clone(),
                request_id: format!("f{i}"),
            },
        )
        .await;
        assert_eq!(r.status, OK, "{}", r.error_message);
    }

    let r = unary(
        &mut grpc,
        "/lock.LockService/RenewLease",
        OrigLease {
            client_id: 1,
            token: token.clone(),
            request_id: "r1".into(),
        },
    )
    .await;
    assert_eq!(r.status, OK, "{}", r.error_message);

    let r = unary(
        &mut grpc,
        "/lock.LockService/RenewLease",
        OrigLease {
            client_id: 1,
            token: "garbage".into(),
            request_id: "r2".into(),
        },
    )
    .await;
    assert_eq!(r.status, INVALID_TOKEN);

    // Staged appends are not visible before the release.
    assert_eq!(server.file("file_0"), "");
    let r = unary(
        &mut grpc,
        "/lock.LockService/LockRelease",
        OrigLock {
            client_id: 1,
            token: token.clone(),
            request_id: "rel1".into(),
        },
    )
    .await;
    assert_eq!(r.status, OK, "{}", r.error_message);
    assert_eq!(server.file("file_0"), "AA");

    // A request without a request id is still served.
    let r = unary(
        &mut grpc,
        "/lock.LockService/LockAcquire",
        OrigLock {
            client_id: 2,
            token: String::new(),
            request_id: String::new(),
        },
    )
    .await;
    assert_eq!(r.status, OK, "{}", r.error_message);
    assert_ne!(r.token, token);
}
