//! Server configuration: `DATA/postlog.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// The LMTP listener (for a local MTA such as Postfix); off unless configured.
    pub lmtp: LmtpConfig,
    /// The SMTP listener (for an MTA or a provider's forwarding); off unless configured.
    pub smtp: SmtpConfig,
    /// What happens to mail that arrives over LMTP, SMTP or `postlog deliver`.
    pub delivery: DeliveryConfig,
    /// Where sent mail goes: the outbound SMTP relay and its retry policy.
    pub relay: RelayConfig,
    /// Automatic deletion (retention rules) and compaction of tag histories.
    pub retention: RetentionConfig,
    /// Throttling of failed logins (docs/PROTOCOL.md section 3, docs/RELIABILITY.md).
    pub auth: AuthConfig,
    /// Time and resource limits of QUIC connections (docs/PROTOCOL.md section 7).
    pub limits: LimitsConfig,
    /// Where logs and blobs live: embedded (this directory) or PostgreSQL + S3
    /// (docs/DEPLOYMENT.md).
    pub storage: StorageConfig,
}

/// `[storage]`: `backend = "embedded"` (default; SQLite and files in the data directory)
/// or `"postgres"` (several stateless nodes on one PostgreSQL database and one bucket).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// libpq connection string or URL (backend = "postgres").
    pub postgres: Option<String>,
    /// Read connections per node (default 8).
    pub pool_size: Option<usize>,
    /// The bucket (backend = "postgres").
    pub s3: Option<postlog_store_pg::S3Settings>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Embedded,
    Postgres,
}

impl StorageConfig {
    /// The PostgreSQL + S3 settings, `None` for the embedded store.
    pub fn postgres(&self) -> Result<Option<postlog_store_pg::PgSettings>, String> {
        if self.backend == StorageBackend::Embedded {
            return Ok(None);
        }
        let postgres = self
            .postgres
            .clone()
            .ok_or("storage: backend = \"postgres\" needs postgres = \"<connection string>\"")?;
        let s3 = self
            .s3
            .clone()
            .ok_or("storage: backend = \"postgres\" needs a [storage.s3] section")?;
        Ok(Some(postlog_store_pg::PgSettings {
            postgres,
            pool_size: self.pool_size.unwrap_or(8).max(1),
            s3,
        }))
    }
}

/// Default `[limits]`: see [`LimitsConfig`].
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
pub const DEFAULT_AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub const DEFAULT_MAX_LOG_STREAMS_PER_ACCOUNT: usize = 32;

/// `[limits]`: how long a slow or silent peer may hold server resources.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest wait for a request frame on a new stream, and for the next bytes of a Store
    /// or Send body. Past it the stream gets Error 1 (Malformed, "timed out").
    pub request_timeout: String,
    /// Longest time from a new connection to its Auth request; past it the connection is
    /// closed (close code 1).
    pub auth_timeout: String,
    /// Most Log streams open at once for one account, over all its connections; one more is
    /// answered Error 8 (Busy).
    pub max_log_streams_per_account: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            request_timeout: format!("{}s", DEFAULT_REQUEST_TIMEOUT.as_secs()),
            auth_timeout: format!("{}s", DEFAULT_AUTH_TIMEOUT.as_secs()),
            max_log_streams_per_account: DEFAULT_MAX_LOG_STREAMS_PER_ACCOUNT,
        }
    }
}

/// [`LimitsConfig`], parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub request_timeout: std::time::Duration,
    pub auth_timeout: std::time::Duration,
    pub max_log_streams_per_account: usize,
}

impl LimitsConfig {
    pub fn parse(&self) -> Result<Limits, String> {
        let d = |name: &str, v: &str| {
            parse_duration(v)
                .map_err(|e| format!("limits.{name}: {e}"))
                .and_then(|d| {
                    if d.is_zero() {
                        Err(format!("limits.{name} must be more than 0"))
                    } else {
                        Ok(d)
                    }
                })
        };
        if self.max_log_streams_per_account == 0 {
            return Err("limits.max_log_streams_per_account must be at least 1".into());
        }
        Ok(Limits {
            request_timeout: d("request_timeout", &self.request_timeout)?,
            auth_timeout: d("auth_timeout", &self.auth_timeout)?,
            max_log_streams_per_account: self.max_log_streams_per_account,
        })
    }
}

