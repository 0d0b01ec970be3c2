//! The malformed-input table of docs/PROTOCOL.md, over real QUIC with a raw client: each
//! bad input gets its documented error, and the server keeps serving everyone else.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::Duration;

use postlog_proto::error::close;
use postlog_proto::{BlobHash, ErrorCode, Request, Response};

/// A bare quinn connection that speaks frames by hand.
struct Raw {
    conn: quinn::Connection,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr, fingerprint: &str) -> Raw {
        let provider = postlog_net::crypto_provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(postlog_net::PinnedServer::new(
                fingerprint,
                provider,
            )))
            .with_no_client_auth();
        tls.alpn_protocols = vec![postlog_proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = ep
            .connect(addr, postlog_net::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        Raw { conn }
    }

    /// Sends raw bytes on a new stream, finishes it, and reads the first response frame.
    async fn exchange(&self, bytes: &[u8]) -> Response {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        let _ = send.finish();
        let frame =
            tokio::time::timeout(Duration::from_secs(10), postlog_net::read_frame(&mut recv))
                .await
                .expect("server answers")
                .expect("a response frame");
        Response::decode(&frame).unwrap()
    }

    async fn auth(&self, login: &postlog_client::LoginUrl) -> Response {
        let req = Request::Auth {
            account: login.account.clone(),
            device: login.device,
            secret: login.secret,
        };
        self.exchange(&req.to_frame()).await
    }
}

fn code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error { code, .. } => ErrorCode::from_code(*code),
        _ => None,
    }
}

