//! The relay worker: sends queued mail to the configured SMTP relay and reports each
//! attempt back to the store.
//!
//! One task, one message at a time, one SMTP connection per message (lettre's low-level
//! `AsyncSmtpConnection`, so every RCPT gets its own answer). Per recipient: 2xx delivered;
//! 5xx failed for good (bounce); 4xx, a dropped connection or an unreachable relay: retried
//! with exponential backoff until the retry period runs out, then failed (bounce). The
//! outcome, the bounce and the final tags are committed together
//! ([`NewRecord::Relayed`]); a crash between the relay's 250 and that commit sends the
//! message again after restart (at-least-once, as every MTA).

use std::sync::Arc;
use std::time::Duration;

use lettre::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use postlog_mail::FailedRecipient;
use postlog_store::{Delivery, NewRecord, QueuedSend, RecipientReport};
use tokio::sync::{Notify, watch};

use crate::config::{RelayTarget, RelayTls};
use crate::handlers::{append_to, blob_writer, finish_blob};
use crate::server::Shared;

/// Most queued messages read per look at the queue.
const DUE_BATCH: usize = 32;
/// Longest sleep between looks at the queue when nothing is due sooner.
const IDLE_RECHECK: Duration = Duration::from_secs(60);

/// The relay's settings, resolved from `[relay]` and `postlog serve --relay`.
#[derive(Clone, Debug)]
pub(crate) struct Relay {
    /// `None` without a configured relay: mail stays queued and, after the retry period,
    /// bounces ("no relay is configured").
    pub target: Option<RelayTarget>,
    pub ca_pem: Option<Vec<u8>>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub retry_period: Duration,
    pub timeout: Duration,
    pub bounce_tags: Vec<String>,
    pub hostname: String,
}

/// Runs until `stop` turns true. Wakes when `wake` is notified (a new Send) or when the
/// next queued recipient is due.
pub(crate) async fn run(
    shared: Arc<Shared>,
    relay: Relay,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    match &relay.target {
        Some(t) => tracing::info!(host = %t.host, port = t.port, "relay worker started"),
        None => tracing::info!("no [relay] configured: sent mail stays queued until one is"),
    }
    loop {
        if *stop.borrow() {
            return;
        }
        let now = now_ms();
        let s = shared.clone();
        let due = tokio::task::spawn_blocking(move || s.store.relay_due(now, DUE_BATCH)).await;
        let due = match due {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the relay queue");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "relay queue task failed");
                Vec::new()
            }
        };
        if !due.is_empty() {
            for q in due {
                attempt(&shared, &relay, q).await;
            }
            continue;
        }
        let s = shared.clone();
        let next = tokio::task::spawn_blocking(move || s.store.relay_next_due())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let wait = next
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
            .unwrap_or(IDLE_RECHECK)
            .min(IDLE_RECHECK);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
            _ = stop.changed() => {}
        }
    }
}

