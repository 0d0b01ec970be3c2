use super::*;
use crate::frame;
use proptest::prelude::*;

fn h(b: u8) -> BlobHash {
    BlobHash([b; 32])
}

/// Test vectors: the exact bytes docs/PROTOCOL.md lists. A change here is a protocol change.
pub(crate) fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    let req = |r: Request| r.encode();
    let resp = |r: Response| r.encode();
    vec![
        (
            "Request::Auth",
            req(Request::Auth {
                account: "ann".into(),
                device: 1,
                secret: [7; 32],
            }),
        ),
        ("Request::Head", req(Request::Head)),
        (
            "Request::Log",
            req(Request::Log {
                from: 1000,
                inline_blobs: true,
            }),
        ),
        (
            "Request::Store",
            req(Request::Store {
                size: 5,
                tags: vec!["inbox".into()],
            }),
        ),
        ("Request::Fetch", req(Request::Fetch { hash: h(0xab) })),
        (
            "Response::Error",
            resp(Response::Error {
                code: 5,
                message: "not found".into(),
            }),
        ),
        ("Response::AuthOk", resp(Response::AuthOk { head: 42 })),
        ("Response::Head", resp(Response::Head { head: 42 })),
        (
            "Response::Entry(Store)",
            resp(Response::Entry(LogEntry {
                offset: 0,
                time_ms: 1_700_000_000_000,
                record: Record::Store {
                    hash: BlobHash::of(b"hello"),
                    size: 5,
                    tags: vec!["inbox".into(), "unread".into()],
                },
            })),
        ),
        ("Response::Live", resp(Response::Live { head: 3 })),
        (
            "Response::Stored",
            resp(Response::Stored {
                hash: h(1),
                offset: 7,
                new: true,
            }),
        ),
        ("Response::Blob", resp(Response::Blob { size: 300 })),
        (
            "Record::Send",
            Record::Send {
                hash: h(2),
                size: 10,
                from: "a@x.org".into(),
                recipients: vec!["b@y.org".into()],
            }
            .encode(),
        ),
        (
            "Record::Tags",
            Record::Tags {
                hash: h(3),
                add: vec!["flagged".into()],
                remove: vec!["unread".into()],
                seen: 9,
                device: 2,
                seq: 1,
            }
            .encode(),
        ),
        (
            "Record::Scrub",
            Record::Scrub {
                offsets: vec![0, 24, 500],
            }
            .encode(),
        ),
        (
            "Request::Tag",
            req(Request::Tag {
                hash: h(3),
                add: vec!["flagged".into()],
                remove: vec!["unread".into()],
                seen: 9,
                seq: 1,
            }),
        ),
        (
            "Response::Tagged",
            resp(Response::Tagged {
                offset: 10,
                new: true,
            }),
        ),
        (
            "Request::Send",
            req(Request::Send {
                size: 10,
                from: "a@x.org".into(),
                recipients: vec!["b@y.org".into()],
            }),
        ),
        (
            "Response::Sent",
            resp(Response::Sent {
                hash: h(2),
                offset: 11,
                new: true,
            }),
        ),
    ]
}

#[test]
fn vectors_match_protocol_md() {
    let doc = include_str!("../../../../docs/PROTOCOL.md");
    for (name, bytes) in vectors() {
        let hex = hex::encode(&bytes);
        let line = format!("| {name} | `{hex}` |");
        assert!(
            doc.contains(&line),
            "docs/PROTOCOL.md lacks the vector line:\n{line}"
        );
    }
}

#[test]
fn decoders_reject_malformed_input() {
    // Unknown request type.
    assert_eq!(
        Request::decode(&[0x81, 0x18, 99]).map_err(|e| e.code()),
        Err(crate::ErrorCode::UnknownRequest)
    );
    // Truncated: array of 2 with one element.
    assert_eq!(Request::decode(&[0x82, 0x02]), Err(DecodeError::Truncated));
    // Hash of 31 bytes.
    let mut bad = vec![0x82, 0x04, 0x58, 31];
    bad.extend([0u8; 31]);
    assert_eq!(
        Request::decode(&bad),
        Err(DecodeError::InvalidField("hash"))
    );
    // Trailing bytes after a complete message.
    assert_eq!(
        Request::decode(&[0x81, 0x01, 0x00]),
        Err(DecodeError::TrailingBytes(1))
    );
    // Indefinite arrays are not accepted.
    assert!(Request::decode(&[0x9f, 0x01, 0xff]).is_err());
    // Empty message.
    assert!(Request::decode(&[0x80]).is_err());
    // Tag with a control character.
    let r = Request::Store {
        size: 1,
        tags: vec!["a\nb".into()],
    }
    .encode();
    assert_eq!(Request::decode(&r), Err(DecodeError::InvalidField("tag")));
    // Too many scrub offsets.
    let r = Record::Scrub {
        offsets: vec![1; MAX_SCRUB_OFFSETS + 1],
    }
    .encode();
    assert_eq!(
        Record::decode(&r),
        Err(DecodeError::TooLong { what: "offsets" })
    );
    let r = Record::Scrub {
        offsets: vec![1; MAX_SCRUB_OFFSETS],
    }
    .encode();
    assert!(Record::decode(&r).is_ok());
    // Account name at and past its limit.
    let a = |n| {
        Request::Auth {
            account: "a".repeat(n),
            device: 0,
            secret: [0; 32],
        }
        .encode()
    };
    assert!(Request::decode(&a(MAX_ACCOUNT_NAME_LEN)).is_ok());
    assert_eq!(
        Request::decode(&a(MAX_ACCOUNT_NAME_LEN + 1)).map_err(|e| e.code()),
        Err(crate::ErrorCode::TooLarge)
    );
}

