//! The checks behind every fuzz target, one function per target, shared with the corpus
//! replay test (`crates/postlog/tests/fuzz_corpus.rs` includes this file as a module), so
//! the committed corpus is replayed by plain `cargo test` without cargo-fuzz or nightly.
//!
//! Each check takes arbitrary bytes. It must not panic on any input (peer, disk and user
//! input never panic), and where a decoder has an encoder it asserts the round trip: if
//! `decode(bytes)` gives `x`, then `decode(encode(x)) == x`.
//!
//! This file may only use what both its users have: postlog-proto, postlog-client,
//! postlog-server, postlog-smtp, postlog-mail, toml and std.

use postlog_client::LoginUrl;
use postlog_client::import::{garbage_reason, tags_for_name};
use postlog_proto::limits::{MAX_FRAME_LEN, MAX_MESSAGE_SIZE};
use postlog_proto::message::valid_tag;
use postlog_proto::{DecodeError, LogEntry, Record, Request, Response};
use postlog_server::ServerConfig;

/// A check: panics (fails an assertion) on a bug, returns on any input the code handles.
pub type Check = fn(&[u8]);

/// Every target: its name (= the fuzz target and the `fuzz/corpus/` directory) and check.
pub const TARGETS: &[(&str, Check)] = &[
    ("wire_request", wire_request),
    ("wire_response", wire_response),
    ("record", record),
    ("frame", frame),
    ("login_url", login_url),
    ("maildir_name", maildir_name),
    ("server_config", server_config),
    ("smtp_session", smtp_session),
    ("mail_submission", mail_submission),
];

/// A decode error must render and map to a wire error code without panicking.
fn exercise_error(e: &DecodeError) {
    let _ = e.code();
    let _ = e.to_string();
}

/// The encoder is canonical (minimal integers, definite lengths, no extra elements), so
/// re-encoding an accepted message never makes it longer: what fit in a frame still does.
fn assert_not_longer(what: &str, input: &[u8], encoded: &[u8]) {
    assert!(
        encoded.len() <= input.len(),
        "{what}: re-encoding grew {} bytes to {}",
        input.len(),
        encoded.len()
    );
}

/// `Request::decode`, as the server runs it on the first frame of every stream.
pub fn wire_request(data: &[u8]) {
    let req = match Request::decode(data) {
        Ok(req) => req,
        Err(e) => return exercise_error(&e),
    };
    let _ = req.is_mutating();
    let bytes = req.encode();
    assert_eq!(
        Request::decode(&bytes).as_ref(),
        Ok(&req),
        "request round trip"
    );
    assert_not_longer("request", data, &bytes);
    let framed = req.to_frame();
    assert_eq!(
        postlog_proto::frame::split(&framed),
        Ok(Some((&bytes[..], framed.len()))),
        "framed request"
    );
}

/// `Response::decode`, as the client runs it on every frame the server sends.
pub fn wire_response(data: &[u8]) {
    let resp = match Response::decode(data) {
        Ok(resp) => resp,
        Err(e) => return exercise_error(&e),
    };
    match &resp {
        Response::Error { code, .. } => {
            let _ = postlog_proto::ErrorCode::from_code(*code).map(|c| c.is_retryable());
        }
        Response::Entry(entry) => {
            let _ = entry.record.hash();
        }
        _ => {}
    }
    let bytes = resp.encode();
    assert_eq!(
        Response::decode(&bytes).as_ref(),
        Ok(&resp),
        "response round trip"
    );
    assert_not_longer("response", data, &bytes);
    let framed = resp.to_frame();
    assert_eq!(
        postlog_proto::frame::split(&framed),
        Ok(Some((&bytes[..], framed.len()))),
        "framed response"
    );
}

