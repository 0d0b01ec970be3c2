//! Opening the configured storage backend: the embedded store in the data directory, or
//! PostgreSQL + S3 (`[storage] backend = "postgres"`, docs/DEPLOYMENT.md). The server and
//! the administration commands (`postlog account`, `device`, `verify`, `deliver`) all come
//! through here, so they always act on the store the server uses.

use std::path::Path;
use std::sync::Arc;

use postlog_store::{
    AccountId, Accounts, Backend, DeviceCredentials, DeviceId, DeviceInfo, Store, StoreError,
    VerifyReport,
};
use postlog_store_pg::PgStore;

use crate::config::{ConfigError, ServerConfig};

/// The configured backend, opened.
pub enum Storage {
    Embedded(Store),
    Postgres(PgStore),
}

impl Storage {
    /// Opens what `config` names for the data directory `data`. The embedded store takes
    /// the directory's lock ([`StoreError::Locked`] while a server runs on it).
    pub fn open(data: &Path, config: &ServerConfig) -> Result<Storage, StoreError> {
        match pg_settings(data, config)? {
            None => Ok(Storage::Embedded(Store::open(data)?)),
            Some(s) => Ok(Storage::Postgres(PgStore::open(&s, data)?)),
        }
    }

    pub fn into_backend(self) -> Arc<dyn Backend> {
        match self {
            Storage::Embedded(s) => Arc::new(s),
            Storage::Postgres(s) => Arc::new(s),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        match self {
            Storage::Embedded(s) => s,
            Storage::Postgres(s) => s,
        }
    }
}

fn pg_settings(
    data: &Path,
    config: &ServerConfig,
) -> Result<Option<postlog_store_pg::PgSettings>, StoreError> {
    config
        .storage
        .postgres()
        .map_err(|why| StoreError::Invalid {
            what: "configuration",
            why: format!("{}: {why}", data.join("postlog.toml").display()),
        })
}

/// Account administration on the configured backend; safe while servers run.
pub enum Admin {
    Embedded(Accounts),
    Postgres(PgStore),
}

impl Admin {
    /// Loads `DATA/postlog.toml` (creating it with defaults) and opens its backend.
    pub fn open(data: &Path) -> Result<Admin, AdminError> {
        let config = ServerConfig::load_or_init(data)?;
        Ok(match pg_settings(data, &config)? {
            None => Admin::Embedded(Accounts::open(data)?),
            Some(s) => Admin::Postgres(PgStore::open(&s, data)?),
        })
    }

    pub fn add_device(
        &mut self,
        account: &str,
        addresses: &[String],
        device_name: &str,
    ) -> Result<DeviceCredentials, StoreError> {
        match self {
            Admin::Embedded(a) => a.add_device(account, addresses, device_name),
            Admin::Postgres(p) => p.add_device(account, addresses, device_name),
        }
    }

    pub fn list_devices(&self, account: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        match self {
            Admin::Embedded(a) => a.list_devices(account),
            Admin::Postgres(p) => p.list_devices(account),
        }
    }

    pub fn revoke_device(&self, account: &str, device: DeviceId) -> Result<bool, StoreError> {
        match self {
            Admin::Embedded(a) => a.revoke_device(account, device),
            Admin::Postgres(p) => p.revoke_device(account, device),
        }
    }

    pub fn addresses(&self, account: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Admin::Embedded(a) => a.addresses(account),
            Admin::Postgres(p) => p.addresses(account),
        }
    }

    pub fn account_id(&self, name: &str) -> Result<AccountId, StoreError> {
        match self {
            Admin::Embedded(a) => a.account_id(name),
            Admin::Postgres(p) => p
                .account_by_name(name)?
                .ok_or_else(|| StoreError::NoSuchAccount(name.to_owned())),
        }
    }
}

/// `postlog verify` on the configured backend. For PostgreSQL + S3 the second value counts
/// objects no record names (garbage a crash left; not a problem).
pub fn verify(data: &Path) -> Result<(VerifyReport, u64), AdminError> {
    let config = ServerConfig::load_or_init(data)?;
    match pg_settings(data, &config)? {
        None => Ok((postlog_store::verify(data)?, 0)),
        Some(s) => Ok(PgStore::open(&s, data)?.verify()?),
    }
}

/// Why an administration command could not open its backend.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