#[test]
fn newer_peers_may_append_fields() {
    // [1, "extra"]: a Head request with one field this version does not know.
    assert_eq!(
        Request::decode(&[0x82, 0x01, 0x61, b'x']),
        Ok(Request::Head)
    );
    // A Store record inside an Entry with an extra field, followed by the Entry's own extra.
    let mut e = Encoder::new(Vec::new());
    e.array(5)
        .unwrap()
        .u8(3)
        .unwrap()
        .u64(1)
        .unwrap()
        .u64(2)
        .unwrap();
    e.array(5)
        .unwrap()
        .u8(0)
        .unwrap()
        .bytes(&[9; 32])
        .unwrap()
        .u64(3)
        .unwrap();
    e.array(0).unwrap().str("future").unwrap();
    e.u8(0).unwrap();
    let got = Response::decode(&e.into_writer()).unwrap();
    assert_eq!(
        got,
        Response::Entry(LogEntry {
            offset: 1,
            time_ms: 2,
            record: Record::Store {
                hash: h(9),
                size: 3,
                tags: vec![]
            }
        })
    );
}

fn tag() -> impl Strategy<Value = String> {
    "[a-z \u{e9}\u{4e2d}]{1,12}".prop_filter("no empty", |s| valid_tag(s))
}

fn hash() -> impl Strategy<Value = BlobHash> {
    any::<[u8; 32]>().prop_map(BlobHash)
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (hash(), any::<u64>(), prop::collection::vec(tag(), 0..5))
            .prop_map(|(hash, size, tags)| Record::Store { hash, size, tags }),
        (
            hash(),
            any::<u64>(),
            "[a-z@.]{0,20}",
            prop::collection::vec("[a-z@.]{1,20}", 0..5)
        )
            .prop_map(|(hash, size, from, recipients)| Record::Send {
                hash,
                size,
                from,
                recipients
            }),
        (
            hash(),
            prop::collection::vec(tag(), 0..4),
            prop::collection::vec(tag(), 0..4),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(hash, add, remove, seen, device, seq)| Record::Tags {
                hash,
                add,
                remove,
                seen,
                device,
                seq
            }),
        prop::collection::vec(any::<u64>(), 0..50).prop_map(|offsets| Record::Scrub { offsets }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        ("[a-z0-9]{0,64}", any::<u64>(), any::<[u8; 32]>()).prop_map(
            |(account, device, secret)| Request::Auth {
                account,
                device,
                secret
            }
        ),
        Just(Request::Head),
        (any::<u64>(), any::<bool>())
            .prop_map(|(from, inline_blobs)| Request::Log { from, inline_blobs }),
        (any::<u64>(), prop::collection::vec(tag(), 0..5))
            .prop_map(|(size, tags)| Request::Store { size, tags }),
        hash().prop_map(|hash| Request::Fetch { hash }),
        (
            hash(),
            prop::collection::vec(tag(), 0..4),
            prop::collection::vec(tag(), 0..4),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(hash, add, remove, seen, seq)| Request::Tag {
                hash,
                add,
                remove,
                seen,
                seq
            }),
        (
            any::<u64>(),
            "[a-z@.]{0,40}",
            prop::collection::vec("[a-z@.]{1,40}", 0..4)
        )
            .prop_map(|(size, from, recipients)| Request::Send {
                size,
                from,
                recipients
            }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (any::<u16>(), "[ -~]{0,100}")
            .prop_map(|(code, message)| Response::Error { code, message }),
        any::<u64>().prop_map(|head| Response::AuthOk { head }),
        any::<u64>().prop_map(|head| Response::Head { head }),
        (any::<u64>(), any::<u64>(), record()).prop_map(|(offset, time_ms, record)| {
            Response::Entry(LogEntry {
                offset,
                time_ms,
                record,
            })
        }),
        any::<u64>().prop_map(|head| Response::Live { head }),
        (hash(), any::<u64>(), any::<bool>()).prop_map(|(hash, offset, new)| Response::Stored {
            hash,
            offset,
            new
        }),
        any::<u64>().prop_map(|size| Response::Blob { size }),
        (any::<u64>(), any::<bool>()).prop_map(|(offset, new)| Response::Tagged { offset, new }),
        (hash(), any::<u64>(), any::<bool>()).prop_map(|(hash, offset, new)| Response::Sent {
            hash,
            offset,
            new
        }),
    ]
}

proptest! {
    #[test]
    fn request_round_trips(r in request()) {
        let framed = r.to_frame();
        let (payload, used) = frame::split(&framed).unwrap().unwrap();
        prop_assert_eq!(used, framed.len());
        prop_assert_eq!(Request::decode(payload).unwrap(), r);
    }

    #[test]
    fn response_round_trips(r in response()) {
        prop_assert_eq!(Response::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn record_round_trips(r in record()) {
        prop_assert_eq!(Record::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Request::decode(&bytes);
        let _ = Response::decode(&bytes);
        let _ = Record::decode(&bytes);
        let _ = frame::split(&bytes);
    }

    #[test]
    fn every_strict_prefix_is_rejected(r in response()) {
        let bytes = r.encode();
        for cut in 0..bytes.len() {
            prop_assert!(Response::decode(&bytes[..cut]).is_err());
        }
    }
}

#[test]
fn print_vectors() {
    for (name, bytes) in vectors() {
        println!("| {name} | `{}` |", hex::encode(bytes));
    }
}
