//! The server certificate: loaded from PEM files, generated self-signed on first start.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Pem { path: String, why: String },
    #[error("generating the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Config(#[from] postlog_net::ConfigError),
}

/// The certificate chain and key the server presents.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// SHA-256 fingerprint of the end-entity certificate (what clients pin).
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map(|c| postlog_net::fingerprint(c))
            .unwrap_or_default()
    }
}

/// Loads the configured certificate and key, generating a self-signed pair when neither
/// file exists yet.
pub fn load_or_generate(data: &Path, cfg: &ServerConfig) -> Result<Identity, TlsError> {
    let cert_path = data.join(&cfg.cert);
    let key_path = data.join(&cfg.key);
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| TlsError::Io { path, source }
    };
    if !cert_path.exists() && !key_path.exists() {
        let mut names = vec![
            "localhost".to_string(),
            postlog_net::SERVER_NAME.to_string(),
        ];
        if !names.contains(&cfg.public_host) {
            names.push(cfg.public_host.clone());
        }
        let pair = postlog_net::generate_self_signed(names)?;
        write_private(&key_path, pair.key_pem.as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, pair.cert_pem).map_err(io(&cert_path))?;
        tracing::info!(cert = %cert_path.display(), "generated a self-signed certificate");
    }
    let pem = |p: &Path, why: String| TlsError::Pem {
        path: p.display().to_string(),
        why,
    };
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| pem(&cert_path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(&cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(&cert_path, "no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem(&key_path, e.to_string()))?;
    Ok(Identity { chain, key })
}

/// The key from which QUIC stateless-reset tokens are derived, kept in `DATA/reset.key`.
/// Because it survives restarts, a restarted server answers packets of connections it no
/// longer knows with a valid stateless reset, and clients reconnect at once instead of
/// waiting for their idle timeout.
/// The connection-ID generator's key is derived from the same file: the default generator
/// signs CIDs with a random per-process key, so a restarted server would drop (not reset)
/// packets of old connections.
pub fn endpoint_config(data: &Path) -> Result<quinn::EndpointConfig, TlsError> {
    let bytes = reset_key_bytes(data)?;
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &bytes,
    )));
    let cid_key = u64::from_le_bytes(
        blake3::derive_key("postlog cid key v1", &bytes)[..8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    postlog_net::tune_endpoint(&mut cfg);
    Ok(cfg)
}

fn reset_key_bytes(data: &Path) -> Result<Vec<u8>, TlsError> {
    let path = data.join("reset.key");
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) if b.len() == 64 => b,
        Ok(_) => {
            return Err(TlsError::Pem {
                path: path.display().to_string(),
                why: "expected 64 bytes".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = vec![0u8; 64];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .map_err(|_| TlsError::Rustls(rustls::Error::FailedToGetRandomBytes))?;
            write_private(&path, &b).map_err(io)?;
            b
        }
        Err(e) => return Err(io(e)),
    };
    Ok(bytes)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The quinn server configuration: TLS 1.3 only, Postlog's ALPN, 0-RTT enabled.
pub fn quinn_server_config(id: Identity) -> Result<quinn::ServerConfig, TlsError> {
    Ok(postlog_net::server_config(id.chain, id.key)?)
}

/// The rustls configuration for SMTP STARTTLS: the same certificate, TLS 1.2 and 1.3
/// (MTAs still speak 1.2), no ALPN, no client certificates.
pub fn smtp_server_config(id: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = postlog_net::crypto_provider();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    Ok(Arc::new(cfg))
}
