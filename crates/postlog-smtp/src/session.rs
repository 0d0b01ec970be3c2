//! The session state machine: bytes in, replies and events out.

use crate::command::{self, Command, Reject};
use crate::limits::{MAX_ERRORS, MAX_HELO_LEN, MAX_LINE_LEN, MAX_RECIPIENTS};

/// Which protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// RFC 5321 SMTP: EHLO/HELO, one reply after DATA, STARTTLS if configured.
    Smtp,
    /// RFC 2033 LMTP: LHLO, one reply per accepted recipient after DATA.
    Lmtp,
}

/// A session's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub protocol: Protocol,
    /// The name this server gives in its greeting and replies.
    pub hostname: String,
    /// Largest message accepted, in bytes after dot-unstuffing. Advertised as SIZE.
    pub max_message_size: u64,
    /// Most recipients of one message; see [`MAX_RECIPIENTS`].
    pub max_recipients: usize,
    /// Offer STARTTLS (SMTP only; the driver must be able to do the handshake).
    pub starttls: bool,
}

impl Config {
    pub fn new(protocol: Protocol, hostname: impl Into<String>, max_message_size: u64) -> Config {
        Config {
            protocol,
            hostname: hostname.into(),
            max_message_size,
            max_recipients: MAX_RECIPIENTS,
            starttls: false,
        }
    }
}

/// What the driver must do next. Each call of [`Session::advance`] returns one.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// All given input is used: write [`Session::take_output`], then read more.
    NeedInput,
    /// RCPT TO with this address: answer with [`Session::recipient`] before advancing again.
    Recipient(String),
    /// DATA was accepted: start a new message (the 354 reply is in the output).
    MessageStart,
    /// The next bytes of the message, dot-unstuffed; line endings are CRLF.
    Data(&'a [u8]),
    /// The message will be rejected (too large, or a bare CR or LF): drop what was
    /// received. The session reads on to the end of DATA and then answers by itself.
    MessageAbort,
    /// The message is complete: make it durable, then answer with
    /// [`Session::message_done`] before advancing again.
    MessageEnd,
    /// STARTTLS was accepted: write the output (the 220), then do the TLS handshake and go
    /// on with the same session. The rest of the input was sent before TLS and has been
    /// consumed and ignored, so no plaintext command runs inside TLS (CVE-2011-0411).
    StartTls,
    /// Write the output, then close the connection.
    Close,
}

/// The answer to [`Event::Recipient`].
#[derive(Debug)]
pub enum Verdict<R> {
    /// The address is ours; `R` says where its mail goes.
    Accept(R),
    /// No such recipient: `550 5.1.1`.
    Unknown,
    /// The lookup failed: `451 4.3.0`; the client retries later.
    TempFail,
}

/// How delivering a message to one recipient ended (the answer to [`Event::MessageEnd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in the recipient's account.
    Delivered,
    /// Not stored, try again later: `451 4.3.0`.
    TempFail,
    /// Not stored, do not retry: `554 5.3.0`.
    PermFail,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Command,
    Data,
    AwaitRecipient,
    AwaitDelivery,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataFailure {
    TooLarge,
    BareNewline,
}

/// Where the DATA scanner stands, across calls (input arrives in arbitrary pieces).
#[derive(Clone, Copy, Debug, Default)]
struct DataScan {
    /// The previous bytes ended with CRLF (or DATA just began).
    line_start: bool,
    /// A `.` at the start of a line was read (and dropped).
    dot: bool,
    /// `.` then CR at the start of a line: LF ends the message.
    dot_cr: bool,
    /// The previous byte was a CR inside a line.
    cr: bool,
    /// Message bytes passed on so far.
    size: u64,
    /// The first failure (it aborts the message once).
    failure: Option<DataFailure>,
    /// A bare CR or LF was seen. It decides the reply even when the size limit was crossed
    /// first: which of the two is noticed first depends on how the input was split, the
    /// reply must not.
    bare_newline: bool,
}

