//! An authenticated QUIC connection and its typed requests.

use std::net::SocketAddr;
use std::sync::Arc;

use postlog_net::{FrameError, read_frame};
use postlog_proto::limits::MAX_MESSAGE_SIZE;
use postlog_proto::{BlobHash, ErrorCode, LogEntry, LogOffset, Record, Request, Response};
use quinn::{RecvStream, SendStream};

use crate::LoginUrl;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {server}: {why}")]
    Unreachable { server: String, why: String },
    #[error(
        "the server's certificate does not match the pinned fingerprint: {0}\n\
         If the server's certificate really changed, log in again with a new URL."
    )]
    PinMismatch(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("server error {code:?}: {message}")]
    Server {
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("setting up TLS: {0}")]
    Tls(String),
}

impl ClientError {
    /// Whether trying again later (reconnecting) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Lost(_) => true,
            ClientError::Server { code: Some(c), .. } => c.is_retryable(),
            _ => false,
        }
    }

    fn from_response(r: Response) -> ClientError {
        match r {
            Response::Error { code, message } => ClientError::Server {
                code: ErrorCode::from_code(code),
                message,
            },
            other => ClientError::Protocol(format!("unexpected response {other:?}")),
        }
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        let s = e.to_string();
        match e {
            _ if s.contains("pinned") => ClientError::PinMismatch(s),
            quinn::ConnectionError::ApplicationClosed(ref c)
                if c.error_code == postlog_proto::error::close::AUTH_FAILED.into() =>
            {
                ClientError::Auth("the server rejected the device credentials".into())
            }
            _ => ClientError::Lost(s),
        }
    }
}

impl From<quinn::WriteError> for ClientError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => c.into(),
            e => ClientError::Lost(e.to_string()),
        }
    }
}

impl From<quinn::ReadError> for ClientError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => c.into(),
            e => ClientError::Lost(e.to_string()),
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::End => ClientError::Lost("the server ended the stream".into()),
            FrameError::Decode(d) => ClientError::Protocol(d.to_string()),
            FrameError::Read(r) => r.into(),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A client endpoint for one pinned server. Keep it for the life of the process: it holds
/// the TLS session tickets that let the next connection send its requests in 0-RTT.
#[derive(Clone)]
pub struct Endpoint {
    ep: quinn::Endpoint,
    config: quinn::ClientConfig,
    connect_timeout: std::time::Duration,
}

