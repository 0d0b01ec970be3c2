//! The retention timer: every `retention.interval_secs`, each account's messages are
//! checked against its rules (delete what has carried a tag for too long) and long tag
//! histories are compacted. Both go through the store's writer like any other append
//! (`NewRecord::Expire`, `NewRecord::Compact`), which re-checks the condition inside its
//! transaction, so a tag removed meanwhile saves the message.

use std::sync::Arc;
use std::time::Duration;

use postlog_store::{NewRecord, StoreError};
use tokio::sync::watch;

use crate::handlers::append_to;
use crate::server::Shared;

/// Runs sweeps until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_secs(shared.config.retention.interval_secs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match sweep(&shared).await {
            Ok((deleted, compacted)) if deleted + compacted > 0 => {
                tracing::info!(deleted, compacted, "retention sweep");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep failed; next one in {interval:?}")
            }
        }
    }
}

/// One pass over every account: (messages deleted, messages compacted).
pub(crate) async fn sweep(shared: &Arc<Shared>) -> Result<(u64, u64), StoreError> {
    let cfg = &shared.config.retention;
    let s = shared.clone();
    let accounts = tokio::task::spawn_blocking(move || s.store.accounts())
        .await
        .map_err(|e| StoreError::Stopped(format!("sweep task: {e}")))??;
    let (mut deleted, mut compacted) = (0, 0);
    for (account, name) in accounts {
        let rules = cfg.rules_for(&name).to_vec();
        if rules.is_empty() && cfg.compact_after == 0 {
            continue;
        }
        let s = shared.clone();
        let messages = tokio::task::spawn_blocking(move || s.store.summaries(account))
            .await
            .map_err(|e| StoreError::Stopped(format!("sweep task: {e}")))??;
        let now = now_ms();
        for m in messages {
            let mut gone = false;
            for rule in &rules {
                if !m.state.has(&rule.tag) {
                    continue;
                }
                let record = NewRecord::Expire {
                    hash: m.hash,
                    tag: rule.tag.clone(),
                    set_before_ms: now.saturating_sub(rule.after_secs.saturating_mul(1000)),
                };
                if append_to(shared, account, record).await?.new {
                    deleted += 1;
                    gone = true;
                    break;
                }
            }
            if !gone
                && cfg.compact_after > 0
                && m.tag_records > cfg.compact_after
                && append_to(shared, account, NewRecord::Compact { hash: m.hash })
                    .await?
                    .new
            {
                compacted += 1;
            }
        }
    }
    Ok((deleted, compacted))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