/// `[auth]`: how failed logins are delayed and limited, per source address (IPv6 per /64)
/// and per account. See `crate::throttle` for the exact rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Every failed Auth is answered no sooner than this; failures of one address or one
    /// account are answered one after another, this far apart.
    pub failure_delay: String,
    /// Failures an address prefix may have before it is refused...
    pub address_burst: u32,
    /// ...after which it gets one more per this period.
    pub address_refill: String,
    /// Failures an account may have (from all addresses) before guessing addresses are
    /// refused (new addresses are still checked)...
    pub account_burst: u32,
    /// ...after which it gets one more per this period.
    pub account_refill: String,
    /// The longest a failed attempt is held before its answer.
    pub max_wait: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        use crate::throttle as t;
        let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
        AuthConfig {
            failure_delay: ms(t::DEFAULT_FAILURE_DELAY),
            address_burst: t::DEFAULT_ADDRESS_BURST,
            address_refill: ms(t::DEFAULT_ADDRESS_REFILL),
            account_burst: t::DEFAULT_ACCOUNT_BURST,
            account_refill: ms(t::DEFAULT_ACCOUNT_REFILL),
            max_wait: ms(t::DEFAULT_MAX_WAIT),
        }
    }
}

impl AuthConfig {
    /// The throttle's limits, or which setting is wrong.
    pub fn limits(&self) -> Result<crate::throttle::Limits, String> {
        let d = |name: &str, v: &str| parse_duration(v).map_err(|e| format!("auth.{name}: {e}"));
        let limits = crate::throttle::Limits {
            failure_delay: d("failure_delay", &self.failure_delay)?,
            address_burst: self.address_burst,
            address_refill: d("address_refill", &self.address_refill)?,
            account_burst: self.account_burst,
            account_refill: d("account_refill", &self.account_refill)?,
            max_wait: d("max_wait", &self.max_wait)?,
        };
        if limits.address_burst == 0 || limits.account_burst == 0 {
            return Err("auth: address_burst and account_burst must be at least 1".into());
        }
        Ok(limits)
    }
}

/// `[relay]`: the SMTP relay that sent mail goes through, and the retry policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// `smtp://[USER:PASS@]HOST[:PORT]` (STARTTLS required, port 587),
    /// `smtps://...` (implicit TLS, port 465), or `smtp+plain://...` (no TLS, port 25:
    /// only for a relay on the same machine). `postlog serve --relay` overrides it. Without
    /// a relay, sent mail stays queued (and bounces after `retry_period`).
    pub url: Option<String>,
    /// A PEM file of extra CA certificates to trust for the relay (relative to the data
    /// directory unless absolute); the web PKI roots are always trusted.
    pub ca_file: Option<PathBuf>,
    /// Wait before the first retry; doubles per attempt up to `retry_max`.
    pub retry_initial: String,
    pub retry_max: String,
    /// After this long, temporary failures become permanent and bounce.
    pub retry_period: String,
    /// Connect and reply timeout per SMTP step.
    pub timeout: String,
    /// Tags of a bounce (delivery status notification) stored in the sender's log.
    pub bounce_tags: Vec<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            url: None,
            ca_file: None,
            retry_initial: "1m".into(),
            retry_max: "1h".into(),
            retry_period: "5d".into(),
            timeout: "60s".into(),
            bounce_tags: vec!["inbox".into(), "unread".into(), "bounce".into()],
        }
    }
}

/// `[retention]`: the server's own deletions, run by a timer.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Seconds between two sweeps over every account.
    pub interval_secs: u64,
    /// Rules for every account that has no rules of its own.
    pub rules: Vec<RetentionRule>,
    /// Per-account rules (by account name), replacing `rules` for that account; an empty
    /// list turns retention off for it.
    pub accounts: std::collections::BTreeMap<String, AccountRetention>,
    /// A message with more than this many live Tags records gets them replaced by one
    /// snapshot record (0: never).
    pub compact_after: usize,
}

/// Delete messages that have carried `tag` for more than `after_secs` seconds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub tag: String,
    pub after_secs: u64,
}

/// `[retention.accounts.NAME]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountRetention {
    pub rules: Vec<RetentionRule>,
}

/// 30 days: how long a message tagged `deleted` stays (it can be untagged meanwhile).
pub const DEFAULT_DELETED_AFTER_SECS: u64 = 30 * 24 * 3600;

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            interval_secs: 3600,
            rules: vec![RetentionRule {
                tag: "deleted".into(),
                after_secs: DEFAULT_DELETED_AFTER_SECS,
            }],
            accounts: Default::default(),
            compact_after: 64,
        }
    }
}

