#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use crate::limits::{MAX_ERRORS, MAX_LINE_LEN};
use crate::{Config, Event, Outcome, Protocol, Session, Verdict};

/// What a driver saw: every reply line, the delivered messages, and aborts.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    replies: Vec<String>,
    messages: Vec<Vec<u8>>,
    aborts: usize,
    starttls: usize,
    closed: bool,
}

impl Seen {
    fn codes(&self) -> Vec<u16> {
        self.replies
            .iter()
            .filter(|r| r.as_bytes().get(3) == Some(&b' '))
            .map(|r| r[..3].parse().unwrap())
            .collect()
    }
}

enum Kind {
    NeedInput,
    Data,
    Recipient(String),
    MessageStart,
    MessageAbort,
    MessageEnd,
    StartTls,
    Close,
}

fn lmtp() -> Config {
    Config::new(Protocol::Lmtp, "mx.test", 1000)
}

fn smtp() -> Config {
    let mut c = Config::new(Protocol::Smtp, "mx.test", 1000);
    c.starttls = true;
    c
}

/// A driver that accepts recipients containing "ann" or "bob" and delivers every message.
/// Feeds `input` in the given chunk sizes (the rest in one piece).
fn drive(cfg: Config, input: &[u8], chunks: &[usize]) -> Seen {
    let mut s: Session<u32> = Session::new(cfg);
    let mut seen = Seen::default();
    let mut out = s.take_output();
    let mut buf: Vec<u8> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut fed = 0;
    let mut pieces = chunks.iter().copied().chain(std::iter::repeat(usize::MAX));
    'outer: loop {
        let n = pieces.next().unwrap().max(1).min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let (used, kind) = {
                let (used, ev) = s.advance(&buf);
                let kind = match ev {
                    Event::NeedInput => Kind::NeedInput,
                    Event::Data(d) => {
                        assert!(!d.is_empty());
                        current.as_mut().unwrap().extend_from_slice(d);
                        Kind::Data
                    }
                    Event::Recipient(a) => Kind::Recipient(a),
                    Event::MessageStart => Kind::MessageStart,
                    Event::MessageAbort => Kind::MessageAbort,
                    Event::MessageEnd => Kind::MessageEnd,
                    Event::StartTls => Kind::StartTls,
                    Event::Close => Kind::Close,
                };
                (used, kind)
            };
            buf.drain(..used);
            match kind {
                Kind::NeedInput => break,
                Kind::Data => {}
                Kind::Recipient(a) => s.recipient(if a.contains("ann") || a.contains("bob") {
                    Verdict::Accept(1)
                } else {
                    Verdict::Unknown
                }),
                Kind::MessageStart => current = Some(Vec::new()),
                Kind::MessageAbort => {
                    current = None;
                    seen.aborts += 1;
                }
                Kind::MessageEnd => {
                    seen.messages.push(current.take().unwrap());
                    let n = s.recipients().len();
                    s.message_done(&vec![Outcome::Delivered; n]);
                }
                Kind::StartTls => seen.starttls += 1,
                Kind::Close => {
                    seen.closed = true;
                    break 'outer;
                }
            }
        }
        out.extend(s.take_output());
        if fed == input.len() {
            break;
        }
    }
    out.extend(s.take_output());
    let text = String::from_utf8(out).unwrap();
    seen.replies = text.split_terminator("\r\n").map(String::from).collect();
    seen
}

const LMTP_TWO_OF_THREE: &[u8] = b"LHLO mta.test\r\n\
MAIL FROM:<x@remote.test>\r\n\
RCPT TO:<ann@example.org>\r\n\
RCPT TO:<nobody@example.org>\r\n\
RCPT TO:<bob@example.org>\r\n\
DATA\r\n\
Subject: hi\r\n\r\n..leading dot\r\n.\r\n\
QUIT\r\n";

#[test]
fn lmtp_per_recipient_replies_with_pipelining_in_any_split() {
    let whole = drive(lmtp(), LMTP_TWO_OF_THREE, &[]);
    assert_eq!(
        whole.codes(),
        [220, 250, 250, 250, 550, 250, 354, 250, 250, 221]
    );
    assert!(whole.replies.iter().any(|r| r == "250-PIPELINING"));
    assert!(
        whole
            .replies
            .contains(&"250 2.0.0 <bob@example.org> delivered".to_string())
    );
    assert_eq!(
        whole.messages,
        [b"Subject: hi\r\n\r\n.leading dot\r\n".to_vec()]
    );
    assert!(whole.closed);
    // Byte by byte gives exactly the same result.
    assert_eq!(drive(lmtp(), LMTP_TWO_OF_THREE, &[1; 400]), whole);
}

