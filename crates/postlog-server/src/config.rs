//! Server configuration: `DATA/postlog.toml`.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// The server's settings. Every field has a default; the file may be empty.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// Host name or address clients use to reach this server; goes into login URLs.
    pub public_host: String,
    /// Largest message accepted by Store, in bytes.
    pub max_message_size: u64,
    /// Most simultaneous client connections; more are refused.
    pub max_connections: usize,
    /// Certificate and key (PEM), relative to the data directory.
    pub cert: String,
    pub key: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            public_host: "localhost".into(),
            max_message_size: postlog_proto::limits::MAX_MESSAGE_SIZE,
            max_connections: 10_000,
            cert: "cert.pem".into(),
            key: "key.pem".into(),
        }
    }
}

/// The file written on first start: every setting, commented, at its default.
pub const DEFAULT_TOML: &str = r#"# Postlog server configuration. Every setting is optional; shown are the defaults.

# UDP address of the QUIC endpoint (`postlog serve --listen` overrides it).
# listen = "0.0.0.0:4433"

# Host name clients use to reach this server; printed in login URLs.
# public_host = "localhost"

# Largest message accepted, in bytes (64 MiB).
# max_message_size = 67108864

# Most simultaneous client connections.
# max_connections = 10000

# TLS certificate and private key (PEM), relative to this directory. On first start a
# self-signed pair is generated; clients pin its SHA-256 fingerprint from the login URL.
# cert = "cert.pem"
# key = "key.pem"
"#;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("{path}: max_message_size must be between 1 and {max}")]
    Invalid { path: String, max: u64 },
}

impl ServerConfig {
    /// Loads `DATA/postlog.toml`, writing the commented default file if there is none.
    pub fn load_or_init(data: &Path) -> Result<ServerConfig, ConfigError> {
        let path = data.join("postlog.toml");
        let p = || path.display().to_string();
        std::fs::create_dir_all(data).map_err(|source| ConfigError::Io { path: p(), source })?;
        if !path.exists() {
            std::fs::write(&path, DEFAULT_TOML)
                .map_err(|source| ConfigError::Io { path: p(), source })?;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Io { path: p(), source })?;
        let cfg: ServerConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: p(), source })?;
        let max = postlog_proto::limits::MAX_MESSAGE_SIZE;
        if cfg.max_message_size == 0 || cfg.max_message_size > max {
            return Err(ConfigError::Invalid { path: p(), max });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults_and_typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServerConfig::load_or_init(dir.path()).unwrap();
        assert_eq!(cfg.listen.port(), 4433);
        let uncommented: String = DEFAULT_TOML
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|l| l.contains(" = "))
                    .unwrap_or("")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: ServerConfig = toml::from_str(&uncommented).unwrap();
        assert_eq!(
            parsed.max_message_size,
            ServerConfig::default().max_message_size
        );
        std::fs::write(dir.path().join("postlog.toml"), "listne = \"1.2.3.4:1\"").unwrap();
        assert!(matches!(
            ServerConfig::load_or_init(dir.path()),
            Err(ConfigError::Parse { .. })
        ));
    }
}