/// How long `connect` waits for a server that does not answer (QUIC has no "connection
/// refused"; a dead server is silence). `POSTLOG_CONNECT_TIMEOUT` (seconds) overrides it.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Endpoint {
    pub fn new(fingerprint: &str) -> Result<Endpoint> {
        let config =
            postlog_net::client_config(fingerprint).map_err(|e| ClientError::Tls(e.to_string()))?;
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut endpoint_config = quinn::EndpointConfig::default();
        postlog_net::tune_endpoint(&mut endpoint_config);
        let ep = postlog_net::bind_udp(bind)
            .and_then(|sock| {
                quinn::Endpoint::new(endpoint_config, None, sock, Arc::new(quinn::TokioRuntime))
            })
            .map_err(|e| ClientError::Tls(format!("binding a UDP socket: {e}")))?;
        let connect_timeout = std::env::var("POSTLOG_CONNECT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .map(std::time::Duration::from_secs_f64)
            .unwrap_or(CONNECT_TIMEOUT);
        Ok(Endpoint {
            ep,
            config,
            connect_timeout,
        })
    }

    /// Moves the endpoint to a new local socket (a laptop that changed networks); open
    /// connections migrate with it.
    pub fn rebind(&self) -> std::io::Result<()> {
        let sock = postlog_net::bind_udp(([0, 0, 0, 0], 0).into())?;
        self.ep.rebind(sock)
    }

    /// Connects and authenticates. With a session ticket from an earlier connection of this
    /// endpoint, Auth is sent in 0-RTT.
    pub async fn connect(&self, login: &LoginUrl) -> Result<Connection> {
        Ok(self.connect_inner(login, None).await?.0)
    }

    /// Connects and authenticates, sending a Log request from `from` (inline messages) in
    /// the same flight as Auth: the server serves it as soon as Auth succeeds (PROTOCOL.md
    /// §3), so the records start arriving with `AuthOk` instead of one round trip later. A
    /// sync from a new process then costs 2 round trips plus transfer: the handshake, then
    /// Auth and Log together.
    pub async fn connect_with_log(
        &self,
        login: &LoginUrl,
        from: LogOffset,
    ) -> Result<(Connection, LogStream)> {
        match self.connect_inner(login, Some(from)).await? {
            (conn, Some(log)) => Ok((conn, log)),
            (_, None) => Err(ClientError::Protocol(
                "the Log stream was not opened".into(),
            )),
        }
    }

    async fn connect_inner(
        &self,
        login: &LoginUrl,
        log_from: Option<LogOffset>,
    ) -> Result<(Connection, Option<LogStream>)> {
        match tokio::time::timeout(self.connect_timeout, self.open(login, log_from)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Unreachable {
                server: login.server.clone(),
                why: format!(
                    "no answer within {:.1} s",
                    self.connect_timeout.as_secs_f64()
                ),
            }),
        }
    }

    async fn open(
        &self,
        login: &LoginUrl,
        log_from: Option<LogOffset>,
    ) -> Result<(Connection, Option<LogStream>)> {
        let unreachable = |why: String| ClientError::Unreachable {
            server: login.server.clone(),
            why,
        };
        let addr = tokio::net::lookup_host(&login.server)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let connecting = self
            .ep
            .connect_with(self.config.clone(), addr, postlog_net::SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let done = |conn, (head, log), zero_rtt| {
            (
                Connection {
                    conn,
                    head_at_auth: head,
                    zero_rtt,
                },
                log,
            )
        };
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => match authenticate(&conn, login, log_from).await {
                Ok(answer) => Ok(done(conn, answer, true)),
                Err(e) => {
                    // Early data rejected (e.g. the server restarted): retry in 1-RTT.
                    if accepted.await {
                        return Err(e);
                    }
                    let answer = authenticate(&conn, login, log_from).await?;
                    Ok(done(conn, answer, false))
                }
            },
            Err(connecting) => {
                let conn = connecting.await.map_err(|e| match ClientError::from(e) {
                    ClientError::Lost(why) => unreachable(why),
                    other => other,
                })?;
                let answer = authenticate(&conn, login, log_from).await?;
                Ok(done(conn, answer, false))
            }
        }
    }
}

/// Sends Auth on the connection's first stream and, with `log_from`, a Log request on the
/// next one before the answer to Auth is in; returns the Head from `AuthOk` and the Log
/// stream.
async fn authenticate(
    conn: &quinn::Connection,
    login: &LoginUrl,
    log_from: Option<LogOffset>,
) -> Result<(LogOffset, Option<LogStream>)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let auth = Request::Auth {
        account: login.account.clone(),
        device: login.device,
        secret: login.secret,
    };
    send.write_all(&auth.to_frame()).await?;
    let _ = send.finish();
    let log = match log_from {
        Some(from) => Some(start_log(conn, from, true).await?),
        None => None,
    };
    let frame = read_frame(&mut recv).await.map_err(|e| match e {
        FrameError::Read(quinn::ReadError::ConnectionLost(c)) => ClientError::from(c),
        e => e.into(),
    })?;
    match Response::decode(&frame).map_err(|e| ClientError::Protocol(e.to_string()))? {
        Response::AuthOk { head } => Ok((head, log)),
        Response::Error { message, .. } => Err(ClientError::Auth(message)),
        other => Err(ClientError::Protocol(format!(
            "unexpected reply to Auth: {other:?}"
        ))),
    }
}

/// An authenticated connection to the server.
#[derive(Clone)]
pub struct Connection {
    conn: quinn::Connection,
    /// The account's Head when authentication completed.
    pub head_at_auth: LogOffset,
    /// Whether Auth (and the first requests) went out as 0-RTT early data, answered
    /// without waiting for the handshake: a resumed connection's sync costs one round trip.
    pub zero_rtt: bool,
}

