//! Delivery status notifications (RFC 3464) for recipients the relay refused for good.

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};

/// One recipient that will never get the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedRecipient {
    pub address: String,
    /// The SMTP reply code, or 0 when none was received (e.g. the retry period expired
    /// with the relay unreachable).
    pub code: u16,
    /// The relay's reply text, or why the attempt ended.
    pub reason: String,
}

/// What a bounce reports.
#[derive(Clone, Debug)]
pub struct Dsn<'a> {
    /// The host name reported as the Reporting-MTA.
    pub reporting_mta: &'a str,
    /// Where the bounce is addressed: the original envelope sender.
    pub to: &'a str,
    /// The original message's bytes (its header section is attached).
    pub original: &'a [u8],
    /// When the original was submitted, seconds since the Unix epoch.
    pub arrival_s: i64,
    /// Now, seconds since the Unix epoch.
    pub now_s: i64,
    pub failed: &'a [FailedRecipient],
}

/// The bounce message: multipart/report with a human-readable part, the
/// message/delivery-status part, and the original's header section.
pub fn dsn(d: &Dsn<'_>) -> Vec<u8> {
    let mut text = String::from(
        "This is the Postlog mail server.\r\n\r\n\
         Your message could not be delivered to the following recipients:\r\n\r\n",
    );
    for f in d.failed {
        text.push_str(&format!("  <{}>: {}\r\n", f.address, reply(f)));
    }
    text.push_str("\r\nThe headers of your message are attached.\r\n");

    let mut status = format!(
        "Reporting-MTA: dns; {}\r\nArrival-Date: {}\r\n",
        d.reporting_mta,
        rfc5322_date(d.arrival_s)
    );
    for f in d.failed {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\n",
            f.address,
            status_code(f.code)
        ));
        if f.code != 0 {
            status.push_str(&format!(
                "Remote-MTA: dns; relay\r\nDiagnostic-Code: smtp; {} {}\r\n",
                f.code,
                one_line(&f.reason)
            ));
        }
        status.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc5322_date(d.now_s)));
    }

    let head_len = crate::header_section(d.original).unwrap_or(0);
    let headers = String::from_utf8_lossy(&crate::to_crlf(&d.original[..head_len])).into_owned();
    let subject = mail_parser::MessageParser::default()
        .parse_headers(d.original)
        .and_then(|m| m.subject().map(str::to_string))
        .unwrap_or_default();

    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        BodyPart::Multipart(vec![
            MimePart::new(ContentType::new("text/plain"), text),
            MimePart::new(ContentType::new("message/delivery-status"), status),
            MimePart::new(ContentType::new("text/rfc822-headers"), headers),
        ]),
    );
    let id = blake3::hash(&[d.original, &d.now_s.to_le_bytes()].concat()).to_hex();
    MessageBuilder::new()
        .from(("Mail Delivery System", "MAILER-DAEMON@postlog.invalid"))
        .to(d.to)
        .subject(format!("Undelivered Mail Returned to Sender: {subject}"))
        .date(d.now_s)
        .message_id(format!("{}.dsn@{}", &id[..32], d.reporting_mta))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

fn reply(f: &FailedRecipient) -> String {
    if f.code == 0 {
        one_line(&f.reason)
    } else {
        format!("{} {}", f.code, one_line(&f.reason))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The RFC 3463 status for an SMTP reply code: 5xx -> 5.0.0, 4xx (given up) -> 4.4.7
/// (delivery time expired), none -> 4.4.1 (no answer from host).
fn status_code(code: u16) -> &'static str {
    match code {
        500..=599 => "5.0.0",
        400..=499 => "4.4.7",
        _ => "4.4.1",
    }
}

fn rfc5322_date(s: i64) -> String {
    mail_builder::headers::date::Date::new(s).to_rfc822()
}