/// `Record::decode`, as the store runs it on every record it reads back from disk.
pub fn record(data: &[u8]) {
    let rec = match Record::decode(data) {
        Ok(rec) => rec,
        Err(e) => return exercise_error(&e),
    };
    let _ = rec.hash();
    let bytes = rec.encode();
    assert_eq!(
        Record::decode(&bytes).as_ref(),
        Ok(&rec),
        "record round trip"
    );
    assert_not_longer("record", data, &bytes);
    // The same record nested in a Log stream's Entry response.
    let entry = Response::Entry(LogEntry {
        offset: u64::MAX,
        time_ms: 1_700_000_000_000,
        record: rec,
    });
    assert_eq!(
        Response::decode(&entry.encode()).as_ref(),
        Ok(&entry),
        "record in an Entry"
    );
}

/// `frame::split` over a buffer of back-to-back frames, as a stream reader sees them; each
/// payload is then decoded both ways.
pub fn frame(data: &[u8]) {
    let mut rest = data;
    loop {
        match postlog_proto::frame::split(rest) {
            Ok(Some((payload, consumed))) => {
                assert_eq!(consumed, postlog_proto::frame::HEADER_LEN + payload.len());
                assert!(consumed <= rest.len());
                assert!(!payload.is_empty() && payload.len() <= MAX_FRAME_LEN as usize);
                assert_eq!(
                    postlog_proto::frame::encode(payload),
                    &rest[..consumed],
                    "frame round trip"
                );
                wire_request(payload);
                wire_response(payload);
                rest = &rest[consumed..];
            }
            Ok(None) => {
                // More bytes needed: a header is incomplete or its payload is.
                if let Some(h) = rest.get(..postlog_proto::frame::HEADER_LEN) {
                    let mut header = [0u8; postlog_proto::frame::HEADER_LEN];
                    header.copy_from_slice(h);
                    let len = postlog_proto::frame::payload_len(header);
                    assert!(
                        matches!(len, Ok(n) if rest.len() < postlog_proto::frame::HEADER_LEN + n),
                        "split waits although a whole frame is there"
                    );
                }
                break;
            }
            Err(e) => {
                exercise_error(&e);
                break;
            }
        }
    }
    // Any payload a sender may frame splits back out whole.
    if !data.is_empty() && data.len() <= MAX_FRAME_LEN as usize {
        let framed = postlog_proto::frame::encode(data);
        assert_eq!(
            postlog_proto::frame::split(&framed),
            Ok(Some((data, framed.len()))),
            "encode then split"
        );
    }
}

