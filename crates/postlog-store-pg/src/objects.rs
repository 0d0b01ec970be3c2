//! Blobs as objects in an S3-compatible bucket: `<prefix>accounts/<account id>/<hash hex>`.
//!
//! object_store is async; its calls run on a runtime this module owns and callers wait for
//! them, so the blocking storage interface works from any thread.

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use postlog_proto::BlobHash;
use postlog_store::AccountId;

use crate::{Error, R, S3Settings};

/// Uploads running at once for one group commit.
const PARALLEL_PUTS: usize = 16;

pub(crate) struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    rt: Option<tokio::runtime::Runtime>,
}

/// One object as listed: key parts and age.
pub(crate) struct Listed {
    pub account: AccountId,
    pub hash: BlobHash,
    pub age_ms: u64,
}

impl Objects {
    pub(crate) fn new(s: &S3Settings) -> R<Objects> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_access_key_id(&s.access_key)
            .with_secret_access_key(&s.secret_key)
            .with_allow_http(s.allow_http);
        if !s.endpoint.is_empty() {
            b = b.with_endpoint(&s.endpoint);
        }
        let store = b.build()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postlog-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("cannot start the object storage runtime: {e}")))?;
        let mut prefix = s.prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        Ok(Objects {
            store: Arc::new(store),
            prefix,
            rt: Some(rt),
        })
    }

    fn key(&self, account: AccountId, hash: &BlobHash) -> Path {
        Path::from(format!(
            "{}accounts/{account}/{}",
            self.prefix,
            hash.to_hex()
        ))
    }

    /// Runs a future on the module's runtime and waits for it.
    fn block<T: Send + 'static>(&self, fut: impl Future<Output = R<T>> + Send + 'static) -> R<T> {
        let Some(rt) = self.rt.as_ref() else {
            return Err(Error::Other("object storage runtime stopped".into()));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(Error::Other("object storage task ended".into())))
    }

    /// Uploads staged files, several at once; every one is acknowledged (durable in the
    /// bucket) when this returns `Ok`.
    pub(crate) fn put_files(&self, files: Vec<(AccountId, BlobHash, std::path::PathBuf)>) -> R<()> {
        if files.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let jobs: Vec<(Path, std::path::PathBuf)> = files
            .into_iter()
            .map(|(a, h, p)| (self.key(a, &h), p))
            .collect();
        self.block(async move {
            let mut puts = futures_util::stream::iter(jobs.into_iter().map(|(key, path)| {
                let store = store.clone();
                async move {
                    let bytes = tokio::fs::read(&path)
                        .await
                        .map_err(|e| Error::Other(format!("reading {}: {e}", path.display())))?;
                    store.put(&key, PutPayload::from(bytes)).await?;
                    Ok::<(), Error>(())
                }
            }))
            .buffer_unordered(PARALLEL_PUTS);
            while let Some(r) = puts.next().await {
                r?;
            }
            Ok(())
        })
    }

    /// The object's bytes, unverified; `None` if there is no such object.
    pub(crate) fn get(&self, account: AccountId, hash: &BlobHash) -> R<Option<Vec<u8>>> {
        Ok(self
            .get_many(account, std::slice::from_ref(hash))?
            .pop()
            .and_then(|(_, b)| b))
    }

    /// Several objects, fetched [`PARALLEL_PUTS`] at a time; `None` for a missing one.
    pub(crate) fn get_many(
        &self,
        account: AccountId,
        hashes: &[BlobHash],
    ) -> R<Vec<(BlobHash, Option<Vec<u8>>)>> {
        let store = self.store.clone();
        let jobs: Vec<(BlobHash, Path)> =
            hashes.iter().map(|h| (*h, self.key(account, h))).collect();
        self.block(async move {
            let mut gets = futures_util::stream::iter(jobs.into_iter().map(|(hash, key)| {
                let store = store.clone();
                async move {
                    match store.get(&key).await {
                        Ok(r) => Ok((hash, Some(r.bytes().await?.to_vec()))),
                        Err(object_store::Error::NotFound { .. }) => Ok((hash, None)),
                        Err(e) => Err(Error::from(e)),
                    }
                }
            }))
            .buffered(PARALLEL_PUTS);
            let mut out = Vec::new();
            while let Some(r) = gets.next().await {
                out.push(r?);
            }
            Ok(out)
        })
    }

    /// Uploads one blob from memory (migration).
    pub(crate) fn put_bytes(&self, account: AccountId, hash: &BlobHash, bytes: Vec<u8>) -> R<()> {
        let store = self.store.clone();
        let key = self.key(account, hash);
        self.block(async move {
            store.put(&key, PutPayload::from(bytes)).await?;
            Ok(())
        })
    }

    /// Removes an object; a missing one is fine.
    pub(crate) fn delete(&self, account: AccountId, hash: &BlobHash) -> R<()> {
        let store = self.store.clone();
        let key = self.key(account, hash);
        self.block(async move {
            match store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Every blob object under the prefix (other keys are ignored).
    pub(crate) fn list(&self) -> R<Vec<Listed>> {
        let store = self.store.clone();
        let base = Path::from(format!("{}accounts", self.prefix));
        let now = postlog_store::kit::now_ms();
        self.block(async move {
            let mut out = Vec::new();
            let mut s = store.list(Some(&base));
            while let Some(meta) = s.next().await {
                let meta = meta?;
                let parts: Vec<_> = meta.location.parts().collect();
                let n = parts.len();
                if n < 2 {
                    continue;
                }
                let (Ok(account), Ok(hash)) = (
                    parts[n - 2].as_ref().parse::<AccountId>(),
                    parts[n - 1].as_ref().parse::<BlobHash>(),
                ) else {
                    continue;
                };
                let modified = meta.last_modified.timestamp_millis().max(0) as u64;
                out.push(Listed {
                    account,
                    hash,
                    age_ms: now.saturating_sub(modified),
                });
            }
            Ok(out)
        })
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        // Dropping a runtime from inside another runtime's task panics; this never blocks.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
