//! QUIC glue shared by the Postlog server and client.
//!
//! The protocol crate decides what bytes mean; this crate moves them over quinn streams:
//! [`read_frame`] / [`write_frame`], the shared [`transport_config`], and TLS: the
//! self-signed certificate a server makes on first start ([`SelfSigned`]), its SHA-256
//! [`fingerprint`], and the client's [`PinnedServer`] verifier that accepts exactly the
//! pinned certificate, as ssh does with host keys.

use std::sync::Arc;
use std::time::Duration;

use postlog_proto::{DecodeError, frame};
use quinn::{RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod pin;
pub use pin::{PinnedServer, fingerprint};

/// Maximum concurrent bidirectional streams a peer may open on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// A connection with no traffic for this long is closed (keep-alives prevent it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Clients send a keep-alive this often while idle (a watching Log stream).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Most bytes a peer may send on one stream before the receiver has read them (QUIC flow
/// control holds the sender back beyond it): a full sync is one long stream of mail.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// Most unread bytes over all streams of one connection: the most memory a peer can make
/// the other side buffer.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;
/// Most bytes in flight that this side sends before acknowledgement.
pub const SEND_WINDOW: u64 = 32 * 1024 * 1024;
/// The TLS server name clients use; certificates are pinned, so it is a fixed label.
pub const SERVER_NAME: &str = "postlog.invalid";

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly before any byte of a new frame.
    #[error("stream ended")]
    End,
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("stream error: {0}")]
    Read(#[from] quinn::ReadError),
}

/// Reads one frame's payload. A stream that ends inside a frame is `Truncated`.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; frame::HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::End),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(DecodeError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = frame::payload_len(header)?;
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => Ok(payload),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(DecodeError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Writes one already framed message.
pub async fn write_frame(send: &mut SendStream, framed: &[u8]) -> Result<(), quinn::WriteError> {
    send.write_all(framed).await
}

/// Transport settings both sides use.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    // Large windows: a full sync is one long stream of mail.
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    t.send_window(SEND_WINDOW);
    // Let path MTU discovery go past Ethernet size: on loopback and jumbo-frame links a full
    // sync then needs a fifth of the packets (and of the per-packet crypto and syscalls); on
    // ordinary paths the larger probes are lost and the MTU stays at about 1450. Both
    // endpoints must also accept such datagrams: see [`tune_endpoint`].
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    // Ask the peer (ACK-frequency extension; ignored by peers without it) to acknowledge
    // within MAX_ACK_DELAY instead of QUIC's default 25 ms.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(MAX_ACK_DELAY));
    t.ack_frequency_config(Some(ack));
    t
}

/// The longest the peer may hold back an acknowledgement (it acknowledges every second
/// packet at once anyway). Why not QUIC's default 25 ms: early in a connection the
/// congestion window is ~14.7 KB, only two or three 6,000-byte packets, and a flight that
/// ends on an odd packet waits the whole delay for its ACK before the next flight. Measured
/// on loopback, 100 new messages (~5 MB): the stream ended at 52 ms p50 with 25 ms, 35 ms
/// with 2 ms (20 runs interleaved). Only the ends of flights should be affected, so a bulk
/// transfer should send few more ACKs (reasoned from quinn's every-second-packet rule; the
/// ACKs were not counted).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(2);

/// Endpoint settings both sides use: accept datagrams up to [`MAX_UDP_PAYLOAD`] (quinn's
/// default, 1,472, is announced to the peer and stops its path MTU discovery there).
pub fn tune_endpoint(cfg: &mut quinn::EndpointConfig) {
    // In range (1,200..=65,527) by construction; the error case cannot happen.
    let _ = cfg.max_udp_payload_size(MAX_UDP_PAYLOAD);
}