/// One relay attempt for one message, reported to the store.
async fn attempt(shared: &Arc<Shared>, relay: &Relay, q: QueuedSend) {
    let s = shared.clone();
    let (account, hash) = (q.account, q.hash);
    let bytes = tokio::task::spawn_blocking(move || s.store.read_blob(account, &hash)).await;
    let now = now_ms();
    let reports = match bytes {
        Ok(Ok(Some(bytes))) => {
            let outcomes = send(relay, &q, &postlog_mail::relay_copy(&bytes)).await;
            let r = decide(relay, &q, outcomes, now);
            (r, Some(bytes))
        }
        Ok(Ok(None)) => {
            // The message was deleted while queued: nothing left to send or to bounce.
            let gone = q
                .recipients
                .iter()
                .map(|(r, _)| RecipientReport {
                    recipient: r.clone(),
                    delivery: Delivery::Failed {
                        code: 0,
                        reason: "the message was deleted before it could be sent".into(),
                    },
                })
                .collect();
            (gone, None)
        }
        Ok(Err(e)) => {
            tracing::error!(%hash, error = %e, "cannot read a queued message; retrying later");
            let r = retry_all(relay, &q, &format!("storage error: {e}"), now);
            (r, None)
        }
        Err(e) => {
            tracing::error!(%hash, error = %e, "relay read task failed");
            return;
        }
    };
    let (reports, original) = reports;
    let failed: Vec<FailedRecipient> = reports
        .iter()
        .filter_map(|r| match &r.delivery {
            Delivery::Failed { code, reason } => Some(FailedRecipient {
                address: r.recipient.clone(),
                code: *code,
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect();
    for r in &reports {
        tracing::info!(%hash, to = %r.recipient, outcome = ?r.delivery, "relay attempt");
    }
    let bounce = match (&original, failed.is_empty()) {
        (Some(original), false) => {
            let dsn = postlog_mail::dsn(&postlog_mail::Dsn {
                reporting_mta: &relay.hostname,
                to: &q.from,
                original,
                arrival_s: (q.created_ms / 1000) as i64,
                now_s: (now / 1000) as i64,
                failed: &failed,
            });
            match stage(shared, &dsn).await {
                Ok(blob) => Some((blob, relay.bounce_tags.clone())),
                Err(e) => {
                    // A failure is recorded only with its bounce: keep the failed recipients
                    // pending (they fail again, and bounce, on a later attempt) but record
                    // the accepted ones, so they are not sent twice.
                    tracing::error!(error = %e, "cannot stage a bounce; retrying later");
                    let next_ms = now + relay.retry_initial.as_millis() as u64;
                    let reports = reports
                        .into_iter()
                        .map(|mut r| {
                            if let Delivery::Failed { reason, .. } = &r.delivery {
                                r.delivery = Delivery::Retry {
                                    reason: reason.clone(),
                                    next_ms,
                                };
                            }
                            r
                        })
                        .collect();
                    let record = NewRecord::Relayed {
                        hash,
                        reports,
                        bounce: None,
                    };
                    if let Err(e) = append_to(shared, account, record).await {
                        tracing::error!(%hash, error = %e, "cannot record a relay attempt");
                        tokio::time::sleep(relay.retry_initial).await;
                    }
                    return;
                }
            }
        }
        _ => None,
    };
    let record = NewRecord::Relayed {
        hash,
        reports,
        bounce,
    };
    if let Err(e) = append_to(shared, account, record).await {
        tracing::error!(%hash, error = %e, "cannot record a relay attempt");
        // Back off so a failing store is not hammered; the rows stay due.
        tokio::time::sleep(relay.retry_initial).await;
    }
}

async fn stage(
    shared: &Arc<Shared>,
    bytes: &[u8],
) -> Result<postlog_store::StagedBlob, postlog_store::StoreError> {
    let mut w = blob_writer(shared, u64::MAX).await?;
    w.write(bytes)?;
    finish_blob(w).await
}

/// What the relay said about one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Accepted(String),
    /// A reply with this code (4xx or 5xx).
    Refused(u16, String),
    /// No answer: the connection failed before this recipient was settled.
    NoAnswer(String),
}

/// The SMTP transaction: per recipient what the relay answered.
async fn send(relay: &Relay, q: &QueuedSend, message: &[u8]) -> Vec<(String, Outcome)> {
    let rcpts: Vec<String> = q.recipients.iter().map(|(r, _)| r.clone()).collect();
    match transaction(relay, &q.from, &rcpts, message).await {
        Ok(v) => v,
        Err(TxError { code, text }) => rcpts
            .into_iter()
            .map(|r| {
                let o = match code {
                    Some(c) => Outcome::Refused(c, text.clone()),
                    None => Outcome::NoAnswer(text.clone()),
                };
                (r, o)
            })
            .collect(),
    }
}

type SmtpError = lettre::transport::smtp::Error;

/// A failure of the whole transaction: the reply code if the relay answered.
struct TxError {
    code: Option<u16>,
    text: String,
}

impl From<SmtpError> for TxError {
    fn from(e: SmtpError) -> Self {
        let (code, text) = error_reply(&e);
        TxError { code, text }
    }
}

fn error_reply(e: &SmtpError) -> (Option<u16>, String) {
    (e.status().map(u16::from), e.to_string())
}

/// Connects, secures and authenticates. Any failure here (including a 5xx to STARTTLS or
/// AUTH: a relay misconfigured on our side) is temporary for the queued mail: it is retried,
/// and bounces only when the retry period runs out.
async fn connect(relay: &Relay, t: &RelayTarget) -> Result<AsyncSmtpConnection, SmtpError> {
    let hello = ClientId::Domain(relay.hostname.clone());
    let tls = || {
        let mut b = TlsParameters::builder(t.host.clone());
        if let Some(pem) = &relay.ca_pem {
            b = b.add_root_certificate(Certificate::from_pem(pem)?);
        }
        b.build_rustls()
    };
    let implicit = match t.tls {
        RelayTls::Implicit => Some(tls()?),
        _ => None,
    };
    let mut conn = AsyncSmtpConnection::connect_tokio1(
        (t.host.as_str(), t.port),
        Some(relay.timeout),
        &hello,
        implicit,
        None,
    )
    .await?;
    if t.tls == RelayTls::StartTls {
        conn.starttls(tls()?, &hello).await?;
    }
    if let (Some(user), Some(pass)) = (&t.user, &t.password) {
        let creds = Credentials::new(user.clone(), pass.clone());
        conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds)
            .await?;
    }
    Ok(conn)
}

async fn transaction(
    relay: &Relay,
    from: &str,
    rcpts: &[String],
    message: &[u8],
) -> Result<Vec<(String, Outcome)>, TxError> {
    let Some(target) = &relay.target else {
        return Err(TxError {
            code: None,
            text: "no relay is configured ([relay] url in postlog.toml)".into(),
        });
    };
    let mut conn = match tokio::time::timeout(relay.timeout, connect(relay, target)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(TxError {
                code: None,
                text: format!("relay {}:{}: {e}", target.host, target.port),
            });
        }
        Err(_) => {
            return Err(TxError {
                code: None,
                text: "the relay did not answer in time".into(),
            });
        }
    };
    let mut params = Vec::new();
    if !message.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    if (!from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii()))
        && conn.server_info().supports_feature(Extension::SmtpUtfEight)
    {
        params.push(MailParameter::SmtpUtfEight);
    }
    let sender = if from.is_empty() {
        None
    } else {
        Some(parse_address(from)?)
    };
    conn.command(Mail::new(sender, params)).await?;
    let mut out = Vec::with_capacity(rcpts.len());
    let mut accepted = Vec::new();
    for r in rcpts {
        let addr = match r.parse::<Address>() {
            Ok(a) => a,
            Err(e) => {
                out.push((
                    r.clone(),
                    Outcome::Refused(553, format!("invalid address: {e}")),
                ));
                continue;
            }
        };
        match conn.command(Rcpt::new(addr, vec![])).await {
            Ok(resp) => accepted.push((r.clone(), one_line(resp.message()))),
            Err(e) if e.status().is_some() => {
                let (code, text) = error_reply(&e);
                out.push((r.clone(), Outcome::Refused(code.unwrap_or(0), text)));
            }
            Err(e) => {
                // The connection broke: every recipient not yet settled gets no answer.
                let text = e.to_string();
                for (a, _) in accepted.drain(..) {
                    out.push((a, Outcome::NoAnswer(text.clone())));
                }
                let settled: Vec<String> = out.iter().map(|(r, _)| r.clone()).collect();
                for r2 in rcpts.iter().filter(|x| !settled.contains(x)) {
                    out.push((r2.clone(), Outcome::NoAnswer(text.clone())));
                }
                return Ok(out);
            }
        }
    }
    if accepted.is_empty() {
        let _ = conn.quit().await;
        return Ok(out);
    }
    let data = match conn.command(Data).await {
        Ok(_) => conn.message(message).await,
        Err(e) => Err(e),
    };
    match data {
        Ok(resp) => {
            let reply = format!("{} {}", u16::from(resp.code()), one_line(resp.message()));
            out.extend(
                accepted
                    .into_iter()
                    .map(|(r, _)| (r, Outcome::Accepted(reply.clone()))),
            );
        }
        Err(e) => {
            let (code, text) = error_reply(&e);
            out.extend(accepted.into_iter().map(|(r, _)| {
                let o = match code {
                    Some(c) => Outcome::Refused(c, text.clone()),
                    None => Outcome::NoAnswer(text.clone()),
                };
                (r, o)
            }));
        }
    }
    let _ = conn.quit().await;
    Ok(out)
}