/// `LoginUrl::from_str`: login URLs are pasted by users.
pub fn login_url(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let url = match s.parse::<LoginUrl>() {
        Ok(url) => url,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(!url.account.is_empty() && url.server.contains(':'));
    assert!(
        url.fingerprint.len() == 64
            && url
                .fingerprint
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "fingerprint is 64 lowercase hex characters"
    );
    let text = url.to_url();
    assert_eq!(url.to_string(), text);
    match text.parse::<LoginUrl>() {
        Ok(again) => assert_eq!(again, url, "login URL round trip via {text:?}"),
        Err(e) => panic!("login URL {text:?} from {s:?} does not parse back: {e}"),
    }
}

/// The Maildir file-name parsers of the client (`hash_of_name`, `tags_for_name`) and the
/// import filter (`garbage_reason`), on the same bytes as a name and as file contents.
pub fn maildir_name(data: &[u8]) {
    let name = String::from_utf8_lossy(data);
    if let Some(h) = postlog_client::hash_of_name(&name) {
        let hex = h.to_hex();
        assert!(name.starts_with(&hex), "{name:?} does not start with {hex}");
        assert_eq!(postlog_client::hash_of_name(&hex), Some(h));
        assert_eq!(postlog_client::hash_of_name(&format!("{hex}:2,S")), Some(h));
    }
    for in_new in [false, true] {
        let tags = tags_for_name(&name, in_new);
        assert!(tags.iter().all(|t| valid_tag(t)), "{tags:?}");
        for (i, t) in tags.iter().enumerate() {
            assert!(!tags[..i].contains(t), "duplicate tag in {tags:?}");
        }
        if in_new {
            assert!(tags.iter().any(|t| t == "unread"), "new/ mail is unread");
        }
    }
    let len = data.len() as u64;
    let unlimited = garbage_reason(data, u64::MAX);
    if data.is_empty() {
        assert!(unlimited.is_some(), "an empty file is garbage");
    } else {
        assert!(garbage_reason(data, len - 1).is_some(), "over the limit");
        assert_eq!(garbage_reason(data, len), unlimited, "limit is inclusive");
    }
    let _ = garbage_reason(data, 0);
    let _ = garbage_reason(data, MAX_MESSAGE_SIZE);
}

/// `DATA/postlog.toml`. `ServerConfig` has no serializer, so the round trip writes every
/// field back as TOML by hand and compares the two parses.
pub fn server_config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match toml::from_str::<ServerConfig>(s) {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let text = config_to_toml(&cfg);
    match toml::from_str::<ServerConfig>(&text) {
        // No PartialEq on ServerConfig: Debug shows every field.
        Ok(again) => assert_eq!(
            format!("{again:?}"),
            format!("{cfg:?}"),
            "config round trip via {text:?}"
        ),
        Err(e) => panic!("config {text:?} written from {s:?} does not parse back: {e}"),
    }
}

fn config_to_toml(cfg: &ServerConfig) -> String {
    // TOML integers are i64, so every value the parser accepted fits.
    let int = |what: &str, n: u64| match i64::try_from(n) {
        Ok(n) => toml::Value::Integer(n),
        Err(_) => panic!("{what} = {n} was parsed but does not fit a TOML integer"),
    };
    let mut t = toml::Table::new();
    t.insert("listen".into(), cfg.listen.to_string().into());
    t.insert("public_host".into(), cfg.public_host.clone().into());
    t.insert(
        "max_message_size".into(),
        int("max_message_size", cfg.max_message_size),
    );
    t.insert(
        "max_connections".into(),
        int("max_connections", cfg.max_connections as u64),
    );
    t.insert("cert".into(), cfg.cert.clone().into());
    t.insert("key".into(), cfg.key.clone().into());
    let mut lmtp = toml::Table::new();
    if let Some(l) = cfg.lmtp.listen {
        lmtp.insert("listen".into(), l.to_string().into());
    }
    if let Some(u) = &cfg.lmtp.unix {
        match u.to_str() {
            Some(u) => lmtp.insert("unix".into(), u.into()),
            None => panic!("a socket path parsed from TOML is not UTF-8: {u:?}"),
        };
    }
    t.insert("lmtp".into(), lmtp.into());
    let mut smtp = toml::Table::new();
    if let Some(l) = cfg.smtp.listen {
        smtp.insert("listen".into(), l.to_string().into());
    }
    t.insert("smtp".into(), smtp.into());
    let d = &cfg.delivery;
    let mut delivery = toml::Table::new();
    delivery.insert(
        "initial_tags".into(),
        toml::Value::Array(d.initial_tags.iter().map(|t| t.clone().into()).collect()),
    );
    if let Some(h) = &d.hostname {
        delivery.insert("hostname".into(), h.clone().into());
    }
    delivery.insert(
        "max_recipients".into(),
        int("max_recipients", d.max_recipients as u64),
    );
    delivery.insert(
        "max_connections_per_ip".into(),
        int("max_connections_per_ip", d.max_connections_per_ip as u64),
    );
    delivery.insert(
        "max_connections".into(),
        int("max_connections", d.max_connections as u64),
    );
    delivery.insert("command_timeout".into(), d.command_timeout.clone().into());
    delivery.insert("session_timeout".into(), d.session_timeout.clone().into());
    t.insert("delivery".into(), delivery.into());
    let r = &cfg.retention;
    let rules = |rules: &[postlog_server::config::RetentionRule]| {
        toml::Value::Array(
            rules
                .iter()
                .map(|rule| {
                    let mut x = toml::Table::new();
                    x.insert("tag".into(), rule.tag.clone().into());
                    x.insert("after_secs".into(), int("after_secs", rule.after_secs));
                    x.into()
                })
                .collect(),
        )
    };
    let mut retention = toml::Table::new();
    retention.insert(
        "interval_secs".into(),
        int("interval_secs", r.interval_secs),
    );
    retention.insert(
        "compact_after".into(),
        int("compact_after", r.compact_after as u64),
    );
    retention.insert("rules".into(), rules(&r.rules));
    let mut accounts = toml::Table::new();
    for (name, a) in &r.accounts {
        let mut x = toml::Table::new();
        x.insert("rules".into(), rules(&a.rules));
        accounts.insert(name.clone(), x.into());
    }
    retention.insert("accounts".into(), accounts.into());
    t.insert("retention".into(), retention.into());
    let r = &cfg.relay;
    let mut relay = toml::Table::new();
    if let Some(u) = &r.url {
        relay.insert("url".into(), u.clone().into());
    }
    if let Some(f) = &r.ca_file {
        match f.to_str() {
            Some(f) => relay.insert("ca_file".into(), f.into()),
            None => panic!("a path parsed from TOML is not UTF-8: {f:?}"),
        };
    }
    for (k, v) in [
        ("retry_initial", &r.retry_initial),
        ("retry_max", &r.retry_max),
        ("retry_period", &r.retry_period),
        ("timeout", &r.timeout),
    ] {
        relay.insert(k.into(), v.clone().into());
    }
    relay.insert(
        "bounce_tags".into(),
        toml::Value::Array(r.bounce_tags.iter().map(|t| t.clone().into()).collect()),
    );
    t.insert("relay".into(), relay.into());
    let a = &cfg.auth;
    let mut auth = toml::Table::new();
    for (k, v) in [
        ("failure_delay", &a.failure_delay),
        ("address_refill", &a.address_refill),
        ("account_refill", &a.account_refill),
        ("max_wait", &a.max_wait),
    ] {
        auth.insert(k.into(), v.clone().into());
    }
    auth.insert(
        "address_burst".into(),
        int("address_burst", a.address_burst.into()),
    );
    auth.insert(
        "account_burst".into(),
        int("account_burst", a.account_burst.into()),
    );
    t.insert("auth".into(), auth.into());
    let l = &cfg.limits;
    let mut limits = toml::Table::new();
    limits.insert("request_timeout".into(), l.request_timeout.clone().into());
    limits.insert("auth_timeout".into(), l.auth_timeout.clone().into());
    limits.insert(
        "max_log_streams_per_account".into(),
        int(
            "max_log_streams_per_account",
            l.max_log_streams_per_account as u64,
        ),
    );
    t.insert("limits".into(), limits.into());
    // The checks that serde cannot do must not panic either.
    let _ = cfg.check();
    let _ = cfg.auth.limits();
    let _ = cfg.limits.parse();
    match toml::to_string(&t) {
        Ok(text) => text,
        Err(e) => panic!("cannot write a TOML table of strings and integers: {e}"),
    }
}

/// An LMTP and an SMTP session (`postlog_smtp::Session`) fed the bytes in pieces, with a
/// driver that accepts recipients containing `a` and delivers every message. Checks: no
/// panic; every reply line is `NNN` + space or dash; a delivered message never holds a bare
/// CR or LF (those messages are rejected: no smuggling); the same input split differently
/// gives the same replies and messages.
pub fn smtp_session(data: &[u8]) {
    use postlog_smtp::{Config, Protocol};
    // The first byte picks the split size, so the fuzzer explores chunking too.
    let (split, input) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s % 16) + 1, rest),
        None => (1, data),
    };
    for protocol in [Protocol::Lmtp, Protocol::Smtp] {
        let mut cfg = Config::new(protocol, "mx.fuzz", 4096);
        cfg.starttls = true;
        cfg.max_recipients = 5;
        let whole = run_smtp_session(cfg.clone(), input, input.len().max(1));
        let pieces = run_smtp_session(cfg, input, split);
        assert_eq!(whole, pieces, "split into {split}-byte pieces");
        let (replies, messages) = whole;
        for line in replies.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(
                line.len() >= 5
                    && line[..3].iter().all(u8::is_ascii_digit)
                    && (line[3] == b' ' || line[3] == b'-')
                    && line.ends_with(b"\r"),
                "bad reply line {:?}",
                String::from_utf8_lossy(line)
            );
        }
        for m in &messages {
            assert!(m.len() <= 4096, "over the size limit");
            for (i, &b) in m.iter().enumerate() {
                if b == b'\n' {
                    assert!(i > 0 && m[i - 1] == b'\r', "bare LF delivered in {m:?}");
                }
                if b == b'\r' {
                    assert_eq!(m.get(i + 1), Some(&b'\n'), "bare CR delivered in {m:?}");
                }
            }
        }
    }
}

