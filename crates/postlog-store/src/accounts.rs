//! Accounts, their addresses and their devices.

use rusqlite::{Connection, OptionalExtension, params};

use crate::{Result, StoreError, now_ms};
use postlog_proto::limits::MAX_ACCOUNT_NAME_LEN;

/// An account's row id.
pub type AccountId = i64;
/// A device's id, unique on the server.
pub type DeviceId = u64;

/// A fresh device's credentials: shown once, stored only as a hash.
#[derive(Clone, Debug)]
pub struct DeviceCredentials {
    pub account: String,
    pub account_id: AccountId,
    pub device: DeviceId,
    pub secret: [u8; 32],
}

/// A device as listed by `postlog device list`.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub device: DeviceId,
    pub name: String,
    pub created_ms: u64,
    pub revoked: bool,
}

/// Account administration on a data directory, safe while a server runs on it (it only
/// touches the database and creates the account's blob directories).
pub struct Accounts {
    root: std::path::PathBuf,
    conn: Connection,
}

impl Accounts {
    pub fn open(root: &std::path::Path) -> Result<Accounts> {
        std::fs::create_dir_all(root.join("blobs"))
            .map_err(|e| StoreError::io(root.join("blobs"), e))?;
        let conn = crate::db::open(&root.join("postlog.db"))?;
        conn.execute_batch(crate::db::SCHEMA)?;
        Ok(Accounts {
            root: root.to_owned(),
            conn,
        })
    }

    /// Adds a device to `account`, creating the account (and its blob directories) when it
    /// does not exist. The secret is returned once and stored only as a keyed hash.
    pub fn add_device(
        &mut self,
        account: &str,
        addresses: &[String],
        device_name: &str,
    ) -> Result<DeviceCredentials> {
        let secret: [u8; 32] = rand::random();
        let (creds, created) = add_device(&mut self.conn, account, addresses, device_name, secret)?;
        // If this is interrupted, the writer creates a missing fan-out directory on demand.
        if created {
            crate::blobs::create_account_dirs(&self.root, creds.account_id)?;
        }
        Ok(creds)
    }

    pub fn list_devices(&self, account: &str) -> Result<Vec<DeviceInfo>> {
        list_devices(&self.conn, account)
    }

    pub fn revoke_device(&self, account: &str, device: DeviceId) -> Result<bool> {
        revoke_device(&self.conn, account, device)
    }

    /// The account that receives mail for `address` (see [`resolve_address`]).
    pub fn resolve_address(&self, address: &str) -> Result<Option<AccountId>> {
        resolve_address(&self.conn, address)
    }

    /// The account's id; [`StoreError::NoSuchAccount`] if there is none.
    pub fn account_id(&self, name: &str) -> Result<AccountId> {
        account_id(&self.conn, name)
    }

