//! Push: every account's Head as a watch channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use postlog_proto::LogOffset;
use postlog_store::{AccountId, Backend, StoreError};
use tokio::sync::watch;

/// Per-account Head channels. The store's writer publishes after each group commit; Log
/// streams subscribe and wake on every change.
#[derive(Clone, Default)]
pub struct Heads {
    inner: Arc<Mutex<HashMap<AccountId, watch::Sender<LogOffset>>>>,
}

impl Heads {
    /// Subscribes to an account's Head. Creation reads the store's Head under the same lock
    /// `publish` takes, so no commit is missed between reading and subscribing.
    pub fn subscribe(
        &self,
        store: &dyn Backend,
        account: AccountId,
    ) -> Result<watch::Receiver<LogOffset>, StoreError> {
        let mut map = self
            .inner
            .lock()
            .map_err(|_| StoreError::Stopped("heads lock".into()))?;
        if let Some(tx) = map.get(&account) {
            return Ok(tx.subscribe());
        }
        let (tx, rx) = watch::channel(store.head(account)?);
        map.insert(account, tx);
        Ok(rx)
    }

    /// Records a new Head; wakes the account's Log streams.
    pub fn publish(&self, account: AccountId, head: LogOffset) {
        if let Ok(map) = self.inner.lock()
            && let Some(tx) = map.get(&account)
        {
            tx.send_if_modified(|h| {
                let newer = head > *h;
                if newer {
                    *h = head;
                }
                newer
            });
        }
    }
}