fn framed_raw(payload: &[u8]) -> Vec<u8> {
    postlog_proto::frame::encode(payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_table() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("postlog.toml"),
        "max_message_size = 1000\nmax_connections = 8\n[limits]\nmax_log_streams_per_account = 256\n",
    )
    .unwrap();
    let server = common::InProcess::start(dir.path()).await;
    let login = server.account("ann");
    let (addr, fp) = (server.addr, server.fingerprint.clone());

    // Unauthenticated: the first stream is not Auth.
    let raw = Raw::connect(addr, &fp).await;
    assert_eq!(
        code(&raw.exchange(&Request::Head.to_frame()).await),
        Some(ErrorCode::Unauthenticated)
    );
    match tokio::time::timeout(Duration::from_secs(5), raw.conn.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close::PROTOCOL_VIOLATION.into())
        }
        other => panic!("unexpected close {other:?}"),
    }

    // Wrong secret, and an unknown account: the same error and close code.
    for (account, secret) in [
        (login.account.clone(), [1u8; 32]),
        ("nobody".to_string(), login.secret),
    ] {
        let raw = Raw::connect(addr, &fp).await;
        let mut bad = login.clone();
        bad.account = account;
        bad.secret = secret;
        assert_eq!(code(&raw.auth(&bad).await), Some(ErrorCode::AuthFailed));
        match tokio::time::timeout(Duration::from_secs(5), raw.conn.closed())
            .await
            .unwrap()
        {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, close::AUTH_FAILED.into())
            }
            other => panic!("unexpected close {other:?}"),
        }
    }

    // Authenticated: each malformed request fails alone.
    let raw = Raw::connect(addr, &fp).await;
    assert!(matches!(
        raw.auth(&login).await,
        Response::AuthOk { head: 0 }
    ));
    let mut truncated = 10u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0x81, 0x01]);
    let mut short_hash = vec![0x82, 0x04, 0x58, 31];
    short_hash.extend([0u8; 31]);
    let store = |size: u64, body: &[u8]| {
        let mut v = Request::Store { size, tags: vec![] }.to_frame();
        v.extend_from_slice(body);
        v
    };
    let table: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("truncated frame", truncated, ErrorCode::Malformed),
        ("truncated header", vec![0, 0], ErrorCode::Malformed),
        (
            "oversized length",
            0x0010_0000u32.to_be_bytes().to_vec(),
            ErrorCode::TooLarge,
        ),
        (
            "zero length",
            0u32.to_be_bytes().to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "unknown request type",
            framed_raw(&[0x81, 0x18, 99]),
            ErrorCode::UnknownRequest,
        ),
        (
            "bad hash length",
            framed_raw(&short_hash),
            ErrorCode::Malformed,
        ),
        ("not CBOR", framed_raw(b"hello"), ErrorCode::Malformed),
        (
            "trailing bytes in frame",
            framed_raw(&[0x81, 0x01, 0x00]),
            ErrorCode::Malformed,
        ),
        (
            "data after the end",
            store(5, b"0123456789"),
            ErrorCode::SizeMismatch,
        ),
        (
            "stream ends early",
            store(10, b"01234"),
            ErrorCode::SizeMismatch,
        ),
        (
            "message over the limit",
            store(1001, &[b'x'; 1001]),
            ErrorCode::TooLarge,
        ),
        (
            "second Auth",
            Request::Auth {
                account: "ann".into(),
                device: 1,
                secret: [0; 32],
            }
            .to_frame(),
            ErrorCode::Invalid,
        ),
        (
            "fetch of a missing message",
            Request::Fetch {
                hash: BlobHash([9; 32]),
            }
            .to_frame(),
            ErrorCode::NotFound,
        ),
    ];
    for (name, bytes, want) in &table {
        let got = raw.exchange(bytes).await;
        assert_eq!(code(&got), Some(*want), "{name}: got {got:?}");
        println!("{name:<28} -> {want:?} ({})", want.code());
    }
    // The limit itself is fine, and the connection still serves.
    let ok = raw
        .exchange(&store(1000, &{
            let mut m = b"Subject: x\r\n\r\n".to_vec();
            m.resize(1000, b'y');
            m
        }))
        .await;
    assert!(
        matches!(
            ok,
            Response::Stored {
                offset: 0,
                new: true,
                ..
            }
        ),
        "{ok:?}"
    );
    assert!(matches!(
        raw.exchange(&Request::Head.to_frame()).await,
        Response::Head { head: 1 }
    ));

    // Streams per connection: on a fresh connection, the Auth stream and 255 open Log
    // streams use all 256 stream credits; one more waits until some streams close. (quinn
    // returns credit in steps of 1/8 of the window, hence closing 64.)
    let lim = Raw::connect(addr, &fp).await;
    assert!(matches!(lim.auth(&login).await, Response::AuthOk { .. }));
    let mut open = Vec::new();
    for i in 1..postlog_net::MAX_STREAMS_PER_CONNECTION {
        let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(5), lim.conn.open_bi())
            .await
            .unwrap_or_else(|_| panic!("stream {i} could not be opened"))
            .unwrap();
        send.write_all(
            &Request::Log {
                from: 1,
                inline_blobs: false,
            }
            .to_frame(),
        )
        .await
        .unwrap();
        let live = postlog_net::read_frame(&mut recv).await.unwrap();
        assert_eq!(Response::decode(&live).unwrap(), Response::Live { head: 1 });
        open.push((send, recv));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), lim.conn.open_bi())
            .await
            .is_err(),
        "stream 257 must wait for credit"
    );
    open.truncate(open.len() - 64);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), lim.conn.open_bi())
            .await
            .is_ok()
    );
    drop(open);

    // Connections: max_connections = 8; `raw`, `lim` and 6 more make 8: the next is refused.
    let mut conns = Vec::new();
    for _ in 0..6 {
        let r = Raw::connect(addr, &fp).await;
        assert!(matches!(r.auth(&login).await, Response::AuthOk { .. }));
        conns.push(r);
    }
    let endpoint = postlog_client::Endpoint::new(&fp).unwrap();
    assert!(
        endpoint.connect(&login).await.is_err(),
        "the ninth connection is refused"
    );
    drop(conns);
    drop(lim);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another client is served normally throughout.
    let c = common::connect_retry(&endpoint, &login).await;
    assert_eq!(c.head().await.unwrap(), 1);
    server.stop().await;
}