    /// The addresses recorded for an account, sorted; catch-alls (`@domain`) included.
    pub fn addresses(&self, account: &str) -> Result<Vec<String>> {
        let id = account_id(&self.conn, account)?;
        let mut stmt = self
            .conn
            .prepare("SELECT address FROM addresses WHERE account_id = ?1 ORDER BY address")?;
        let rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// The account that receives mail for `address`, or `None`. Matching ignores ASCII case
/// (addresses are stored lower-cased). In order: the exact address; the address without
/// its `+detail` (`ann+lists@example.org` reaches `ann@example.org`); the domain's
/// catch-all, recorded as the address `@example.org`.
pub(crate) fn resolve_address(conn: &Connection, address: &str) -> Result<Option<AccountId>> {
    let mut stmt = conn.prepare_cached("SELECT account_id FROM addresses WHERE address = ?1")?;
    for c in address_candidates(address) {
        if let Some(id) = stmt.query_row([&c], |r| r.get::<_, i64>(0)).optional()? {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The addresses to look up for `address`, in order: exact, without `+detail`, the
/// domain's catch-all (`@domain`). Empty for something that is not an address.
pub fn address_candidates(address: &str) -> Vec<String> {
    let address = address.trim().to_ascii_lowercase();
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Vec::new();
    };
    if local.is_empty() || domain.is_empty() {
        return Vec::new();
    }
    let mut candidates = vec![address.clone()];
    if let Some((base, _detail)) = local.split_once('+')
        && !base.is_empty()
    {
        candidates.push(format!("{base}@{domain}"));
    }
    candidates.push(format!("@{domain}"));
    candidates
}

/// An address as recorded for an account: lower-cased, `user@domain` or `@domain` (the
/// domain's catch-all).
pub fn normalize_address(a: &str) -> Result<String> {
    let a = a.trim().to_ascii_lowercase();
    let valid = a
        .rsplit_once('@')
        .is_some_and(|(_, domain)| !domain.is_empty() && !domain.contains('@'))
        && !a
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>".contains(c));
    if !valid || a.len() > postlog_proto::limits::MAX_ADDRESS_LEN {
        return Err(StoreError::Invalid {
            what: "address",
            why: a,
        });
    }
    Ok(a)
}

pub fn validate_account_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid {
            what: "account name",
            why: format!(
                "{name:?}: 1 to {MAX_ACCOUNT_NAME_LEN} characters of letters, digits and ._-@+"
            ),
        })
    }
}

pub fn secret_hash(secret: &[u8; 32]) -> blake3::Hash {
    blake3::keyed_hash(&blake3::derive_key("postlog device secret v1", b""), secret)
}

/// Creates the account if missing, records its addresses, and adds a device.
pub(crate) fn add_device(
    conn: &mut Connection,
    account: &str,
    addresses: &[String],
    device_name: &str,
    secret: [u8; 32],
) -> Result<(DeviceCredentials, bool)> {
    validate_account_name(account)?;
    let tx = conn.transaction()?;
    let existing: Option<i64> = tx
        .query_row("SELECT id FROM accounts WHERE name = ?1", [account], |r| {
            r.get(0)
        })
        .optional()?;
    let created = existing.is_none();
    let account_id = match existing {
        Some(id) => id,
        None => {
            tx.execute(
                "INSERT INTO accounts (name, created_ms) VALUES (?1, ?2)",
                params![account, now_ms() as i64],
            )?;
            tx.last_insert_rowid()
        }
    };
    for a in addresses {
        let a = normalize_address(a)?;
        let owner: Option<i64> = tx
            .query_row(
                "SELECT account_id FROM addresses WHERE address = ?1",
                [&a],
                |r| r.get(0),
            )
            .optional()?;
        match owner {
            Some(o) if o != account_id => {
                return Err(StoreError::Invalid {
                    what: "address",
                    why: format!("{a} already belongs to another account"),
                });
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO addresses (address, account_id) VALUES (?1, ?2)",
                    params![a, account_id],
                )?;
            }
        }
    }
    let hash = secret_hash(&secret);
    tx.execute(
        "INSERT INTO devices (account_id, name, secret_hash, created_ms) VALUES (?1, ?2, ?3, ?4)",
        params![
            account_id,
            device_name,
            hash.as_bytes().as_slice(),
            now_ms() as i64
        ],
    )?;
    let device = tx.last_insert_rowid() as u64;
    tx.commit()?;
    Ok((
        DeviceCredentials {
            account: account.to_owned(),
            account_id,
            device,
            secret,
        },
        created,
    ))
}

/// Checks a device's credentials. Unknown account, unknown or revoked device and wrong
/// secret all fail the same way, after the same work (one keyed hash and one comparison).
pub(crate) fn authenticate(
    conn: &Connection,
    account: &str,
    device: DeviceId,
    secret: &[u8; 32],
) -> Result<Option<AccountId>> {
    let row: Option<(i64, Vec<u8>, i64)> = conn
        .query_row(
            "SELECT d.account_id, d.secret_hash, d.revoked FROM devices d
             JOIN accounts a ON a.id = d.account_id WHERE a.name = ?1 AND d.id = ?2",
            params![account, device as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let presented = secret_hash(secret);
    let (account_id, stored, revoked) = row.unwrap_or((0, vec![0u8; 32], 1));
    let stored: [u8; 32] = stored.try_into().unwrap_or([0u8; 32]);
    // blake3::Hash equality is constant-time.
    let matches = presented == blake3::Hash::from(stored);
    Ok((matches && revoked == 0).then_some(account_id))
}

pub(crate) fn account_id(conn: &Connection, name: &str) -> Result<AccountId> {
    conn.query_row("SELECT id FROM accounts WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()?
    .ok_or_else(|| StoreError::NoSuchAccount(name.to_owned()))
}

pub(crate) fn list_devices(conn: &Connection, account: &str) -> Result<Vec<DeviceInfo>> {
    let id = account_id(conn, account)?;
    let mut stmt = conn.prepare(
        "SELECT id, name, created_ms, revoked FROM devices WHERE account_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok(DeviceInfo {
            device: r.get::<_, i64>(0)? as u64,
            name: r.get(1)?,
            created_ms: r.get::<_, i64>(2)? as u64,
            revoked: r.get::<_, i64>(3)? != 0,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(crate) fn revoke_device(conn: &Connection, account: &str, device: DeviceId) -> Result<bool> {
    let id = account_id(conn, account)?;
    let n = conn.execute(
        "UPDATE devices SET revoked = 1 WHERE account_id = ?1 AND id = ?2",
        params![id, device as i64],
    )?;
    Ok(n == 1)
}
