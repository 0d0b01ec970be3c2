//! Mail handling for sending, sans-IO: what the server and the `sendmail` client need to
//! know about a message's bytes.
//!
//! - [`submission`]: parses a message handed to `Send` (mail-parser) into a [`Submission`]:
//!   the envelope sender, the envelope recipients (explicit, or To/Cc/Bcc) and the From
//!   addresses the server checks against the account's own.
//! - [`relay_copy`]: the bytes that go to the SMTP relay: Bcc removed, CRLF line endings.
//! - [`dsn`]: a delivery status notification (RFC 3464) for recipients that failed.
//!
//! Nothing here touches files, sockets or clocks; times come in as arguments.

mod dsn;
mod headers;

pub use dsn::{Dsn, FailedRecipient, dsn};
pub use headers::{header_section, relay_copy, strip_header, to_crlf};

use mail_parser::{Address, MessageParser};

/// Longest mail address accepted, in bytes (RFC 5321 path limit).
pub const MAX_ADDRESS_LEN: usize = 256;
/// Most envelope recipients of one message.
pub const MAX_RECIPIENTS: usize = 1000;

/// Why a message cannot be sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MailError {
    /// The bytes are not a mail message (no header section, no From address).
    #[error("not a mail message: {0}")]
    NotMail(&'static str),
    /// No envelope recipient, explicit or in To/Cc/Bcc.
    #[error("the message has no recipients (no To, Cc or Bcc, and none given)")]
    NoRecipients,
    /// More than [`MAX_RECIPIENTS`].
    #[error("more than {MAX_RECIPIENTS} recipients")]
    TooManyRecipients,
    /// A recipient address that is not `local@domain`.
    #[error("invalid address {0:?}")]
    BadAddress(String),
    /// The envelope sender is not a usable `local@domain` address.
    #[error("invalid sender address {0:?}")]
    BadSender(String),
}

/// A message ready for the relay queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// The envelope sender (MAIL FROM).
    pub from: String,
    /// The envelope recipients (RCPT TO), deduplicated, in order of first appearance.
    pub recipients: Vec<String>,
    /// Every address in the From header (the server checks each belongs to the sender).
    pub header_from: Vec<String>,
    /// The Sender header's address, if any.
    pub header_sender: Option<String>,
}

/// Parses a message submitted for sending. `from` (empty: the first From address) and
/// `recipients` (empty: every To, Cc and Bcc address) are the explicit envelope.
pub fn submission(
    bytes: &[u8],
    from: &str,
    recipients: &[String],
) -> Result<Submission, MailError> {
    if header_section(bytes).is_none() {
        return Err(MailError::NotMail("no header section"));
    }
    let msg = MessageParser::default()
        .parse_headers(bytes)
        .ok_or(MailError::NotMail("unparseable header section"))?;
    let header_from = addresses(msg.from());
    if header_from.is_empty() {
        return Err(MailError::NotMail("no From address"));
    }
    let header_sender = addresses(msg.sender()).into_iter().next();
    let from = if from.is_empty() {
        header_from[0].clone()
    } else {
        from.to_string()
    };
    check_address(&from).map_err(|_| MailError::BadSender(from.chars().take(80).collect()))?;
    let mut rcpts: Vec<String> = Vec::new();
    let explicit = !recipients.is_empty();
    let listed = if explicit {
        recipients.to_vec()
    } else {
        let mut all = addresses(msg.to());
        all.extend(addresses(msg.cc()));
        all.extend(addresses(msg.bcc()));
        all
    };
    for r in listed {
        check_address(&r)?;
        if !rcpts.iter().any(|x| x.eq_ignore_ascii_case(&r)) {
            rcpts.push(r);
        }
    }
    if rcpts.is_empty() {
        return Err(MailError::NoRecipients);
    }
    if rcpts.len() > MAX_RECIPIENTS {
        return Err(MailError::TooManyRecipients);
    }
    Ok(Submission {
        from,
        recipients: rcpts,
        header_from,
        header_sender,
    })
}

/// Every address of an address header, groups flattened; empty entries dropped.
fn addresses(a: Option<&Address<'_>>) -> Vec<String> {
    let Some(a) = a else { return Vec::new() };
    a.iter()
        .filter_map(|addr| addr.address())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A usable SMTP path: `local@domain`, printable ASCII or UTF-8 without spaces, controls
/// or angle brackets, at most [`MAX_ADDRESS_LEN`] bytes.
pub fn check_address(a: &str) -> Result<(), MailError> {
    let bad = || MailError::BadAddress(a.chars().take(80).collect());
    if a.len() > MAX_ADDRESS_LEN
        || a.chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
    {
        return Err(bad());
    }
    match a.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests;