/// Runs one session over `input` in `split`-byte pieces; returns (output, messages).
fn run_smtp_session(
    cfg: postlog_smtp::Config,
    input: &[u8],
    split: usize,
) -> (Vec<u8>, Vec<Vec<u8>>) {
    use postlog_smtp::{Event, Outcome, Session, Verdict};
    let mut s: Session<u8> = Session::new(cfg);
    let mut out = s.take_output();
    let mut messages = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut buf = Vec::new();
    for piece in input.chunks(split) {
        buf.extend_from_slice(piece);
        loop {
            let (used, ev) = s.advance(&buf);
            let mut stop = false;
            let mut recipient = None;
            let mut end = false;
            match ev {
                Event::NeedInput => stop = true,
                Event::Data(d) => match current.as_mut() {
                    Some(c) => c.extend_from_slice(d),
                    None => panic!("Data outside a message"),
                },
                Event::Recipient(a) => recipient = Some(a),
                Event::MessageStart => current = Some(Vec::new()),
                Event::MessageAbort => current = None,
                Event::MessageEnd => end = true,
                Event::Close => stop = true,
                // The TLS handshake would follow: the plaintext part ends here.
                Event::StartTls => {
                    out.extend(s.take_output());
                    return (out, messages);
                }
            }
            assert!(used <= buf.len());
            buf.drain(..used);
            if let Some(a) = recipient {
                s.recipient(if a.contains('a') {
                    Verdict::Accept(1)
                } else {
                    Verdict::Unknown
                });
            }
            if end {
                match current.take() {
                    Some(m) => messages.push(m),
                    None => panic!("MessageEnd without MessageStart"),
                }
                let n = s.recipients().len();
                s.message_done(&vec![Outcome::Delivered; n]);
            }
            if stop {
                break;
            }
        }
        out.extend(s.take_output());
        if s.is_closed() {
            break;
        }
    }
    out.extend(s.take_output());
    (out, messages)
}