#[test]
fn smtp_smuggling_never_ends_data_and_rejects_the_message() {
    for bad in [
        &b"\n.\n"[..],
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r\n.\rX",
    ] {
        let mut input = b"EHLO c\r\nMAIL FROM:<x@y>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n\
Subject: first\r\n\r\nbody\r\n"
            .to_vec();
        input.extend_from_slice(bad);
        input.extend_from_slice(
            b"MAIL FROM:<evil@y>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n\
Subject: smuggled\r\n\r\n.\r\nNOOP\r\n",
        );
        for chunks in [&[][..], &[1; 300][..]] {
            let seen = drive(smtp(), &input, chunks);
            assert!(seen.messages.is_empty(), "{bad:?}: nothing is delivered");
            assert_eq!(seen.aborts, 1, "{bad:?}");
            // 220, EHLO, MAIL, RCPT, 354, then 554 only at the real end, then NOOP's 250.
            assert_eq!(
                seen.codes(),
                [220, 250, 250, 250, 354, 554, 250],
                "{bad:?}: {:?}",
                seen.replies
            );
        }
    }
}

#[test]
fn dot_unstuffing_and_empty_message() {
    let s = drive(
        lmtp(),
        b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ann@x>\r\nDATA\r\n.\r\n\
MAIL FROM:<>\r\nRCPT TO:<ann@x>\r\nDATA\r\n..\r\n...x\r\n.y\r\n\r\n.\r\n",
        &[],
    );
    assert_eq!(
        s.messages,
        [b"".to_vec(), b".\r\n..x\r\ny\r\n\r\n".to_vec()]
    );
}

#[test]
fn message_size_limit_is_crossed() {
    let with_body = |n: usize| {
        let mut v =
            b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ann@x>\r\nRCPT TO:<bob@x>\r\nDATA\r\n".to_vec();
        let mut body = "x".repeat(n - 2).into_bytes();
        body.extend_from_slice(b"\r\n");
        v.extend_from_slice(&body);
        v.extend_from_slice(b".\r\nNOOP\r\n");
        v
    };
    let ok = drive(lmtp(), &with_body(1000), &[]);
    assert_eq!(ok.messages.len(), 1);
    assert_eq!(ok.codes(), [220, 250, 250, 250, 250, 354, 250, 250, 250]);
    let big = drive(lmtp(), &with_body(1001), &[7; 500]);
    assert!(big.messages.is_empty());
    assert_eq!(big.aborts, 1);
    // One 552 per recipient, then the session goes on.
    assert_eq!(big.codes(), [220, 250, 250, 250, 250, 354, 552, 552, 250]);
    // Announced too large: refused at MAIL.
    let s = drive(
        lmtp(),
        b"LHLO c\r\nMAIL FROM:<> SIZE=1001\r\nMAIL FROM:<> SIZE=1000\r\n",
        &[],
    );
    assert_eq!(s.codes(), [220, 250, 552, 250]);
}

#[test]
fn recipient_limit_is_crossed() {
    let mut cfg = lmtp();
    cfg.max_recipients = 2;
    let s = drive(
        cfg,
        b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ann@x>\r\nRCPT TO:<bob@x>\r\nRCPT TO:<ann2@x>\r\n\
DATA\r\nhi\r\n.\r\n",
        &[],
    );
    assert_eq!(s.codes(), [220, 250, 250, 250, 250, 452, 354, 250, 250]);
    assert_eq!(s.messages.len(), 1);
}

#[test]
fn line_length_limit_is_crossed_and_the_session_goes_on() {
    let at_limit = format!("NOOP {}\r\n", "a".repeat(MAX_LINE_LEN - 7));
    let over = format!("NOOP {}\r\n", "a".repeat(MAX_LINE_LEN - 6));
    let far_over = format!("NOOP {}\r\n", "a".repeat(MAX_LINE_LEN * 5));
    let input = format!("{at_limit}{over}{far_over}NOOP\r\n");
    for chunks in [&[][..], &[100; 200][..]] {
        let s = drive(lmtp(), input.as_bytes(), chunks);
        assert_eq!(s.codes(), [220, 250, 500, 500, 250], "{chunks:?}");
    }
}