fn one_line<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    parts.collect::<Vec<_>>().join(" ")
}

/// An unusable envelope sender fails every recipient for good, as a relay's 553 would.
fn parse_address(a: &str) -> Result<Address, TxError> {
    a.parse::<Address>().map_err(|e| TxError {
        code: Some(553),
        text: format!("invalid sender address {a:?}: {e}"),
    })
}

/// Turns the relay's answers into queue updates: accepted, failed for good, or retried.
fn decide(
    relay: &Relay,
    q: &QueuedSend,
    outcomes: Vec<(String, Outcome)>,
    now: u64,
) -> Vec<RecipientReport> {
    let attempts = |r: &str| {
        q.recipients
            .iter()
            .find(|(x, _)| x == r)
            .map_or(0, |(_, a)| *a)
    };
    let expired = now.saturating_sub(q.created_ms) >= relay.retry_period.as_millis() as u64;
    outcomes
        .into_iter()
        .map(|(recipient, o)| {
            let delivery = match o {
                Outcome::Accepted(reply) => Delivery::Delivered { reply },
                Outcome::Refused(code, reason) if (500..600).contains(&code) => {
                    Delivery::Failed { code, reason }
                }
                Outcome::Refused(code, reason) if expired => Delivery::Failed {
                    code,
                    reason: format!("gave up after the retry period; last reply: {reason}"),
                },
                Outcome::NoAnswer(reason) if expired => Delivery::Failed {
                    code: 0,
                    reason: format!("gave up after the retry period; last error: {reason}"),
                },
                Outcome::Refused(_, reason) | Outcome::NoAnswer(reason) => Delivery::Retry {
                    next_ms: now + backoff(relay, attempts(&recipient)).as_millis() as u64,
                    reason,
                },
            };
            RecipientReport {
                recipient,
                delivery,
            }
        })
        .collect()
}