/// How the relay connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayTls {
    /// `smtp://`: plain connect, then STARTTLS (required).
    StartTls,
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// `smtp+plain://`: no TLS.
    None,
}

/// A parsed relay URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayTarget {
    pub host: String,
    pub port: u16,
    pub tls: RelayTls,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl RelayTarget {
    /// Parses `smtp://`, `smtps://` or `smtp+plain://` `[USER:PASS@]HOST[:PORT]`; the user
    /// and password are percent-decoded.
    pub fn parse(url: &str) -> Result<RelayTarget, String> {
        let u = url::Url::parse(url).map_err(|e| format!("relay URL {url:?}: {e}"))?;
        let (tls, default_port) = match u.scheme() {
            "smtp" => (RelayTls::StartTls, 587),
            "smtps" => (RelayTls::Implicit, 465),
            "smtp+plain" => (RelayTls::None, 25),
            other => {
                return Err(format!(
                    "relay URL scheme {other:?}: use smtp:// (STARTTLS), smtps:// (TLS) or \
                     smtp+plain:// (no TLS)"
                ));
            }
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("relay URL {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = (!u.username().is_empty()).then(|| decode(u.username()));
        let password = u.password().map(decode);
        Ok(RelayTarget {
            host,
            port: u.port().unwrap_or(default_port),
            tls,
            user,
            password,
        })
    }
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h` or `5d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: give a unit (ms, s, m, h, d)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    Ok(std::time::Duration::from_millis(n.saturating_mul(ms)))
}

impl RetentionConfig {
    /// The rules that apply to an account.
    pub fn rules_for(&self, account: &str) -> &[RetentionRule] {
        match self.accounts.get(account) {
            Some(a) => &a.rules,
            None => &self.rules,
        }
    }
}

/// `[lmtp]`: TCP and/or Unix-socket LMTP listeners.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmtpConfig {
    /// TCP address, e.g. "127.0.0.1:2424" (`postlog serve --lmtp` overrides it).
    pub listen: Option<SocketAddr>,
    /// Unix socket path, relative to the data directory unless absolute.
    pub unix: Option<PathBuf>,
}

/// `[smtp]`: the SMTP listener, with STARTTLS using the server's certificate.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// TCP address, e.g. "0.0.0.0:25" (`postlog serve --smtp` overrides it).
    pub listen: Option<SocketAddr>,
}

/// `[delivery]`: initial tags and the limits of the LMTP and SMTP listeners.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Tags every delivered message starts with (in its Store record).
    pub initial_tags: Vec<String>,
    /// Host name in the greeting and in Received headers (default: public_host).
    pub hostname: Option<String>,
    /// Most recipients of one message.
    pub max_recipients: usize,
    /// Most simultaneous LMTP/SMTP connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Most simultaneous LMTP/SMTP connections in total.
    pub max_connections: usize,
    /// Longest wait for the next command or chunk of data (default
    /// `postlog_smtp::limits::COMMAND_TIMEOUT`, 5 minutes); then `421` and close.
    pub command_timeout: String,
    /// Longest session from greeting to last reply (default
    /// `postlog_smtp::limits::SESSION_TIMEOUT`, 30 minutes): a slow-drip client cannot hold
    /// a connection slot longer.
    pub session_timeout: String,
}

impl DeliveryConfig {
    /// `command_timeout`, checked by `ServerConfig::check`.
    pub fn command_timeout(&self) -> std::time::Duration {
        parse_duration(&self.command_timeout).unwrap_or(postlog_smtp::limits::COMMAND_TIMEOUT)
    }

    /// `session_timeout`, checked by `ServerConfig::check`.
    pub fn session_timeout(&self) -> std::time::Duration {
        parse_duration(&self.session_timeout).unwrap_or(postlog_smtp::limits::SESSION_TIMEOUT)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            initial_tags: vec!["inbox".into(), "unread".into()],
            hostname: None,
            max_recipients: postlog_smtp::limits::MAX_RECIPIENTS,
            max_connections_per_ip: 20,
            max_connections: 1000,
            command_timeout: format!("{}s", postlog_smtp::limits::COMMAND_TIMEOUT.as_secs()),
            session_timeout: format!("{}s", postlog_smtp::limits::SESSION_TIMEOUT.as_secs()),
        }
    }
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
            lmtp: LmtpConfig::default(),
            smtp: SmtpConfig::default(),
            delivery: DeliveryConfig::default(),
            relay: RelayConfig::default(),
            retention: RetentionConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            storage: StorageConfig::default(),
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

