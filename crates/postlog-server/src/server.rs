//! The endpoint and the connection loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postlog_proto::error::close;
use postlog_proto::{ErrorCode, Request, Response};
use postlog_store::{AccountId, Backend, DeviceId};
use tokio::sync::watch;

use crate::config::{ConfigError, ServerConfig};
use crate::handlers::{self, Conn};
use crate::push::Heads;
use crate::throttle::{Admit, AuthThrottle};
use crate::tls::{self, TlsError};

/// How often the revocation sweep reads the revoked devices (and closes their connections).
pub const REVOCATION_CHECK: Duration = Duration::from_secs(2);
/// How long start waits for the data directory's lock: `postlog deliver` holds it for a
/// moment when it stores directly, and must not make a starting server fail.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] postlog_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on the Unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("relay: {0}")]
    Relay(String),
}

/// What `postlog serve` may override in `postlog.toml`. `None` keeps the configured value.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// UDP address of the QUIC endpoint.
    pub listen: Option<SocketAddr>,
    /// TCP address of the LMTP listener.
    pub lmtp: Option<SocketAddr>,
    /// Unix socket of the LMTP listener.
    pub lmtp_unix: Option<PathBuf>,
    /// TCP address of the SMTP listener.
    pub smtp: Option<SocketAddr>,
    /// The outbound SMTP relay URL (`[relay] url`).
    pub relay: Option<String>,
}

pub(crate) struct Shared {
    pub store: Arc<dyn Backend>,
    pub heads: Heads,
    pub config: ServerConfig,
    /// Notified after every new Send, so the relay worker starts at once.
    pub relay_wake: Arc<tokio::sync::Notify>,
    connections: AtomicUsize,
    /// Failed logins per address prefix and per account.
    throttle: std::sync::Mutex<AuthThrottle>,
    /// `[limits]`, parsed.
    pub limits: crate::config::Limits,
    /// Open Log streams per account (`[limits] max_log_streams_per_account`).
    pub log_streams: std::sync::Mutex<std::collections::HashMap<AccountId, usize>>,
    /// Revoked devices, published by the revocation sweep.
    pub revoked: watch::Sender<Arc<std::collections::HashSet<DeviceId>>>,
}

/// A running server endpoint.
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    fingerprint: String,
    mail: crate::smtp::Listeners,
    relay: crate::relay::Relay,
    lmtp_addr: Option<SocketAddr>,
    lmtp_socket: Option<PathBuf>,
    smtp_addr: Option<SocketAddr>,
}

impl Server {
    /// Opens the data directory (config, certificate, store) and binds the endpoint.
    /// `listen` overrides the configured address.
    pub fn start(data: &Path, listen: Option<SocketAddr>) -> Result<Server, ServerError> {
        Self::start_with(
            data,
            StartOptions {
                listen,
                ..StartOptions::default()
            },
        )
    }

    /// Like [`Server::start`], and also binds the LMTP and SMTP listeners that the
    /// options or `postlog.toml` ask for.
    pub fn start_with(data: &Path, opts: StartOptions) -> Result<Server, ServerError> {
        let mut config = ServerConfig::load_or_init(data)?;
        if let Some(l) = opts.listen {
            config.listen = l;
        }
        if opts.lmtp.is_some() {
            config.lmtp.listen = opts.lmtp;
        }
        if opts.lmtp_unix.is_some() {
            config.lmtp.unix = opts.lmtp_unix;
        }
        if opts.smtp.is_some() {
            config.smtp.listen = opts.smtp;
        }
        if opts.relay.is_some() {
            config.relay.url = opts.relay;
            config.check().map_err(ServerError::Relay)?;
        }
        let relay = relay_settings(data, &config)?;
        let identity = tls::load_or_generate(data, &config)?;
        let fingerprint = identity.fingerprint();
        let smtp_tls = match config.smtp.listen {
            Some(_) => Some(tls::smtp_server_config(&identity)?),
            None => None,
        };
        let storage = open_store(data, &config)?;
        if let crate::storage::Storage::Postgres(p) = &storage {
            p.recover_node()?;
        }
        let store: Arc<dyn Backend> = storage.into_backend();
        let heads = Heads::default();
        let publisher = heads.clone();
        store.set_head_watcher(Arc::new(move |account, head| {
            publisher.publish(account, head)
        }));
        let endpoint_config = tls::endpoint_config(data)?;
        let bind = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = postlog_net::bind_udp(config.listen).map_err(bind)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(tls::quinn_server_config(identity)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind)?;
        let mut mail = crate::smtp::bind(
            data,
            config.lmtp.listen,
            config.lmtp.unix.clone(),
            config.smtp.listen,
        )?;
        mail.tls = smtp_tls;
        let lmtp_addr = mail.lmtp.as_ref().and_then(|l| l.local_addr().ok());
        let smtp_addr = mail.smtp.as_ref().and_then(|l| l.local_addr().ok());
        let lmtp_socket = mail.lmtp_unix.as_ref().map(|(_, p)| p.clone());
        let invalid = |why| ConfigError::InvalidSetting {
            path: data.join("postlog.toml").display().to_string(),
            why,
        };
        let limits = config.auth.limits().map_err(invalid)?;
        let conn_limits = config.limits.parse().map_err(invalid)?;
        let shared = Arc::new(Shared {
            store,
            heads,
            config,
            relay_wake: Arc::new(tokio::sync::Notify::new()),
            connections: AtomicUsize::new(0),
            throttle: std::sync::Mutex::new(AuthThrottle::new(limits)),
            limits: conn_limits,
            log_streams: std::sync::Mutex::new(std::collections::HashMap::new()),
            revoked: watch::channel(Arc::new(std::collections::HashSet::new())).0,
        });
        Ok(Server {
            endpoint,
            shared,
            fingerprint,
            mail,
            relay,
            lmtp_addr,
            lmtp_socket,
            smtp_addr,
        })
    }