/// A message handed to Send (server) or `postlog sendmail` (client): the envelope parse, the
/// relay copy and a bounce of it never panic; the relay copy has CRLF line endings only and
/// no Bcc field; a bounce of a sendable message is itself sendable, back to its sender.
pub fn mail_submission(data: &[u8]) {
    let sub = postlog_mail::submission(data, "", &[]);
    let copy = postlog_mail::relay_copy(data);
    assert!(
        !copy.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') && copy.first() != Some(&b'\n'),
        "bare LF in the relay copy"
    );
    if let Some(n) = postlog_mail::header_section(&copy) {
        let head = String::from_utf8_lossy(&copy[..n]).to_ascii_lowercase();
        assert!(
            !head.starts_with("bcc:") && !head.contains("\nbcc:"),
            "Bcc kept"
        );
    }
    let Ok(sub) = sub else { return };
    let failed = [postlog_mail::FailedRecipient {
        address: sub.recipients[0].clone(),
        code: 550,
        reason: "no".into(),
    }];
    let bounce = postlog_mail::dsn(&postlog_mail::Dsn {
        reporting_mta: "fuzz.invalid",
        to: &sub.from,
        original: data,
        arrival_s: 0,
        now_s: 0,
        failed: &failed,
    });
    let back = postlog_mail::submission(&bounce, "", &[]).expect("a bounce is sendable");
    assert_eq!(back.recipients.len(), 1, "a bounce goes to the sender only");
}