# Storage (docs/DEPLOYMENT.md). "embedded" keeps everything in this directory. "postgres"
# puts logs, accounts and queues in PostgreSQL and blobs in an S3-compatible bucket, so
# that several server nodes can share them (`postlog migrate` copies this directory there).
# [storage]
# backend = "embedded"
# postgres = "host=db.example.org user=postlog dbname=postlog"
# pool_size = 8
# [storage.s3]
# endpoint = "https://s3.example.org"
# bucket = "postlog"
# region = "us-east-1"
# access_key = "..."
# secret_key = "..."
# prefix = ""
# allow_http = false

# Mail in (docs/DELIVERY.md). Both listeners are off unless an address is set here or
# given to `postlog serve --lmtp ADDR:PORT` / `--smtp ADDR:PORT`.
# [lmtp]
# listen = "127.0.0.1:2424"
# unix = "lmtp.sock"
# [smtp]
# listen = "0.0.0.0:25"

# [delivery]
# initial_tags = ["inbox", "unread"]
# hostname = "mail.example.org"
# max_recipients = 1000
# max_connections_per_ip = 20
# max_connections = 1000
# command_timeout = "300s"
# session_timeout = "1800s"

# Mail out (docs/SENDING.md): the SMTP relay that sent mail goes through.
# `postlog serve --relay URL` overrides the URL. Schemes: smtp:// for STARTTLS (required,
# port 587), smtps:// for implicit TLS (465), smtp+plain:// for no TLS (25; a relay on
# this machine only).
# [relay]
# url = "smtp://user:password@smtp.example.org:587"
# ca_file = "relay-ca.pem"
# retry_initial = "1m"
# retry_max = "1h"
# retry_period = "5d"
# timeout = "60s"
# bounce_tags = ["inbox", "unread", "bounce"]

# Retention: the server deletes (everywhere, like `postlog delete`) messages that have
# carried a tag for longer than `after_secs` seconds (2592000 s is 30 days). A message
# tagged `deleted` (Maildir flag T) can be untagged until then. Per-account rules replace
# the default ones; an empty rule list turns retention off for an account. Messages with
# more than `compact_after` tag changes get their history replaced by one snapshot
# (0: never). `interval_secs` is the time between two sweeps.
# [retention]
# interval_secs = 3600
# compact_after = 64
# rules = [{ tag = "deleted", after_secs = 2592000 }]
# [retention.accounts.ann]
# rules = [{ tag = "deleted", after_secs = 604800 }, { tag = "spam", after_secs = 1209600 }]

# Failed logins (docs/RELIABILITY.md). Each failure is answered after failure_delay, the
# failures of one address (IPv6: its /64) or one account one after another. An address may
# fail address_burst times, then once per address_refill; past that it is refused without a
# check. An account may fail account_burst times (from all addresses), then once per
# account_refill; past that only addresses without failures are still checked.
# [auth]
# failure_delay = "200ms"
# address_burst = 10
# address_refill = "6000ms"
# account_burst = 100
# account_refill = "1000ms"
# max_wait = "10000ms"