fn retry_all(relay: &Relay, q: &QueuedSend, reason: &str, now: u64) -> Vec<RecipientReport> {
    let outcomes = q
        .recipients
        .iter()
        .map(|(r, _)| (r.clone(), Outcome::NoAnswer(reason.to_string())))
        .collect();
    decide(relay, q, outcomes, now)
}

/// retry_initial, doubled per earlier attempt, at most retry_max.
fn backoff(relay: &Relay, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX);
    relay
        .retry_initial
        .saturating_mul(factor)
        .min(relay.retry_max)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Relay {
        Relay {
            target: RelayTarget::parse("smtp+plain://127.0.0.1:25").ok(),
            ca_pem: None,
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            retry_period: Duration::from_secs(5 * 86400),
            timeout: Duration::from_secs(30),
            bounce_tags: vec![],
            hostname: "h".into(),
        }
    }

    #[test]
    fn outcomes_become_delivered_failed_or_retried_with_backoff() {
        let r = relay();
        let q = QueuedSend {
            account: 1,
            hash: postlog_proto::BlobHash([0; 32]),
            send_offset: 0,
            from: "a@b.c".into(),
            created_ms: 1_000,
            recipients: vec![("x@y".into(), 0), ("z@y".into(), 3), ("w@y".into(), 40)],
        };
        let out = decide(
            &r,
            &q,
            vec![
                ("x@y".into(), Outcome::Refused(451, "later".into())),
                ("z@y".into(), Outcome::NoAnswer("refused".into())),
                ("w@y".into(), Outcome::Refused(550, "no".into())),
            ],
            2_000,
        );
        assert_eq!(
            out[0].delivery,
            Delivery::Retry {
                reason: "later".into(),
                next_ms: 2_000 + 60_000
            }
        );
        assert_eq!(
            out[1].delivery,
            Delivery::Retry {
                reason: "refused".into(),
                next_ms: 2_000 + 8 * 60_000
            }
        );
        assert!(matches!(
            out[2].delivery,
            Delivery::Failed { code: 550, .. }
        ));
        assert_eq!(backoff(&r, 40), Duration::from_secs(3600));
        // After the retry period every temporary failure becomes final.
        let late = 1_000 + 5 * 86_400_000;
        let out = decide(
            &r,
            &q,
            vec![("x@y".into(), Outcome::Refused(451, "later".into()))],
            late,
        );
        assert!(matches!(
            out[0].delivery,
            Delivery::Failed { code: 451, .. }
        ));
    }
}
