use super::*;
use proptest::prelude::*;

const MSG: &[u8] = b"From: Ann <ann@example.org>\n\
To: bob@example.net, \"Cy\" <cy@example.net>\n\
Cc: dee@example.com\n\
Bcc: eve@example.com,\n  fay@example.com\n\
Subject: hello\n\
\n\
Bcc: this line is body text and stays\n\
.leading dot\n";

#[test]
fn submission_takes_envelope_from_headers_or_arguments() {
    let s = submission(MSG, "", &[]).unwrap();
    assert_eq!(s.from, "ann@example.org");
    assert_eq!(
        s.recipients,
        [
            "bob@example.net",
            "cy@example.net",
            "dee@example.com",
            "eve@example.com",
            "fay@example.com"
        ]
    );
    assert_eq!(s.header_from, ["ann@example.org"]);
    let s = submission(MSG, "bounce@example.org", &["x@y.z".into(), "X@y.z".into()]).unwrap();
    assert_eq!(s.from, "bounce@example.org");
    assert_eq!(s.recipients, ["x@y.z"]);
}

#[test]
fn submission_rejects_what_cannot_be_sent() {
    assert_eq!(
        submission(b"\x00\x01garbage", "", &[]),
        Err(MailError::NotMail("no header section"))
    );
    assert_eq!(
        submission(b"Subject: x\n\nbody\n", "", &[]),
        Err(MailError::NotMail("no From address"))
    );
    assert_eq!(
        submission(b"From: a@b.c\nSubject: x\n\nbody\n", "", &[]),
        Err(MailError::NoRecipients)
    );
    assert!(matches!(
        submission(MSG, "", &["not an address".into()]),
        Err(MailError::BadAddress(_))
    ));
    assert!(matches!(
        submission(MSG, "a b@c", &[]),
        Err(MailError::BadSender(_))
    ));
    let many: Vec<String> = (0..=MAX_RECIPIENTS)
        .map(|i| format!("r{i}@x.org"))
        .collect();
    assert_eq!(
        submission(MSG, "", &many),
        Err(MailError::TooManyRecipients)
    );
}

#[test]
fn relay_copy_strips_bcc_only_in_the_header_and_uses_crlf() {
    let out = relay_copy(MSG);
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("eve@"), "{text}");
    assert!(!text.contains("fay@"), "{text}");
    assert!(text.contains("\r\n\r\nBcc: this line is body text and stays\r\n"));
    assert!(text.starts_with("From: Ann <ann@example.org>\r\nTo: "));
    assert!(!text.replace("\r\n", "").contains('\n'));
    assert!(text.contains("Subject: hello\r\n"));
    // A field whose name merely starts with "Bcc" is kept.
    let kept = strip_header(b"Bccx: 1\nBcc : 2\nX: 3\n\nb\n", "Bcc");
    assert_eq!(kept, b"Bccx: 1\nX: 3\n\nb\n");
}

#[test]
fn dsn_is_a_delivery_status_report_for_each_failed_recipient() {
    let failed = [
        FailedRecipient {
            address: "bob@example.net".into(),
            code: 550,
            reason: "5.1.1 no such user".into(),
        },
        FailedRecipient {
            address: "cy@example.net".into(),
            code: 0,
            reason: "retry period expired: connection refused".into(),
        },
    ];
    let bytes = dsn(&Dsn {
        reporting_mta: "mail.example.org",
        to: "ann@example.org",
        original: MSG,
        arrival_s: 1_700_000_000,
        now_s: 1_700_000_100,
        failed: &failed,
    });
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("report-type=\"delivery-status\"")
            || text.contains("report-type=delivery-status")
    );
    assert!(text.contains("Final-Recipient: rfc822; bob@example.net"));
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
    assert!(text.contains("Final-Recipient: rfc822; cy@example.net"));
    assert!(text.contains("Status: 4.4.1"));
    assert!(
        text.contains("Subject: hello"),
        "the original's headers are attached"
    );
    assert!(text.contains("Auto-Submitted: auto-replied"));
    // A bounce is itself a valid message addressed to the sender.
    let s = submission(&bytes, "", &[]).unwrap();
    assert_eq!(s.recipients, ["ann@example.org"]);
}

proptest! {
    #[test]
    fn parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = submission(&bytes, "", &[]);
        let copy = relay_copy(&bytes);
        prop_assert!(!copy.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    }

    #[test]
    fn strip_header_keeps_the_body(body in "[ -~\n]{0,200}") {
        let msg = format!("From: a@b.c\nBcc: x@y.z\n\n{body}");
        let out = strip_header(msg.as_bytes(), "bcc");
        let expected = format!("From: a@b.c\n\n{body}");
        prop_assert_eq!(out, expected.into_bytes());
    }
}

/// Found by fuzzing (fuzz/corpus/mail_submission/regression-bare-cr-bcc): a bare CR that
/// only the CRLF normalisation turned into a line break used to start a Bcc field after
/// the stripping had run, so the relayed copy carried the blind recipients.
#[test]
fn regression_a_bare_cr_cannot_smuggle_bcc_into_the_relay_copy() {
    let out = relay_copy(b"From: a@b.c\nTo: x@y.z\rBcc: secret@e.f\n\nbody\n");
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("secret@"), "{text}");
    assert!(text.contains("To: x@y.z\r\n"), "{text}");
}