# Slow or silent peers (docs/PROTOCOL.md section 7): the longest wait for a request frame
# or for the next bytes of a message body, the longest wait for Auth on a new connection,
# and the most Log streams one account may have open at once.
# [limits]
# request_timeout = "30s"
# auth_timeout = "10s"
# max_log_streams_per_account = 32
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
    #[error("{path}: {why}")]
    InvalidSetting { path: String, why: String },
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
        cfg.check()
            .map_err(|why| ConfigError::InvalidSetting { path: p(), why })?;
        Ok(cfg)
    }

    /// Checks what serde cannot: tag syntax and non-zero limits.
    pub fn check(&self) -> Result<(), String> {
        self.storage.postgres()?;
        let d = &self.delivery;
        if let Some(t) = d
            .initial_tags
            .iter()
            .find(|t| !postlog_proto::message::valid_tag(t))
        {
            return Err(format!("delivery.initial_tags: {t:?} is not a valid tag"));
        }
        if d.initial_tags.len() > postlog_proto::limits::MAX_TAGS {
            return Err("delivery.initial_tags: too many tags".into());
        }
        if d.max_recipients == 0 || d.max_connections_per_ip == 0 || d.max_connections == 0 {
            return Err("delivery: limits must be at least 1".into());
        }
        for (name, v) in [
            ("command_timeout", &d.command_timeout),
            ("session_timeout", &d.session_timeout),
        ] {
            let t = parse_duration(v).map_err(|e| format!("delivery.{name}: {e}"))?;
            if t.is_zero() {
                return Err(format!("delivery.{name} must be more than 0"));
            }
        }
        let r = &self.relay;
        for (name, v) in [
            ("retry_initial", &r.retry_initial),
            ("retry_max", &r.retry_max),
            ("retry_period", &r.retry_period),
            ("timeout", &r.timeout),
        ] {
            let d = parse_duration(v).map_err(|e| format!("relay.{name}: {e}"))?;
            if d.is_zero() {
                return Err(format!("relay.{name} must be more than 0"));
            }
        }
        if let Some(url) = &r.url {
            RelayTarget::parse(url).map_err(|e| format!("relay.url: {e}"))?;
        }
        self.auth.limits()?;
        self.limits.parse()?;
        if let Some(t) = r
            .bounce_tags
            .iter()
            .find(|t| !postlog_proto::message::valid_tag(t))
        {
            return Err(format!("relay.bounce_tags: {t:?} is not a valid tag"));
        }
        let r = &self.retention;
        if r.interval_secs == 0 {
            return Err("retention.interval_secs must be at least 1".into());
        }
        for rule in r
            .rules
            .iter()
            .chain(r.accounts.values().flat_map(|a| &a.rules))
        {
            if !postlog_proto::message::valid_tag(&rule.tag) {
                return Err(format!("retention: {:?} is not a valid tag", rule.tag));
            }
        }
        Ok(())
    }

    /// The host name used in LMTP/SMTP greetings and Received headers.
    pub fn mail_hostname(&self) -> &str {
        self.delivery
            .hostname
            .as_deref()
            .unwrap_or(&self.public_host)
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
                    .filter(|l| l.contains(" = ") || l.starts_with('['))
                    .unwrap_or("")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: ServerConfig = toml::from_str(&uncommented).unwrap();
        assert_eq!(
            parsed.max_message_size,
            ServerConfig::default().max_message_size
        );
        assert_eq!(parsed.lmtp.listen, Some("127.0.0.1:2424".parse().unwrap()));
        assert_eq!(parsed.delivery.initial_tags, ["inbox", "unread"]);
        assert_eq!(parsed.relay.retry_period, "5d");
        assert_eq!(
            parsed.auth.limits().unwrap(),
            crate::throttle::Limits::default()
        );
        assert_eq!(
            parsed.limits.parse().unwrap(),
            LimitsConfig::default().parse().unwrap()
        );
        assert_eq!(
            RelayTarget::parse(parsed.relay.url.as_deref().unwrap()).unwrap(),
            RelayTarget {
                host: "smtp.example.org".into(),
                port: 587,
                tls: RelayTls::StartTls,
                user: Some("user".into()),
                password: Some("password".into()),
            }
        );
        let t = RelayTarget::parse("smtps://a%40b.c:p%3Ass@[::1]").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("::1", 465, RelayTls::Implicit)
        );
        assert_eq!(
            (t.user.unwrap(), t.password.unwrap()),
            ("a@b.c".into(), "p:ss".into())
        );
        assert!(RelayTarget::parse("http://x").is_err());
        assert_eq!(parse_duration("5d").unwrap().as_secs(), 432_000);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert!(parse_duration("5").is_err() && parse_duration("5y").is_err());
        assert_eq!(
            parsed.retention.rules,
            ServerConfig::default().retention.rules
        );
        assert_eq!(parsed.retention.rules_for("ann")[1].tag, "spam");
        assert_eq!(parsed.retention.rules_for("bob")[0].tag, "deleted");
        assert_eq!(
            format!("{:?}", parsed.delivery.max_recipients),
            format!("{:?}", ServerConfig::default().delivery.max_recipients)
        );
        assert!(
            cfg.lmtp.listen.is_none() && cfg.smtp.listen.is_none(),
            "off by default"
        );
        std::fs::write(
            dir.path().join("postlog.toml"),
            "[delivery]\ninitial_tags = [\"inbox\", \"\"]",
        )
        .unwrap();
        assert!(matches!(
            ServerConfig::load_or_init(dir.path()),
            Err(ConfigError::InvalidSetting { .. })
        ));
        std::fs::write(dir.path().join("postlog.toml"), "listne = \"1.2.3.4:1\"").unwrap();
        assert!(matches!(
            ServerConfig::load_or_init(dir.path()),
            Err(ConfigError::Parse { .. })
        ));
    }
}