/// Largest UDP payload Postlog sends or accepts: the ceiling of path MTU discovery.
///
/// Why not larger: quinn 0.11 hands the kernel up to 10 packets of a connection as one GSO
/// send (`MAX_TRANSMIT_SEGMENTS`), and Linux refuses a GSO send larger than one UDP datagram
/// (65,507 bytes of payload). Above 6,550 bytes per packet every full batch fails and counts
/// as lost: measured on loopback, 8,952 lost 35% of the packets of a full sync (97 s instead
/// of 2), tripped quinn's black-hole detector (back to 1,200 bytes), and 16,384 could not
/// even finish a handshake (tests/mtu.rs guards it). 6,550 itself, the arithmetic limit,
/// cost 200-800 receive-buffer drops per 10,000-message sync on loopback where 5,000-6,000
/// cost 0-15, so a little margin: 6,000 bytes, 76,000 packets for 457 MB instead of 318,000
/// at 1,472 (server CPU per 10,000-message full sync 1.1-1.5 s -> 0.73-0.80 s, client user
/// CPU -35%).
pub const MAX_UDP_PAYLOAD: u16 = 6_000;
/// Packets quinn puts in one GSO send (quinn 0.11 `connection.rs`, `MAX_TRANSMIT_SEGMENTS`).
pub const QUINN_GSO_BATCH: u32 = 10;
/// Largest UDP payload of one IPv4 datagram (65,535 - 20 bytes IP - 8 bytes UDP header).
pub const MAX_UDP_DATAGRAM: u32 = 65_507;
const _: () = assert!(MAX_UDP_PAYLOAD as u32 * QUINN_GSO_BATCH <= MAX_UDP_DATAGRAM);
/// Socket buffer sizes asked of the kernel (it caps them at net.core.{r,w}mem_max): the
/// default ~200 KiB receive buffer overflows during a full sync and costs retransmissions.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Binds a UDP socket for QUIC with large send and receive buffers.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: a smaller buffer than asked is not an error.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// A port that `free` finds free, chosen at random below the kernel's ephemeral range
/// (the first port of `/proc/sys/net/ipv4/ip_local_port_range`, 32,768 if unreadable) and
/// from 10,000 up; `None` after 1,000 tries. For tests and benchmarks that hand a port to a
/// server process: a port the kernel handed out for a bind to port 0, once released, can be
/// handed to any other socket bound to port 0 (every client endpoint binds one) before the
/// server binds it, which then fails with "Address already in use" (seen in CI). Sockets
/// bound to port 0 never get a port below the ephemeral range.
pub fn port_below_ephemeral(free: impl Fn(u16) -> bool) -> Option<u16> {
    use std::hash::{BuildHasher, Hasher};
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
        .max(10_001);
    let span = u64::from(first_ephemeral - 10_000);
    // Randomly keyed SipHash of a counter: a random sequence without a random-number crate.
    let key = std::collections::hash_map::RandomState::new();
    (0..1000u32).find_map(|i| {
        let mut h = key.build_hasher();
        h.write_u32(i);
        // Below `first_ephemeral` by construction.
        let port = 10_000 + u16::try_from(h.finish() % span).ok()?;
        free(port).then_some(port)
    })
}

/// The ring crypto provider, the only one Postlog links.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS or QUIC configuration that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// The server's QUIC configuration: TLS 1.3 only with this certificate chain and key,
/// Postlog's ALPN, 0-RTT accepted, session tickets, and the shared transport settings.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, ConfigError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![postlog_proto::ALPN.to_vec()];
    // 0-RTT on, deliberately: quinn requires exactly u32::MAX here to accept early data.
    // Mutating requests still wait for the handshake (docs/PROTOCOL.md, 0-RTT profile).
    tls.max_early_data_size = u32::MAX;
    tls.session_storage = rustls::server::ServerSessionMemoryCache::new(16_384);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// A client's QUIC configuration: TLS 1.3 only, the server's certificate pinned by its
/// SHA-256 `fingerprint` ([`PinnedServer`]), Postlog's ALPN, 0-RTT offered, and the shared
/// transport settings with keep-alives.
pub fn client_config(fingerprint: &str) -> Result<quinn::ClientConfig, ConfigError> {
    let provider = crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer::new(fingerprint, provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![postlog_proto::ALPN.to_vec()];
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A freshly generated self-signed certificate (DER) and its private key (PKCS#8 DER).
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates the development certificate a server makes on first start.
pub fn generate_self_signed(hostnames: Vec<String>) -> Result<SelfSigned, rcgen::Error> {
    let certified = rcgen::generate_simple_self_signed(hostnames)?;
    Ok(SelfSigned {
        cert_pem: certified.cert.pem(),
        key_pem: certified.key_pair.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_free() {
        let first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32_768)
            .max(10_001);
        let tried = std::cell::RefCell::new(Vec::new());
        // Refuses the first 9 ports it is offered: the 10th is taken.
        let port = port_below_ephemeral(|p| {
            tried.borrow_mut().push(p);
            tried.borrow().len() == 10
        });
        let tried = tried.into_inner();
        assert_eq!(port, tried.last().copied());
        assert!(
            tried.iter().all(|p| (10_000..first).contains(p)),
            "{tried:?}"
        );
        assert!(tried.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        assert_eq!(port_below_ephemeral(|_| false), None);
    }
}
