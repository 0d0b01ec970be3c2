//! `postlog verify` for the PostgreSQL + S3 backend: the embedded store's checks
//! (postlog-store `verify.rs`) on this schema, plus the `heads` rows and the bucket.

use std::collections::HashSet;

use postlog_proto::{BlobHash, Record};
use postlog_store::kit::RowCheck;
use postlog_store::{StoreError, VerifyReport};

use crate::{PgStore, R, col};

impl PgStore {
    /// Reads every record (offsets gap-free from 0 up to the account's Head, checksum,
    /// decodable, indexed) and every blob a live Store record names (object present, hash
    /// and size match). Objects no row names are counted as garbage, not problems (a crash
    /// between upload and commit leaves them; [`PgStore::collect_garbage`] removes them).
    pub fn verify(&self) -> Result<(VerifyReport, u64), StoreError> {
        let accounts = self.run(|c| {
            c.query("SELECT a.id, a.name, h.head FROM accounts a LEFT JOIN heads h ON h.account_id = a.id ORDER BY a.id", &[])?
                .iter()
                .map(|r| Ok((col::<i64>(r, 0)?, col::<String>(r, 1)?, col::<Option<i64>>(r, 2)?)))
                .collect::<R<Vec<_>>>()
        })?;
        let mut report = VerifyReport::default();
        let mut named: HashSet<(i64, BlobHash)> = HashSet::new();
        for (id, name, head) in accounts {
            report.accounts += 1;
            let Some(head) = head else {
                report
                    .problems
                    .push(format!("account {name}: no heads row"));
                continue;
            };
            // The refs index, read once (not a query per record).
            let refs: HashSet<(BlobHash, u64)> = self.run(move |c| {
                c.query(
                    "SELECT hash, log_offset FROM refs WHERE account_id = $1",
                    &[&id],
                )?
                .iter()
                .map(|r| Ok((crate::hash_col(r, 0)?, col::<i64>(r, 1)? as u64)))
                .collect()
            })?;
            let mut rows_seen = RowCheck::default();
            let mut live_refs = 0u64;
            let mut stores = Vec::new();
            loop {
                let from = rows_seen.expect as i64;
                let rows = self.run(move |c| {
                    c.query(
                        "SELECT log_offset, kind, body, checksum FROM log
                         WHERE account_id = $1 AND log_offset >= $2 ORDER BY log_offset LIMIT 2000",
                        &[&id, &from],
                    )?
                    .iter()
                    .map(|r| {
                        Ok((
                            col::<i64>(r, 0)? as u64,
                            col::<i64>(r, 1)?,
                            col::<Vec<u8>>(r, 2)?,
                            col::<Vec<u8>>(r, 3)?,
                        ))
                    })
                    .collect::<R<Vec<_>>>()
                })?;
                if rows.is_empty() {
                    break;
                }
                for (offset, kind, body, sum) in rows {
                    let Some(record) =
                        rows_seen.check(&mut report, &name, id, offset, kind, &body, &sum)
                    else {
                        continue;
                    };
                    if let Some(hash) = record.hash() {
                        live_refs += 1;
                        if !refs.contains(&(hash, offset)) {
                            report.problems.push(format!(
                                "account {name}, offset {offset}: message {hash} is missing \
                                 from the refs index"
                            ));
                        }
                    }
                    if let Record::Store { hash, size, .. } = record {
                        named.insert((id, hash));
                        stores.push((offset, hash, size));
                    }
                }
                // The chunk's blobs, fetched concurrently.
                self.check_blobs(id, &name, std::mem::take(&mut stores), &mut report)?;
            }
            if rows_seen.expect != head as u64 {
                report.problems.push(format!(
                    "account {name}: head is {head} but the log ends at {}",
                    rows_seen.expect
                ));
            }
            if refs.len() as u64 != live_refs {
                report.problems.push(format!(
                    "account {name}: the refs index has {} rows for {live_refs} live records",
                    refs.len()
                ));
            }
        }
        let garbage = self
            .objects
            .list()?
            .into_iter()
            .filter(|l| !named.contains(&(l.account, l.hash)))
            .count() as u64;
        Ok((report, garbage))
    }

    fn check_blobs(
        &self,
        id: i64,
        name: &str,
        stores: Vec<(u64, BlobHash, u64)>,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        let hashes: Vec<BlobHash> = stores.iter().map(|(_, h, _)| *h).collect();
        let wanted: Vec<Vec<u8>> = hashes.iter().map(|h| h.0.to_vec()).collect();
        let indexed: std::collections::HashMap<BlobHash, i64> = self.run(move |c| {
            c.query(
                "SELECT hash, log_offset FROM blobs WHERE account_id = $1 AND hash = ANY($2)",
                &[&id, &wanted],
            )?
            .iter()
            .map(|r| Ok((crate::hash_col(r, 0)?, col::<i64>(r, 1)?)))
            .collect::<R<_>>()
        })?;
        let mut objects: std::collections::HashMap<BlobHash, Option<Vec<u8>>> =
            self.objects.get_many(id, &hashes)?.into_iter().collect();
        for (offset, hash, size) in stores {
            let at = format!("account {name}, offset {offset}, blob {hash}");
            let index = indexed.get(&hash).copied();
            if index != Some(offset as i64) {
                report.problems.push(format!("{at}: index says {index:?}"));
            }
            match objects.remove(&hash).flatten() {
                Some(bytes) => {
                    report.blobs += 1;
                    report.blob_bytes += bytes.len() as u64;
                    if BlobHash::of(&bytes) != hash {
                        report
                            .problems
                            .push(format!("{at}: content does not match its hash"));
                    } else if bytes.len() as u64 != size {
                        report
                            .problems
                            .push(format!("{at}: size {} != recorded {size}", bytes.len()));
                    }
                }
                None => report.problems.push(format!("{at}: object missing")),
            }
        }
        Ok(())
    }
}