impl Connection {
    async fn request(&self, req: &Request) -> Result<(SendStream, RecvStream)> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send.write_all(&req.to_frame()).await?;
        Ok((send, recv))
    }

    async fn response(recv: &mut RecvStream) -> Result<Response> {
        let frame = read_frame(recv).await?;
        Response::decode(&frame).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The account's current Head.
    pub async fn head(&self) -> Result<LogOffset> {
        let (mut send, mut recv) = self.request(&Request::Head).await?;
        let _ = send.finish();
        match Self::response(&mut recv).await? {
            Response::Head { head } => Ok(head),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Stores a message; returns its hash, the offset of its Store record and whether it was
    /// new. Returns only once the server has made it durable.
    pub async fn store(
        &self,
        bytes: &[u8],
        tags: &[String],
    ) -> Result<(BlobHash, LogOffset, bool)> {
        let req = Request::Store {
            size: bytes.len() as u64,
            tags: tags.to_vec(),
        };
        match self.upload(&req, bytes).await? {
            Response::Stored { hash, offset, new } => Self::check_hash(bytes, hash, offset, new),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Sends `req`, then the message bytes, and reads the answer. The server may refuse
    /// before it has read everything (too large): its answer wins over the write error.
    async fn upload(&self, req: &Request, bytes: &[u8]) -> Result<Response> {
        let (mut send, mut recv) = self.request(req).await?;
        let sent = send.write_all(bytes).await;
        let _ = send.finish();
        match Self::response(&mut recv).await {
            Ok(r) => Ok(r),
            Err(e) => Err(sent.err().map(ClientError::from).unwrap_or(e)),
        }
    }

    /// The answer to an upload, if the server hashed the same bytes we sent.
    fn check_hash(
        bytes: &[u8],
        hash: BlobHash,
        offset: LogOffset,
        new: bool,
    ) -> Result<(BlobHash, LogOffset, bool)> {
        if hash != BlobHash::of(bytes) {
            return Err(ClientError::Protocol(
                "server reported a different hash".into(),
            ));
        }
        Ok((hash, offset, new))
    }

    /// Submits a message for sending (idempotent by its hash); returns its hash, the offset
    /// of its Send record and whether this request appended it. An empty `from` and no
    /// `recipients` let the server take them from the message's headers.
    pub async fn send(
        &self,
        bytes: &[u8],
        from: &str,
        recipients: &[String],
    ) -> Result<(BlobHash, LogOffset, bool)> {
        let req = Request::Send {
            size: bytes.len() as u64,
            from: from.to_string(),
            recipients: recipients.to_vec(),
        };
        match self.upload(&req, bytes).await? {
            Response::Sent { hash, offset, new } => Self::check_hash(bytes, hash, offset, new),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Fetches a message's bytes, verified against its hash.
    pub async fn fetch(&self, hash: &BlobHash) -> Result<Vec<u8>> {
        let (mut send, mut recv) = self.request(&Request::Fetch { hash: *hash }).await?;
        let _ = send.finish();
        match Self::response(&mut recv).await? {
            Response::Blob { size } => read_blob(&mut recv, size, hash).await,
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Sends a tag change (idempotent by this device's `seq`); returns the offset of its
    /// Tags record and whether this request appended it.
    pub async fn tag(
        &self,
        hash: &BlobHash,
        add: &[String],
        remove: &[String],
        seen: LogOffset,
        seq: u64,
    ) -> Result<(LogOffset, bool)> {
        let req = Request::Tag {
            hash: *hash,
            add: add.to_vec(),
            remove: remove.to_vec(),
            seen,
            seq,
        };
        let (mut send, mut recv) = self.request(&req).await?;
        let _ = send.finish();
        match Self::response(&mut recv).await? {
            Response::Tagged { offset, new } => Ok((offset, new)),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Asks the server to delete a message everywhere (idempotent by hash); returns the
    /// offset of its Scrub record and whether this request appended it (`false`: nothing
    /// live referred to the message, and the offset is the Head).
    pub async fn delete(&self, hash: &BlobHash) -> Result<(LogOffset, bool)> {
        let (mut send, mut recv) = self.request(&Request::Delete { hash: *hash }).await?;
        let _ = send.finish();
        match Self::response(&mut recv).await? {
            Response::Deleted { offset, new } => Ok((offset, new)),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Opens a Log stream from `from`. With `inline_blobs`, Store entries carry the message.
    pub async fn log(&self, from: LogOffset, inline_blobs: bool) -> Result<LogStream> {
        start_log(&self.conn, from, inline_blobs).await
    }

    pub fn close(&self) {
        self.conn
            .close(postlog_proto::error::close::NORMAL.into(), b"bye");
    }

    /// Resolves when the connection closes, with the reason.
    pub async fn closed(&self) -> ClientError {
        self.conn.closed().await.into()
    }

    pub fn rtt(&self) -> std::time::Duration {
        self.conn.rtt()
    }
}

/// Opens a stream and sends a Log request on it.
async fn start_log(conn: &quinn::Connection, from: LogOffset, inline: bool) -> Result<LogStream> {
    let (mut send, recv) = conn.open_bi().await?;
    let req = Request::Log {
        from,
        inline_blobs: inline,
    };
    send.write_all(&req.to_frame()).await?;
    Ok(LogStream { send, recv, inline })
}

/// Reads a message of `size` bytes that follows a frame on `recv` and checks it against
/// `hash`. Reads go straight into the buffer's spare capacity (no zeroed buffer first),
/// as many received chunks per call as are ready.
async fn read_blob(recv: &mut RecvStream, size: u64, hash: &BlobHash) -> Result<Vec<u8>> {
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;
    if size > MAX_MESSAGE_SIZE {
        return Err(ClientError::Protocol(format!(
            "message of {size} bytes exceeds the limit"
        )));
    }
    let size = size as usize;
    let mut buf = Vec::with_capacity(size);
    while buf.len() < size {
        let want = size - buf.len();
        match recv.read_buf(&mut (&mut buf).limit(want)).await {
            Ok(0) => return Err(ClientError::Lost("message cut short".into())),
            Ok(_) => {}
            // quinn's AsyncRead wraps its ReadError; unwrap it so that retryable stays typed.
            Err(e) => {
                return Err(
                    match e.into_inner().map(|i| i.downcast::<quinn::ReadError>()) {
                        Some(Ok(read)) => (*read).into(),
                        Some(Err(other)) => ClientError::Lost(other.to_string()),
                        None => ClientError::Lost("stream read failed".into()),
                    },
                );
            }
        }
    }
    if BlobHash::of(&buf) != *hash {
        return Err(ClientError::Protocol(format!(
            "message {hash} does not match its hash"
        )));
    }
    Ok(buf)
}

/// What a Log stream yields.
#[derive(Debug)]
pub enum LogItem {
    /// A record; for inline Store records, the message's verified bytes.
    Entry(LogEntry, Option<Vec<u8>>),
    /// Everything below this Head has been sent; later items are live pushes.
    Live(LogOffset),
}

/// An open Log stream. Dropping it cancels the stream.
pub struct LogStream {
    send: SendStream,
    recv: RecvStream,
    inline: bool,
}

impl LogStream {
    pub async fn next(&mut self) -> Result<LogItem> {
        match Connection::response(&mut self.recv).await? {
            Response::Entry(entry) => {
                let blob = match (&entry.record, self.inline) {
                    (Record::Store { hash, size, .. }, true) => {
                        Some(read_blob(&mut self.recv, *size, hash).await?)
                    }
                    _ => None,
                };
                Ok(LogItem::Entry(entry, blob))
            }
            Response::Live { head } => Ok(LogItem::Live(head)),
            other => Err(ClientError::from_response(other)),
        }
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        let _ = self.send.reset(0u32.into());
        let _ = self.recv.stop(0u32.into());
    }
}