    /// The bound LMTP TCP address, if the listener is on.
    pub fn lmtp_addr(&self) -> Option<SocketAddr> {
        self.lmtp_addr
    }

    /// The LMTP Unix socket, if that listener is on.
    pub fn lmtp_socket(&self) -> Option<&Path> {
        self.lmtp_socket.as_deref()
    }

    /// The bound SMTP address, if the listener is on.
    pub fn smtp_addr(&self) -> Option<SocketAddr> {
        self.smtp_addr
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// SHA-256 fingerprint of the server certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Serves until `shutdown` resolves, then closes every connection and waits (briefly)
    /// for them to go. Nothing acknowledged depends on this: acks follow durable commits.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let Server {
            endpoint,
            shared,
            mail,
            relay,
            ..
        } = self;
        let (stop_mail, stop_rx) = watch::channel(false);
        let relay = tokio::spawn(crate::relay::run(
            shared.clone(),
            relay,
            shared.relay_wake.clone(),
            stop_rx.clone(),
        ));
        let retention = tokio::spawn(crate::retention::run(shared.clone(), stop_rx.clone()));
        let sweep = tokio::spawn(revocation_sweep(shared.clone(), stop_rx.clone()));
        let mail = tokio::spawn(crate::smtp::run(shared.clone(), mail, stop_rx));
        tokio::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                _ = &mut shutdown => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let shared = shared.clone();
            if shared.connections.load(Ordering::Relaxed) >= shared.config.max_connections {
                tracing::warn!(remote = %incoming.remote_address(), "connection limit reached");
                incoming.refuse();
                continue;
            }
            shared.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                if let Err(e) = serve_connection(shared.clone(), incoming).await {
                    tracing::debug!(%remote, error = %e, "connection ended");
                }
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
        let _ = stop_mail.send(true);
        endpoint.close(close::SHUTDOWN.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        let _ = mail.await;
        let _ = relay.await;
        let _ = retention.await;
        let _ = sweep.await;
    }
}

/// Every [`REVOCATION_CHECK`], reads the revoked devices once and publishes the set when it
/// changed; each open connection of a revoked device closes (code REVOKED).
async fn revocation_sweep(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REVOCATION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let store = shared.store.clone();
        match tokio::task::spawn_blocking(move || store.revoked_devices()).await {
            Ok(Ok(ids)) => {
                let set: std::collections::HashSet<DeviceId> = ids.into_iter().collect();
                shared.revoked.send_if_modified(|cur| {
                    let changed = **cur != set;
                    if changed {
                        *cur = Arc::new(set);
                    }
                    changed
                });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading revoked devices failed"),
            Err(e) => tracing::warn!(error = %e, "revocation sweep task failed"),
        }
    }
}

/// The relay worker's settings (without a relay URL, the worker only bounces mail that
/// waited longer than the retry period).
fn relay_settings(data: &Path, config: &ServerConfig) -> Result<crate::relay::Relay, ServerError> {
    use crate::config::{RelayTarget, parse_duration};
    let r = &config.relay;
    let target = match &r.url {
        Some(url) => Some(RelayTarget::parse(url).map_err(ServerError::Relay)?),
        None => None,
    };
    let ca_pem = match &r.ca_file {
        Some(f) => {
            let path = data.join(f);
            Some(std::fs::read(&path).map_err(|e| {
                ServerError::Relay(format!("cannot read ca_file {}: {e}", path.display()))
            })?)
        }
        None => None,
    };
    let d = |s: &str| parse_duration(s).map_err(ServerError::Relay);
    Ok(crate::relay::Relay {
        target,
        ca_pem,
        retry_initial: d(&r.retry_initial)?,
        retry_max: d(&r.retry_max)?,
        retry_period: d(&r.retry_period)?,
        timeout: d(&r.timeout)?,
        bounce_tags: r.bounce_tags.clone(),
        hostname: config.mail_hostname().to_string(),
    })
}