/// One SMTP or LMTP server session, without I/O. `R` is what an accepted recipient maps to
/// (the server uses the account id).
///
/// Drive it like this: write [`Session::take_output`] (the greeting) to the peer; then, for
/// every read, call [`Session::advance`] on the unconsumed input until it returns
/// [`Event::NeedInput`], handling each event; write the output, read again. Pipelined
/// commands are answered in order; the output collects their replies until the driver
/// writes it, which it does before every read and before every slow step.
pub struct Session<R> {
    cfg: Config,
    out: Vec<u8>,
    phase: Phase,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    mail_from: Option<String>,
    recipients: Vec<(String, R)>,
    pending_rcpt: Option<String>,
    scan: DataScan,
    errors: usize,
    /// Inside a command line that is over [`MAX_LINE_LEN`]: discarding up to its LF.
    discarding: bool,
}

impl<R> Session<R> {
    /// A new session; its output holds the 220 greeting.
    pub fn new(cfg: Config) -> Session<R> {
        let mut s = Session {
            out: Vec::with_capacity(512),
            phase: Phase::Command,
            helo: None,
            esmtp: false,
            tls: false,
            mail_from: None,
            recipients: Vec::new(),
            pending_rcpt: None,
            scan: DataScan::default(),
            errors: 0,
            discarding: false,
            cfg,
        };
        let kind = match s.cfg.protocol {
            Protocol::Smtp => "ESMTP",
            Protocol::Lmtp => "LMTP",
        };
        let text = format!("{} {kind} Postlog ready", s.cfg.hostname);
        s.reply_plain(220, &text);
        s
    }

    /// The replies queued since the last call; the driver writes them to the peer.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The HELO/EHLO/LHLO name the client gave (cut to [`MAX_HELO_LEN`]).
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The reverse path of the current transaction (empty for the null sender `<>`).
    pub fn mail_from(&self) -> Option<&str> {
        self.mail_from.as_deref()
    }

    /// The accepted recipients of the current transaction, in RCPT order.
    pub fn recipients(&self) -> &[(String, R)] {
        &self.recipients
    }

    pub fn tls_active(&self) -> bool {
        self.tls
    }

    pub fn protocol(&self) -> Protocol {
        self.cfg.protocol
    }