#[test]
fn sequence_errors_and_the_error_limit() {
    let s = drive(
        smtp(),
        b"MAIL FROM:<a@b>\r\nLHLO x\r\nEHLO x\r\nRCPT TO:<ann@x>\r\nDATA\r\n\
MAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<zed@x>\r\nDATA\r\nBDAT 10 LAST\r\nNOOP\n",
        &[],
    );
    assert_eq!(
        s.codes(),
        [
            220, 503, 500, 250, 503, 503, 250, 503, 554, 550, 554, 502, 500
        ]
    );
    let spam = "FOO\r\n".repeat(MAX_ERRORS + 5);
    let s = drive(smtp(), spam.as_bytes(), &[]);
    assert!(s.closed);
    assert_eq!(s.codes().len(), 1 + MAX_ERRORS + 2);
    assert_eq!(s.codes().last(), Some(&421));
}

#[test]
fn starttls_discards_pipelined_plaintext_and_forgets_the_session() {
    let s = drive(
        smtp(),
        b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n",
        &[],
    );
    assert_eq!(s.starttls, 1);
    assert_eq!(s.codes(), [220, 250, 220]);
    assert!(s.replies.iter().any(|r| &r[4..] == "STARTTLS"));
    // LMTP does not offer it.
    let s = drive(lmtp(), b"LHLO c\r\nSTARTTLS\r\n", &[]);
    assert_eq!(s.codes(), [220, 250, 502]);
}

#[test]
fn after_starttls_ehlo_is_needed_again() {
    let mut s: Session<u32> = Session::new(smtp());
    let _ = s.take_output();
    let (_, e) = s.advance(b"EHLO c\r\n");
    assert_eq!(e, Event::NeedInput);
    assert_eq!(s.advance(b"STARTTLS\r\n").1, Event::StartTls);
    assert!(s.tls_active());
    let _ = s.take_output();
    let (_, e) = s.advance(b"MAIL FROM:<a@b>\r\n");
    assert_eq!(e, Event::NeedInput);
    assert!(
        String::from_utf8(s.take_output())
            .unwrap()
            .starts_with("503")
    );
    let (_, e) = s.advance(b"EHLO c\r\n");
    assert_eq!(e, Event::NeedInput);
    let out = String::from_utf8(s.take_output()).unwrap();
    assert!(!out.contains("STARTTLS"), "{out}");
    assert_eq!(s.with_keyword(), "ESMTPS");
}

fn dot_stuff(lines: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let mut original = Vec::new();
    let mut wire = Vec::new();
    for l in lines {
        original.extend_from_slice(l);
        original.extend_from_slice(b"\r\n");
        if l.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(l);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b".\r\n");
    (original, wire)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any message of CRLF lines survives dot-stuffing and any split of the input.
    #[test]
    fn any_message_in_any_split_arrives_intact(
        lines in prop::collection::vec(
            prop::collection::vec(prop_oneof![Just(b'.'), Just(b'a'), Just(0xc3u8), 0x20u8..0x7f], 0..20),
            0..20,
        ),
        chunks in prop::collection::vec(1usize..40, 0..50),
    ) {
        let (original, wire) = dot_stuff(&lines);
        let mut input = b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ann@x>\r\nDATA\r\n".to_vec();
        input.extend_from_slice(&wire);
        let cfg = Config::new(Protocol::Lmtp, "mx.test", 1 << 20);
        let seen = drive(cfg, &input, &chunks);
        prop_assert_eq!(seen.messages, vec![original]);
    }

    /// Arbitrary bytes never panic, and the session always makes progress.
    #[test]
    fn arbitrary_input_never_panics(
        prefix in prop::sample::select(vec![&b""[..], b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ann@x>\r\nDATA\r\n"]),
        data in prop::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..400),
        chunks in prop::collection::vec(1usize..30, 0..30),
    ) {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&data);
        let _ = drive(lmtp(), &input, &chunks);
        let _ = drive(smtp(), &input, &chunks);
    }
}