/// Opens the configured storage, waiting up to [`LOCK_WAIT`] while another process (a
/// direct `postlog deliver`) holds an embedded data directory.
fn open_store(data: &Path, config: &ServerConfig) -> Result<crate::storage::Storage, ServerError> {
    let started = std::time::Instant::now();
    loop {
        match crate::storage::Storage::open(data, config) {
            Err(postlog_store::StoreError::Locked(_)) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return Ok(r?),
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming) -> anyhow_like::Result {
    let connecting = incoming.accept()?;
    // Accept 0-RTT data: read-only requests run at once; mutating ones wait for `handshake`.
    let (conn, handshake) = match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                accepted.await;
                let _ = tx.send(true);
            });
            (conn, rx)
        }
        Err(connecting) => (connecting.await?, watch::channel(true).1),
    };
    let Some((account, device)) = authenticate(&shared, &conn).await? else {
        return Ok(());
    };
    let ctx = Arc::new(Conn {
        shared,
        account,
        device,
        handshake,
    });
    // The node's revocation sweep publishes the revoked devices; this connection only wakes
    // when that set changes.
    let mut revoked = ctx.shared.revoked.subscribe();
    let mut watching = true;
    loop {
        if watching && revoked.borrow_and_update().contains(&device) {
            tracing::info!(device, "device revoked: closing its connection");
            conn.close(close::REVOKED.into(), b"device revoked");
            return Ok(());
        }
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => {
                    let path = conn.stats().path;
                    tracing::debug!(
                        device,
                        rtt_us = path.rtt.as_micros() as u64,
                        mtu = path.current_mtu,
                        sent_packets = path.sent_packets,
                        lost_packets = path.lost_packets,
                        congestion_events = path.congestion_events,
                        "connection closed"
                    );
                    return Ok(());
                }
            },
            r = revoked.changed(), if watching => {
                watching = r.is_ok();
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(handlers::serve_stream(ctx, send, recv));
    }
}

/// Reads the Auth request from the connection's first stream. `None`: the connection was
/// closed (bad credentials, protocol violation, or the peer left).
async fn authenticate(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
) -> anyhow_like::Result<Option<(AccountId, DeviceId)>> {
    let first = tokio::time::timeout(shared.limits.auth_timeout, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let frame = postlog_net::read_frame(&mut recv).await;
        Ok::<_, anyhow_like::Error>((send, frame))
    })
    .await;
    let (mut send, frame) = match first {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            conn.close(
                close::PROTOCOL_VIOLATION.into(),
                b"authentication timed out",
            );
            return Ok(None);
        }
    };
    let request = match frame
        .map_err(|e| e.to_string())
        .and_then(|f| Request::decode(&f).map_err(|e| e.to_string()))
    {
        Ok(Request::Auth {
            account,
            device,
            secret,
        }) => (account, device, secret),
        Ok(_) | Err(_) => {
            let msg = "the first stream of a connection must carry a valid Auth request";
            let _ = send
                .write_all(&Response::error(ErrorCode::Unauthenticated, msg).to_frame())
                .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(close::PROTOCOL_VIOLATION.into(), msg.as_bytes());
            return Ok(None);
        }
    };
    let (account, device, secret) = request;
    let ip = conn.remote_address().ip();
    // Failure delays count from here, so the secret check's own time (or its absence for a
    // refused attempt) does not show in when the answer comes.
    let arrived = std::time::Instant::now();
    let admit = lock(&shared.throttle).admit(ip, &account, arrived);
    let verdict = match admit {
        Admit::Check => {
            let store = shared.store.clone();
            let name = account.clone();
            tokio::task::spawn_blocking(move || -> Result<_, postlog_store::StoreError> {
                // Unknown account or device, and wrong secret, take the same path here.
                let id = store.authenticate(&name, device, &secret)?;
                match id {
                    Some(id) => Ok(Some((id, store.head(id)?))),
                    None => Ok(None),
                }
            })
            .await
            .map_err(|e| anyhow_like::Error(e.to_string()))?
        }
        // Over a limit: refused without a check, answered exactly like a failure.
        Admit::Refuse => Ok(None),
    };
    match verdict {
        Ok(Some((id, head))) => {
            send.write_all(&Response::AuthOk { head }.to_frame())
                .await?;
            let _ = send.finish();
            tracing::debug!(%account, device, "authenticated");
            Ok(Some((id, device)))
        }
        Ok(None) => {
            let at = lock(&shared.throttle).failed(ip, &account, arrived);
            tracing::info!(%account, device, remote = %conn.remote_address(), refused = (admit == Admit::Refuse), "authentication failed");
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let msg = "authentication failed: unknown account or device, or wrong secret";
            let _ = send
                .write_all(&Response::error(ErrorCode::AuthFailed, msg).to_frame())
                .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(close::AUTH_FAILED.into(), b"authentication failed");
            Ok(None)
        }
        Err(e) => {
            tracing::error!(error = %e, "authentication: storage error");
            let _ = send
                .write_all(&Response::error(ErrorCode::Internal, "storage error").to_frame())
                .await;
            let _ = send.finish();
            conn.close(close::SHUTDOWN.into(), b"storage error");
            Ok(None)
        }
    }
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The throttle's tables stay valid even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny error type for the connection loop, which only logs its errors.
mod anyhow_like {
    #[derive(Debug)]
    pub struct Error(pub String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl<E: std::error::Error> From<E> for Error {
        fn from(e: E) -> Self {
            Error(e.to_string())
        }
    }
    pub type Result<T = ()> = std::result::Result<T, Error>;
}