    /// The `with` keyword of a Received header for this session (RFC 3848).
    pub fn with_keyword(&self) -> &'static str {
        match (self.cfg.protocol, self.esmtp, self.tls) {
            (Protocol::Lmtp, _, false) => "LMTP",
            (Protocol::Lmtp, _, true) => "LMTPS",
            (Protocol::Smtp, false, _) => "SMTP",
            (Protocol::Smtp, true, false) => "ESMTP",
            (Protocol::Smtp, true, true) => "ESMTPS",
        }
    }

    /// The idle or session time limit passed: queue a 421 and close.
    pub fn timeout(&mut self) {
        let text = format!("{} Timeout, closing connection", self.cfg.hostname);
        self.reply(421, "4.4.2", &text);
        self.phase = Phase::Closed;
    }

    /// The server is stopping: queue a 421 and close.
    pub fn shutdown(&mut self) {
        let text = format!("{} Service shutting down", self.cfg.hostname);
        self.reply(421, "4.3.2", &text);
        self.phase = Phase::Closed;
    }

    /// Processes `input` until the driver is needed. Returns how many bytes were consumed
    /// (the driver keeps the rest for the next call) and what to do.
    pub fn advance<'a>(&mut self, input: &'a [u8]) -> (usize, Event<'a>) {
        let mut pos = 0;
        loop {
            match self.phase {
                Phase::Closed => return (input.len(), Event::Close),
                Phase::AwaitRecipient | Phase::AwaitDelivery => {
                    // A driver bug: it must answer the event first.
                    debug_assert!(false, "advance called before the event was answered");
                    self.reply(421, "4.3.0", "Internal error, closing connection");
                    self.phase = Phase::Closed;
                }
                Phase::Data => {
                    let (n, event) = self.scan_data(&input[pos..]);
                    pos += n;
                    if let Some(e) = event {
                        return (pos, e);
                    }
                    if pos == input.len() && self.phase == Phase::Data {
                        return (pos, Event::NeedInput);
                    }
                }
                Phase::Command => {
                    let rest = &input[pos..];
                    let newline = rest.iter().position(|&b| b == b'\n');
                    if self.discarding {
                        let Some(i) = newline else {
                            return (input.len(), Event::NeedInput);
                        };
                        pos += i + 1;
                        self.discarding = false;
                        self.error(500, "5.5.2", "Line too long");
                        continue;
                    }
                    let Some(i) = newline else {
                        if rest.len() >= MAX_LINE_LEN {
                            self.discarding = true;
                            return (input.len(), Event::NeedInput);
                        }
                        return (pos, Event::NeedInput);
                    };
                    pos += i + 1;
                    if i + 1 > MAX_LINE_LEN {
                        self.error(500, "5.5.2", "Line too long");
                        continue;
                    }
                    let Some(line) = rest[..i].strip_suffix(b"\r") else {
                        self.error(500, "5.5.2", "Bare LF in command: lines must end with CRLF");
                        continue;
                    };
                    if let Some(event) = self.command(line) {
                        if event == Event::StartTls {
                            return (input.len(), event);
                        }
                        return (pos, event);
                    }
                }
            }
        }
    }

    /// Answers [`Event::Recipient`].
    pub fn recipient(&mut self, verdict: Verdict<R>) {
        let Some(address) = self.pending_rcpt.take() else {
            debug_assert!(false, "recipient() without a pending RCPT");
            return;
        };
        if self.phase == Phase::AwaitRecipient {
            self.phase = Phase::Command;
        }
        match verdict {
            Verdict::Accept(r) => {
                self.recipients.push((address, r));
                self.reply(250, "2.1.5", "Ok");
            }
            Verdict::Unknown => {
                let text = format!("<{address}>: Recipient address rejected: unknown user");
                self.error(550, "5.1.1", &text);
            }
            Verdict::TempFail => {
                let text = format!("<{address}>: Temporary lookup failure, try again later");
                self.reply(451, "4.3.0", &text);
            }
        }
    }

    /// Answers [`Event::MessageEnd`]. LMTP: one outcome per accepted recipient, in order
    /// (missing ones count as TempFail). SMTP: one reply for all; Delivered only if every
    /// recipient's outcome is.
    pub fn message_done(&mut self, outcomes: &[Outcome]) {
        if self.phase != Phase::AwaitDelivery {
            debug_assert!(false, "message_done() without a pending message");
            return;
        }
        self.phase = Phase::Command;
        match self.cfg.protocol {
            Protocol::Lmtp => {
                for i in 0..self.recipients.len() {
                    let outcome = outcomes.get(i).copied().unwrap_or(Outcome::TempFail);
                    let address = self.recipients[i].0.clone();
                    self.outcome_reply(outcome, &format!("<{address}>"));
                }
            }
            Protocol::Smtp => {
                let all = if outcomes.is_empty() {
                    Outcome::TempFail
                } else if outcomes.iter().all(|o| *o == Outcome::Delivered) {
                    Outcome::Delivered
                } else if outcomes.contains(&Outcome::TempFail) {
                    Outcome::TempFail
                } else {
                    Outcome::PermFail
                };
                self.outcome_reply(all, "Message");
            }
        }
        self.reset_transaction();
    }

    fn outcome_reply(&mut self, outcome: Outcome, what: &str) {
        match outcome {
            Outcome::Delivered => self.reply(250, "2.0.0", &format!("{what} delivered")),
            Outcome::TempFail => self.reply(
                451,
                "4.3.0",
                &format!("{what} not stored: temporary storage failure, try again later"),
            ),
            Outcome::PermFail => self.reply(554, "5.3.0", &format!("{what} not stored")),
        }
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.recipients.clear();
        self.pending_rcpt = None;
    }

    fn command<'a>(&mut self, line: &[u8]) -> Option<Event<'a>> {
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(Reject { code, status, text }) => {
                self.error(code, status, &text);
                return None;
            }
        };
        let lmtp = self.cfg.protocol == Protocol::Lmtp;
        match cmd {
            Command::Helo(_) | Command::Ehlo(_) if lmtp => {
                self.error(500, "5.5.1", "Command unrecognized: this is LMTP, use LHLO");
            }
            Command::Lhlo(_) if !lmtp => {
                self.error(500, "5.5.1", "Command unrecognized: LHLO is for LMTP");
            }
            Command::Helo(name) => {
                self.greeted(name, false);
                let host = self.cfg.hostname.clone();
                self.reply_plain(250, &host);
            }
            Command::Ehlo(name) | Command::Lhlo(name) => {
                self.greeted(name, true);
                let mut lines = vec![
                    self.cfg.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.cfg.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if self.starttls_offered() {
                    lines.push("STARTTLS".into());
                }
                self.reply_lines(250, &lines);
            }
            Command::Mail { from, size } => {
                if self.helo.is_none() {
                    let hello = if lmtp { "LHLO" } else { "EHLO or HELO" };
                    self.error(503, "5.5.1", &format!("Send {hello} first"));
                } else if self.mail_from.is_some() {
                    self.error(503, "5.5.1", "Nested MAIL command");
                } else if size.is_some_and(|s| s > self.cfg.max_message_size) {
                    let text = format!(
                        "Message size exceeds the limit of {} bytes",
                        self.cfg.max_message_size
                    );
                    self.reply(552, "5.3.4", &text);
                } else {
                    self.mail_from = Some(from);
                    self.reply(250, "2.1.0", "Ok");
                }
            }
            Command::Rcpt { to } => {
                if self.mail_from.is_none() {
                    self.error(503, "5.5.1", "Need MAIL before RCPT");
                } else if self.recipients.len() >= self.cfg.max_recipients {
                    self.reply(452, "4.5.3", "Too many recipients");
                } else {
                    self.pending_rcpt = Some(to.clone());
                    self.phase = Phase::AwaitRecipient;
                    return Some(Event::Recipient(to));
                }
            }
            Command::Data => {
                if self.mail_from.is_none() {
                    self.error(503, "5.5.1", "Need MAIL command");
                } else if self.recipients.is_empty() {
                    // RFC 2920 §3.1: with pipelining, DATA after only failed RCPTs is 554.
                    self.error(554, "5.5.1", "No valid recipients");
                } else {
                    self.reply_plain(354, "End data with <CR><LF>.<CR><LF>");
                    self.scan = DataScan {
                        line_start: true,
                        ..DataScan::default()
                    };
                    self.phase = Phase::Data;
                    return Some(Event::MessageStart);
                }
            }
            Command::Bdat => self.error(502, "5.5.1", "BDAT not supported: use DATA"),
            Command::Rset => {
                self.reset_transaction();
                self.reply(250, "2.0.0", "Ok");
            }
            Command::Noop => self.reply(250, "2.0.0", "Ok"),
            Command::Quit => {
                let text = format!("{} closing connection", self.cfg.hostname);
                self.reply(221, "2.0.0", &text);
                self.phase = Phase::Closed;
                return Some(Event::Close);
            }
            Command::Vrfy => self.reply(252, "2.5.0", "Cannot VRFY user; try RCPT"),
            Command::Expn => self.error(502, "5.5.1", "EXPN not supported"),
            Command::Help => self.reply(214, "2.0.0", "See RFC 5321 (SMTP) and RFC 2033 (LMTP)"),
            Command::StartTls => {
                if self.tls {
                    self.error(503, "5.5.1", "TLS already active");
                } else if !self.starttls_offered() {
                    self.error(502, "5.5.1", "STARTTLS not available");
                } else {
                    self.reply(220, "2.0.0", "Ready to start TLS");
                    // RFC 3207 §4.2: forget everything learnt before TLS.
                    self.tls = true;
                    self.helo = None;
                    self.esmtp = false;
                    self.reset_transaction();
                    return Some(Event::StartTls);
                }
            }
        }
        None
    }

    fn starttls_offered(&self) -> bool {
        self.cfg.starttls && !self.tls && self.cfg.protocol == Protocol::Smtp
    }

    fn greeted(&mut self, name: String, esmtp: bool) {
        let mut name = name;
        if name.len() > MAX_HELO_LEN {
            let mut cut = MAX_HELO_LEN;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
        }
        self.helo = Some(name);
        self.esmtp = esmtp;
        self.reset_transaction();
    }

    /// Scans DATA input. Returns the bytes consumed and, if one is due, an event.
    fn scan_data<'a>(&mut self, input: &'a [u8]) -> (usize, Option<Event<'a>>) {
        let mut run_start = 0;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            let s = &mut self.scan;
            if s.dot_cr {
                s.dot_cr = false;
                if b == b'\n' {
                    return (i + 1, self.end_of_data());
                }
                // `.` CR x at a line start: a bare CR. `x` is scanned on the next call.
                return (i, self.fail(DataFailure::BareNewline));
            }
            if s.dot {
                s.dot = false;
                if b == b'\r' {
                    s.dot_cr = true;
                    i += 1;
                    run_start = i;
                    continue;
                }
                // A stuffed dot (RFC 5321 §4.5.2): it was dropped; the line goes on.
            } else if s.line_start && b == b'.' {
                if i > run_start {
                    // Hand over the line(s) before the dot first; the dot is read next call.
                    return (i, self.emit(&input[run_start..i]));
                }
                s.line_start = false;
                s.dot = true;
                i += 1;
                run_start = i;
                continue;
            }
            s.line_start = false;
            if s.cr {
                s.cr = false;
                if b == b'\n' {
                    s.line_start = true;
                    i += 1;
                    continue;
                }
                // CR not followed by LF. `b` is scanned on the next call.
                return (i, self.fail(DataFailure::BareNewline));
            }
            match b {
                b'\r' => s.cr = true,
                b'\n' => return (i + 1, self.fail(DataFailure::BareNewline)),
                _ => {}
            }
            i += 1;
        }
        (input.len(), self.emit(&input[run_start..]))
    }

    fn emit<'a>(&mut self, bytes: &'a [u8]) -> Option<Event<'a>> {
        if bytes.is_empty() || self.scan.failure.is_some() {
            return None;
        }
        self.scan.size += bytes.len() as u64;
        if self.scan.size > self.cfg.max_message_size {
            return self.fail(DataFailure::TooLarge);
        }
        Some(Event::Data(bytes))
    }

    /// Marks the message as rejected; the first failure tells the driver to drop it.
    fn fail<'a>(&mut self, why: DataFailure) -> Option<Event<'a>> {
        self.scan.bare_newline |= why == DataFailure::BareNewline;
        if self.scan.failure.is_some() {
            return None;
        }
        self.scan.failure = Some(why);
        Some(Event::MessageAbort)
    }

    fn end_of_data<'a>(&mut self) -> Option<Event<'a>> {
        let failure = match self.scan.failure {
            Some(_) if self.scan.bare_newline => Some(DataFailure::BareNewline),
            f => f,
        };
        let Some(failure) = failure else {
            self.phase = Phase::AwaitDelivery;
            return Some(Event::MessageEnd);
        };
        self.phase = Phase::Command;
        let (code, status, text) = match failure {
            DataFailure::TooLarge => (
                552,
                "5.3.4",
                format!(
                    "Message too big: the limit is {} bytes",
                    self.cfg.max_message_size
                ),
            ),
            DataFailure::BareNewline => (
                554,
                "5.6.0",
                "Message rejected: bare LF or CR in DATA; lines must end with CRLF".to_string(),
            ),
        };
        let replies = match self.cfg.protocol {
            Protocol::Lmtp => self.recipients.len(),
            Protocol::Smtp => 1,
        };
        for _ in 0..replies {
            self.reply(code, status, &text);
        }
        self.reset_transaction();
        None
    }

    /// A rejected command: counts towards [`MAX_ERRORS`], past which the session closes.
    fn error(&mut self, code: u16, status: &str, text: &str) {
        self.errors += 1;
        self.reply(code, status, text);
        if self.errors > MAX_ERRORS {
            let text = format!("{} Too many errors, closing connection", self.cfg.hostname);
            self.reply(421, "4.7.0", &text);
            self.phase = Phase::Closed;
        }
    }

    fn reply(&mut self, code: u16, status: &str, text: &str) {
        self.reply_plain(code, &format!("{status} {text}"));
    }

    fn reply_plain(&mut self, code: u16, text: &str) {
        self.reply_lines(code, &[text.to_owned()]);
    }

    fn reply_lines(&mut self, code: u16, lines: &[String]) {
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
        }
    }
}

/// What to send, instead of a greeting, to a client over the per-address connection limit.
pub fn busy_reply(hostname: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} Too many connections from your address, try again later\r\n")
        .into_bytes()
}
