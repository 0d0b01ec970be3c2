//! Trace header fields added on delivery: `Return-Path` and `Received` (RFC 5321 §4.4).
//!
//! Everything that came from the peer (HELO name, addresses) is sanitised before it goes
//! into a header: no whitespace, control characters, parentheses or angle brackets, so a
//! peer cannot inject a header line or unbalance a comment.

/// Where a message came from and how, for its Received header.
#[derive(Clone, Debug)]
pub struct Trace<'a> {
    /// The HELO/EHLO/LHLO name, if any.
    pub helo: Option<&'a str>,
    /// The peer: `[192.0.2.1]`, or a description such as `localhost` for a Unix socket.
    pub peer: &'a str,
    /// This server's host name.
    pub by: &'a str,
    /// RFC 3848 keyword: SMTP, ESMTP, ESMTPS, LMTP, LMTPS, or `local`.
    pub with: &'a str,
    /// An id for this delivery, for log correlation.
    pub id: &'a str,
    /// The recipient, when there is exactly one.
    pub recipient: Option<&'a str>,
}

/// `Return-Path: <sender>` CRLF (`<>` for the null sender).
pub fn return_path(mail_from: &str) -> String {
    if mail_from.is_empty() {
        return "Return-Path: <>\r\n".into();
    }
    format!("Return-Path: <{}>\r\n", clean(mail_from))
}

/// The Received field, folded, ending in CRLF. `unix_secs` is the time of delivery.
pub fn received(t: &Trace<'_>, unix_secs: u64) -> String {
    let mut s = String::from("Received:");
    if let Some(h) = t.helo {
        s.push_str(&format!(" from {} ({})", clean(h), clean(t.peer)));
    } else {
        s.push_str(&format!(" from {}", clean(t.peer)));
    }
    s.push_str(&format!(
        "\r\n\tby {} (Postlog) with {} id {}",
        clean(t.by),
        clean(t.with),
        clean(t.id)
    ));
    if let Some(r) = t.recipient {
        s.push_str(&format!("\r\n\tfor <{}>", clean(r)));
    }
    s.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(unix_secs)));
    s
}

/// Keeps visible characters (ASCII graphic and non-ASCII, as RFC 6532 allows), except
/// those with a meaning in the header; the rest become `_`. Never empty.
fn clean(s: &str) -> String {
    let out: String = s
        .chars()
        .take(crate::limits::MAX_ADDRESS_LEN)
        .map(|c| {
            let bad = c.is_control() || c.is_whitespace() || "()<>;\\".contains(c);
            if bad { '_' } else { c }
        })
        .collect();
    if out.is_empty() { "_".into() } else { out }
}

/// `Fri, 27 Nov 2026 12:00:00 +0000` (RFC 5322 §3.3), in UTC.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{}, {d} {} {y} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_780_800),
            "Fri, 27 Nov 2026 12:00:00 +0000"
        );
    }

    #[test]
    fn received_is_folded_and_sanitised() {
        let t = Trace {
            helo: Some("evil\r\nX-Injected: 1"),
            peer: "[127.0.0.1]",
            by: "mx.example.org",
            with: "LMTP",
            id: "0123abcd",
            recipient: Some("ann@example.org>\r\nBcc: x"),
        };
        let r = received(&t, 0);
        assert_eq!(
            r,
            "Received: from evil__X-Injected:_1 ([127.0.0.1])\r\n\tby mx.example.org (Postlog) \
             with LMTP id 0123abcd\r\n\tfor <ann@example.org___Bcc:_x>;\r\n\t\
             Thu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
        assert_eq!(return_path(""), "Return-Path: <>\r\n");
        assert_eq!(return_path("a@b"), "Return-Path: <a@b>\r\n");
    }
}
