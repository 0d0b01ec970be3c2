//! Accounts, addresses and devices in PostgreSQL (the rules are postlog-store's).

use postgres::GenericClient;
use postlog_store::kit;
use postlog_store::{AccountId, DeviceCredentials, DeviceId, DeviceInfo, StoreError};

use crate::{R, col};

/// Creates the account (and its `heads` row) if missing, records addresses, adds a device.
pub(crate) fn add_device(
    c: &mut impl GenericClient,
    account: &str,
    addresses: &[String],
    device_name: &str,
    secret: [u8; 32],
) -> R<DeviceCredentials> {
    kit::validate_account_name(account)?;
    let addresses = addresses
        .iter()
        .map(|a| kit::normalize_address(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tx = c.transaction()?;
    let now = kit::now_ms() as i64;
    tx.execute(
        "INSERT INTO accounts (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        &[&account, &now],
    )?;
    let account_id: AccountId = col(
        &tx.query_one("SELECT id FROM accounts WHERE name = $1", &[&account])?,
        0,
    )?;
    tx.execute(
        "INSERT INTO heads (account_id, head) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        &[&account_id],
    )?;
    for a in addresses {
        let owner: Option<AccountId> = tx
            .query_opt("SELECT account_id FROM addresses WHERE address = $1", &[&a])?
            .map(|r| col(&r, 0))
            .transpose()?;
        match owner {
            Some(o) if o != account_id => {
                return Err(StoreError::Invalid {
                    what: "address",
                    why: format!("{a} already belongs to another account"),
                }
                .into());
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO addresses (address, account_id) VALUES ($1, $2)",
                    &[&a, &account_id],
                )?;
            }
        }
    }
    let hash = kit::secret_hash(&secret);
    let device: i64 = col(
        &tx.query_one(
            "INSERT INTO devices (account_id, name, secret_hash, created_ms)
             VALUES ($1, $2, $3, $4) RETURNING id",
            &[&account_id, &device_name, &hash.as_bytes().as_slice(), &now],
        )?,
        0,
    )?;
    tx.commit()?;
    Ok(DeviceCredentials {
        account: account.to_owned(),
        account_id,
        device: device as u64,
        secret,
    })
}

/// Same work for every failure (unknown account or device, revoked, wrong secret).
pub(crate) fn authenticate(
    c: &mut impl GenericClient,
    account: &str,
    device: DeviceId,
    secret: &[u8; 32],
) -> R<Option<AccountId>> {
    let row = c.query_opt(
        "SELECT d.account_id, d.secret_hash, d.revoked FROM devices d
         JOIN accounts a ON a.id = d.account_id WHERE a.name = $1 AND d.id = $2",
        &[&account, &(device.min(i64::MAX as u64) as i64)],
    )?;
    let (account_id, stored, revoked) = match &row {
        Some(r) => (col::<i64>(r, 0)?, col::<Vec<u8>>(r, 1)?, col::<bool>(r, 2)?),
        None => (0, vec![0u8; 32], true),
    };
    let presented = kit::secret_hash(secret);
    let stored: [u8; 32] = stored.try_into().unwrap_or([0u8; 32]);
    let matches = presented == blake3::Hash::from(stored);
    Ok((matches && !revoked).then_some(account_id))
}

pub(crate) fn account_id(c: &mut impl GenericClient, name: &str) -> R<Option<AccountId>> {
    c.query_opt("SELECT id FROM accounts WHERE name = $1", &[&name])?
        .map(|r| col(&r, 0))
        .transpose()
}

fn required(c: &mut impl GenericClient, name: &str) -> R<AccountId> {
    account_id(c, name)?.ok_or_else(|| StoreError::NoSuchAccount(name.to_owned()).into())
}

pub(crate) fn resolve_address(c: &mut impl GenericClient, address: &str) -> R<Option<AccountId>> {
    for cand in kit::address_candidates(address) {
        if let Some(r) = c.query_opt(
            "SELECT account_id FROM addresses WHERE address = $1",
            &[&cand],
        )? {
            return Ok(Some(col(&r, 0)?));
        }
    }
    Ok(None)
}

pub(crate) fn list_devices(c: &mut impl GenericClient, account: &str) -> R<Vec<DeviceInfo>> {
    let id = required(c, account)?;
    c.query(
        "SELECT id, name, created_ms, revoked FROM devices WHERE account_id = $1 ORDER BY id",
        &[&id],
    )?
    .iter()
    .map(|r| {
        Ok(DeviceInfo {
            device: col::<i64>(r, 0)? as u64,
            name: col(r, 1)?,
            created_ms: col::<i64>(r, 2)? as u64,
            revoked: col(r, 3)?,
        })
    })
    .collect()
}

pub(crate) fn revoke_device(
    c: &mut impl GenericClient,
    account: &str,
    device: DeviceId,
) -> R<bool> {
    let id = required(c, account)?;
    let mut tx = c.transaction()?;
    let found = tx.execute(
        "UPDATE devices SET revoked = true WHERE account_id = $1 AND id = $2",
        &[&id, &(device.min(i64::MAX as u64) as i64)],
    )? == 1;
    // Every node's listener updates its revoked set (and closes the device's connections
    // at its next check); delivered at COMMIT.
    tx.execute(
        "SELECT pg_notify('postlog_revoked', $1)",
        &[&device.to_string()],
    )?;
    tx.commit()?;
    Ok(found)
}

pub(crate) fn addresses(c: &mut impl GenericClient, account: &str) -> R<Vec<String>> {
    let id = required(c, account)?;
    c.query(
        "SELECT address FROM addresses WHERE account_id = $1 ORDER BY address",
        &[&id],
    )?
    .iter()
    .map(|r| col(r, 0))
    .collect()
}

pub(crate) fn revoked_devices(c: &mut postgres::Client) -> R<Vec<DeviceId>> {
    c.query("SELECT id FROM devices WHERE revoked", &[])?
        .iter()
        .map(|r| col::<i64>(r, 0).map(|d| d as u64))
        .collect()
}
