//! A deterministic, realistic mail corpus: one person's mailbox.
//!
//! Message `i` of seed `s` is always the same bytes. Each message is built from random
//! streams keyed by `(s, i)` (a seeded [`StdRng`]), so any message can be made on its own
//! ([`message`]) and `generate(s, n)` is a prefix of `generate(s, m)` for `n <= m`. The
//! bytes stay the same as long as `rand` stays at the version in `Cargo.lock` (its `StdRng`
//! algorithm may change between major versions).
//!
//! What the messages look like:
//! - RFC 5322 headers: `Return-Path` and `Received` on incoming mail, `From`, `To`, `Cc`
//!   (some), `Subject`, `Date`, `Message-ID`, `In-Reply-To` and `References` on replies,
//!   `MIME-Version`, `Content-Type`, `Content-Transfer-Encoding`. Addresses use reserved
//!   `.example` domains.
//! - One mailbox: every message is to or from [`OWNER`] (about 15% are mail they sent).
//! - Threads: about 30% of messages reply to one of the 30 messages before them, with
//!   `Re:` subjects, ancestry in `References`, and the thread's participants.
//! - Sizes: 10% carry one base64 attachment of 50–500 KiB (PDF, JPEG, ZIP or DOCX, random
//!   bytes behind the right magic number, so they do not compress, like real ones); 85% are
//!   plain text of 2–20 KB (log-uniform); 5% are short notes under 2 KB. 10,000 messages
//!   of seed 1 come to 457 MB: mean 46 KB, median 7 KB.
//! - Dates: one message every 15 minutes on average from 2024-01-01, a reply always later
//!   than its parent, each in its sender's time zone.
//! - Line endings are LF, as Maildir files on Unix hold them (delivery agents turn the
//!   wire's CRLF into the local newline). Every message is unique (its `Message-ID` names
//!   the seed and the index), so storing a corpus never deduplicates.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Message `index` of the corpus `seed`.
pub fn message(seed: u64, index: usize) -> Vec<u8> {
    Builder::new(seed, index).build().into_bytes()
}

/// The first `n` messages of the corpus `seed`, made one at a time as the iterator is
/// advanced (a 10,000-message corpus is about 450 MB; only hold it all if you need to).
pub fn generate(seed: u64, n: usize) -> impl ExactSizeIterator<Item = Vec<u8>> + Send {
    (0..n).map(move |i| message(seed, i))
}

/// Writes the first `n` messages of corpus `seed` into the Maildir `dir` (creating it and
/// its `cur/`, `new/` and `tmp/`) and returns the bytes written.
///
/// Message `i` goes to `cur/<i>.bench:2,<flags>`, mostly `S` (seen), some `RS`, `FS` or
/// none (unread); the newest 2% (`n / 50`) go to `new/<i>.bench`, as if just delivered.
/// Files are not fsynced: run `sync` before timing anything that reads them.
pub fn write_maildir(dir: &Path, seed: u64, n: usize) -> io::Result<u64> {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let first_new = n - n / 50;
    let mut total = 0;
    for (i, bytes) in generate(seed, n).enumerate() {
        let path = if i >= first_new {
            dir.join("new").join(format!("{i}.bench"))
        } else {
            let flags = seen_flags(&mut stream(seed, i, Stream::Maildir));
            dir.join("cur").join(format!("{i}.bench:2,{flags}"))
        };
        std::fs::write(path, &bytes)?;
        total += bytes.len() as u64;
    }
    Ok(total)
}

/// The mailbox's owner: in `To` of every incoming message, `From` of every sent one.
pub const OWNER: Person = Person {
    first: "Robin",
    last: "Park",
    domain: "example.net",
};

/// A correspondent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Person {
    pub first: &'static str,
    pub last: &'static str,
    pub domain: &'static str,
}

impl Person {
    /// The `p`-th of the corpus's correspondents (distinct for `p < PEOPLE`).
    fn nth(p: usize) -> Person {
        Person {
            first: FIRST_NAMES[p % FIRST_NAMES.len()],
            last: LAST_NAMES[(p / FIRST_NAMES.len()) % LAST_NAMES.len()],
            domain: DOMAINS[(p * 5 + p / FIRST_NAMES.len()) % DOMAINS.len()],
        }
    }

    /// `first.last@domain`, lower case.
    pub fn address(&self) -> String {
        format!("{}.{}@{}", self.first, self.last, self.domain).to_ascii_lowercase()
    }

    /// `First Last <first.last@domain>`.
    pub fn mailbox(&self) -> String {
        format!("{} {} <{}>", self.first, self.last, self.address())
    }

    /// Minutes east of UTC where this person writes from.
    fn utc_offset_minutes(&self) -> i64 {
        if *self == OWNER {
            return 60;
        }
        let h = self.first.len() * 31 + self.last.len() * 7 + self.domain.len();
        ZONES[h % ZONES.len()]
    }
}

/// How many distinct correspondents the corpus draws from.
const PEOPLE: usize = 300;
/// Share of messages that reply to an earlier one, and how far back they reach.
const REPLY_SHARE: f64 = 0.3;
const REPLY_WINDOW: usize = 30;
/// Share of messages the owner sent.
const SENT_SHARE: f64 = 0.15;
/// The first message's time (2024-01-01T00:00:00Z) and the spacing between messages.
const EPOCH_SECS: i64 = 1_704_067_200;
const SPACING_SECS: i64 = 900;
/// Attachment sizes before base64, in bytes.
const ATTACHMENT_MIN: usize = 50 * 1024;
const ATTACHMENT_MAX: usize = 500 * 1024;
/// Column at which body text wraps (RFC 5322 recommends at most 78).
const WRAP: usize = 72;

/// The independent random streams of one message. Separate streams keep decisions apart:
/// a message's thread structure can be read without generating its body, and changing how
/// bodies are written does not move the thread structure or the Maildir flags.
#[derive(Clone, Copy)]
enum Stream {
    /// Whether the message replies, and to which one.
    Parent = 0,
    /// Everything in the message itself.
    Content = 1,
    /// A thread's subject and participants (keyed by the thread's first message).
    Thread = 2,
    /// The Maildir flags of `write_maildir`.
    Maildir = 3,
}

fn stream(seed: u64, index: usize, which: Stream) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(which as u64).to_le_bytes());
    key[24..].copy_from_slice(b"postlog1");
    StdRng::from_seed(key)
}

fn parent(seed: u64, index: usize) -> Option<usize> {
    let mut rng = stream(seed, index, Stream::Parent);
    (index > 0 && rng.gen_bool(REPLY_SHARE))
        .then(|| index - 1 - rng.gen_range(0..index.min(REPLY_WINDOW)))
}

/// The thread's messages above `index`, oldest (the thread's root) first.
fn ancestors(seed: u64, index: usize) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut at = index;
    while let Some(p) = parent(seed, at) {
        chain.push(p);
        at = p;
    }
    chain.reverse();
    chain
}

fn message_id(seed: u64, index: usize) -> String {
    format!("<{index}.{seed:x}.bench@mail.example.net>")
}

/// A thread's subject and the people in it other than the owner.
struct Thread {
    subject: String,
    people: Vec<Person>,
}

impl Thread {
    fn of(seed: u64, root: usize) -> Thread {
        let mut rng = stream(seed, root, Stream::Thread);
        let template = pick(&mut rng, SUBJECTS);
        let topic = pick(&mut rng, TOPICS);
        let mut subject = template.replace("{}", topic);
        subject[..1].make_ascii_uppercase();
        let count = rng.gen_range(1..=3);
        let mut people: Vec<Person> = Vec::with_capacity(count);
        while people.len() < count {
            let p = Person::nth(rng.gen_range(0..PEOPLE));
            if !people.contains(&p) {
                people.push(p);
            }
        }
        Thread { subject, people }
    }
}

/// Who sent a message to whom, and when: the first draws of its content stream, so that a
/// reply can name its parent's date and sender without generating the parent.
struct Envelope {
    sent: i64,
    outgoing: bool,
    from: Person,
    to: Vec<Person>,
    cc: Vec<Person>,
}

impl Envelope {
    fn draw(rng: &mut StdRng, index: usize, thread: &Thread) -> Envelope {
        let sent = EPOCH_SECS + index as i64 * SPACING_SECS + rng.gen_range(0..SPACING_SECS);
        let outgoing = rng.gen_bool(SENT_SHARE);
        let k = rng.gen_range(0..thread.people.len());
        let with_cc = rng.gen_bool(0.6);
        let others: Vec<Person> = thread
            .people
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != k && with_cc)
            .map(|(_, p)| *p)
            .collect();
        let (from, to) = if outgoing {
            (OWNER, thread.people[k])
        } else {
            (thread.people[k], OWNER)
        };
        Envelope {
            sent,
            outgoing,
            from,
            to: vec![to],
            cc: others,
        }
    }

    fn date(&self) -> String {
        rfc5322_date(self.sent, self.from.utc_offset_minutes())
    }
}

/// Builds one message from its streams.
struct Builder {
    seed: u64,
    index: usize,
    rng: StdRng,
    out: String,
}

impl Builder {
    fn new(seed: u64, index: usize) -> Builder {
        Builder {
            seed,
            index,
            rng: stream(seed, index, Stream::Content),
            out: String::new(),
        }
    }

    fn build(mut self) -> String {
        let ancestors = ancestors(self.seed, self.index);
        let thread = Thread::of(self.seed, ancestors.first().copied().unwrap_or(self.index));
        let env = Envelope::draw(&mut self.rng, self.index, &thread);
        let kind = self.rng.gen_range(0..100);
        let attachment = kind < 10;
        // Mail with an attachment: the text part's size; other mail: the whole message's.
        let target = match kind {
            0..10 => self.rng.gen_range(300..2500),
            10..15 => self.rng.gen_range(600..2000),
            _ => log_uniform(&mut self.rng, 2000.0, 20_000.0),
        };

        if !env.outgoing {
            self.received(&env.from, env.sent);
        }
        let o = &mut self.out;
        let _ = writeln!(o, "From: {}", env.from.mailbox());
        address_header(o, "To", &env.to);
        if !env.cc.is_empty() {
            address_header(o, "Cc", &env.cc);
        }
        let re = if ancestors.is_empty() { "" } else { "Re: " };
        let _ = writeln!(o, "Subject: {re}{}", thread.subject);
        let _ = writeln!(o, "Date: {}", env.date());
        let _ = writeln!(o, "Message-ID: {}", message_id(self.seed, self.index));
        if let Some(&p) = ancestors.last() {
            let _ = writeln!(o, "In-Reply-To: {}", message_id(self.seed, p));
            let refs: Vec<String> = ancestors
                .iter()
                .map(|&a| message_id(self.seed, a))
                .collect();
            let _ = writeln!(o, "References: {}", refs.join("\n "));
        }
        o.push_str("MIME-Version: 1.0\n");

        let quoted = ancestors.last().map(|&p| {
            let mut rng = stream(self.seed, p, Stream::Content);
            Envelope::draw(&mut rng, p, &thread)
        });
        if attachment {
            let text = self.text(&env, quoted.as_ref(), target);
            self.with_attachment(&text);
        } else {
            const TEXT_HEADERS: &str =
                "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 7bit\n\n";
            let target = target.saturating_sub(self.out.len() + TEXT_HEADERS.len());
            let text = self.text(&env, quoted.as_ref(), target);
            self.out.push_str(TEXT_HEADERS);
            self.out.push_str(&text);
        }
        self.out
    }

    /// The trace headers an incoming message arrives with.
    fn received(&mut self, from: &Person, sent: i64) {
        let delay = self.rng.gen_range(1..40);
        let id: u64 = self.rng.r#gen();
        let ip = self.rng.gen_range(1..255);
        let o = &mut self.out;
        let _ = writeln!(o, "Return-Path: <{}>", from.address());
        let _ = writeln!(
            o,
            "Received: from mail.{d} (mail.{d} [198.51.100.{ip}])\n\
             \tby mx.{own} (Postfix) with ESMTPS id {id:012X}\n\
             \tfor <{to}>; {date}",
            d = from.domain,
            own = OWNER.domain,
            id = id & 0xffff_ffff_ffff,
            to = OWNER.address(),
            date = rfc5322_date(sent + delay, OWNER.utc_offset_minutes()),
        );
    }

    /// A text body of at least `target` bytes: greeting, paragraphs, sign-off, signature,
    /// and on replies a quote of the parent.
    fn text(&mut self, env: &Envelope, parent: Option<&Envelope>, target: usize) -> String {
        let greeting = format!(
            "{} {},\n\n",
            pick(&mut self.rng, GREETINGS),
            env.to[0].first
        );
        let closing = format!(
            "\n{},\n{}\n\n-- \n{} {}\n{}\n",
            pick(&mut self.rng, CLOSINGS),
            env.from.first,
            env.from.first,
            env.from.last,
            pick(&mut self.rng, SIGNATURE_LINES),
        );
        let mut quote = String::new();
        if let Some(parent) = parent {
            let _ = writeln!(
                quote,
                "\nOn {}, {} wrote:",
                parent.date(),
                parent.from.mailbox()
            );
            let words = self.rng.gen_range(30..300);
            for line in self.paragraph(words).lines() {
                let _ = writeln!(quote, "> {line}");
            }
        }
        let fixed = greeting.len() + closing.len() + quote.len();
        let mut body = String::new();
        loop {
            let words = self.rng.gen_range(24..84);
            body.push_str(&self.paragraph(words));
            if fixed + body.len() >= target {
                break;
            }
            body.push('\n');
        }
        format!("{greeting}{body}{closing}{quote}")
    }

    /// Wrapped sentences of about `words` words in all, ending in a newline.
    fn paragraph(&mut self, words: usize) -> String {
        let mut para = String::new();
        let mut line_len = 0;
        let mut written = 0;
        while written < words {
            let len = self.rng.gen_range(5..17);
            for w in 0..len {
                let mut word = pick(&mut self.rng, WORDS).to_string();
                if w == 0 {
                    word[..1].make_ascii_uppercase();
                }
                if w + 1 == len {
                    word.push(if self.rng.gen_bool(0.1) { '?' } else { '.' });
                } else if self.rng.gen_bool(0.08) {
                    word.push(',');
                }
                if line_len > 0 && line_len + 1 + word.len() > WRAP {
                    para.push('\n');
                    line_len = 0;
                } else if line_len > 0 {
                    para.push(' ');
                    line_len += 1;
                }
                line_len += word.len();
                para.push_str(&word);
            }
            written += len;
        }
        para.push('\n');
        para
    }

    /// Finishes the message as multipart/mixed: `text`, then one base64 attachment.
    fn with_attachment(&mut self, text: &str) {
        let (mime, ext, magic, stems) = *pick(&mut self.rng, ATTACHMENTS);
        let name = format!(
            "{}-{}.{ext}",
            pick(&mut self.rng, stems),
            self.rng.gen_range(1..1000)
        );
        let size = self.rng.gen_range(ATTACHMENT_MIN..=ATTACHMENT_MAX);
        let mut data = vec![0u8; size];
        self.rng.fill_bytes(&mut data);
        data[..magic.len()].copy_from_slice(magic);
        let boundary = format!("=_bench_{:x}_{:x}", self.index, self.seed);
        let o = &mut self.out;
        let _ = write!(
            o,
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\n\n\
             This is a multi-part message in MIME format.\n\n\
             --{boundary}\n\
             Content-Type: text/plain; charset=utf-8\n\
             Content-Transfer-Encoding: 7bit\n\n\
             {text}\n\
             --{boundary}\n\
             Content-Type: {mime}; name=\"{name}\"\n\
             Content-Disposition: attachment; filename=\"{name}\"\n\
             Content-Transfer-Encoding: base64\n\n"
        );
        base64_lines(o, &data);
        let _ = writeln!(o, "--{boundary}--");
    }
}

fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
    &from[rng.gen_range(0..from.len())]
}

fn log_uniform(rng: &mut StdRng, low: f64, high: f64) -> usize {
    rng.gen_range(low.ln()..high.ln()).exp() as usize
}

/// A header listing mailboxes, one per line after the first.
fn address_header(out: &mut String, name: &str, people: &[Person]) {
    let list: Vec<String> = people.iter().map(Person::mailbox).collect();
    let _ = writeln!(out, "{name}: {}", list.join(",\n "));
}

/// `Tue, 2 Jan 2024 09:05:00 +0100` for `secs` since the epoch, shown in the given zone.
fn rfc5322_date(secs: i64, offset_minutes: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let local = secs + offset_minutes * 60;
    let days = local.div_euclid(86_400);
    let in_day = local.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let sign = if offset_minutes < 0 { '-' } else { '+' };
    let off = offset_minutes.abs();
    format!(
        "{}, {day} {} {year} {:02}:{:02}:{:02} {sign}{:02}{:02}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[month as usize - 1],
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60,
        off / 60,
        off % 60,
    )
}

/// Gregorian (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Appends `data` in base64 (RFC 2045: padded, lines of 76 characters).
fn base64_lines(out: &mut String, data: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // 57 input bytes make one 76-character line.
    out.reserve(data.len().div_ceil(57) * 77);
    for line in data.chunks(57) {
        for group in line.chunks(3) {
            let b = [
                group[0],
                *group.get(1).unwrap_or(&0),
                *group.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
                let c = if k <= group.len() {
                    ALPHABET[(n >> shift) as usize & 63]
                } else {
                    b'='
                };
                out.push(char::from(c));
            }
        }
        out.push('\n');
    }
}

/// Maildir flags of a message in `cur/`, in the ASCII order Maildir requires.
fn seen_flags(rng: &mut StdRng) -> &'static str {
    match rng.gen_range(0..100) {
        0..5 => "",
        5..9 => "FS",
        9..17 => "RS",
        _ => "S",
    }
}

const FIRST_NAMES: &[&str] = &[
    "Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal",
    "Lena", "Marek", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor",
    "Wen", "Yara",
];
const LAST_NAMES: &[&str] = &[
    "Adler",
    "Brandt",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Hansen",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Okafor",
    "Petrov",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Umarov",
    "Varga",
    "Weber",
    "Yilmaz",
    "Zhang",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "acme.example",
    "globex.example",
    "initech.example",
    "uni-north.example",
    "mail.example.com",
];
/// Minutes east of UTC.
const ZONES: &[i64] = &[0, 60, 120, -300, -420, 330, 540, -180, 60, 60];
const SUBJECTS: &[&str] = &[
    "{}",
    "Question about {}",
    "Notes from today's meeting on {}",
    "Draft: {}",
    "Update on {}",
    "Can we move {} to next week?",
    "Feedback on {}",
    "[team] {}",
    "Quick question: {}",
    "Follow-up: {}",
    "Reminder: {}",
    "FYI {}",
];
const TOPICS: &[&str] = &[
    "the Q3 budget",
    "release 2.4",
    "the migration plan",
    "onboarding for new hires",
    "Tuesday's outage",
    "conference travel",
    "the new office layout",
    "the API deprecation",
    "the quarterly report",
    "hiring for the platform team",
    "the backup policy",
    "the design review",
    "summer holidays",
    "the customer survey",
    "invoice 2024-117",
    "the workshop agenda",
    "the grant proposal",
    "server costs",
    "the security audit",
    "lunch on Friday",
    "the reading group",
    "our support rota",
    "the data retention rules",
    "the board presentation",
];
const GREETINGS: &[&str] = &["Hi", "Hello", "Dear", "Hey", "Good morning"];
const CLOSINGS: &[&str] = &[
    "Best",
    "Thanks",
    "Cheers",
    "Regards",
    "Best regards",
    "Thank you",
];
const SIGNATURE_LINES: &[&str] = &[
    "Engineering Manager, Acme Corp.",
    "Department of Physics",
    "Sent from my phone",
    "Operations | Globex",
    "Senior Developer, Initech",
    "Project Coordinator",
];
/// (MIME type, extension, magic number, file name stems).
type AttachmentKind = (
    &'static str,
    &'static str,
    &'static [u8],
    &'static [&'static str],
);
const ATTACHMENTS: &[AttachmentKind] = &[
    (
        "application/pdf",
        "pdf",
        b"%PDF-1.7\n",
        &["report", "invoice", "slides", "contract"],
    ),
    (
        "image/jpeg",
        "jpg",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        &["IMG", "photo", "scan"],
    ),
    (
        "application/zip",
        "zip",
        b"PK\x03\x04",
        &["archive", "logs", "export"],
    ),
    (
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "docx",
        b"PK\x03\x04",
        &["draft", "minutes", "proposal"],
    ),
];
const WORDS: &[&str] = &[
    "the",
    "a",
    "we",
    "I",
    "you",
    "they",
    "it",
    "this",
    "that",
    "our",
    "your",
    "their",
    "and",
    "but",
    "so",
    "because",
    "if",
    "when",
    "then",
    "also",
    "still",
    "just",
    "already",
    "maybe",
    "probably",
    "should",
    "could",
    "would",
    "will",
    "can",
    "need",
    "want",
    "think",
    "agree",
    "check",
    "send",
    "review",
    "finish",
    "start",
    "move",
    "schedule",
    "discuss",
    "update",
    "confirm",
    "prepare",
    "share",
    "fix",
    "plan",
    "meeting",
    "week",
    "Monday",
    "Friday",
    "tomorrow",
    "today",
    "report",
    "draft",
    "numbers",
    "budget",
    "team",
    "project",
    "release",
    "version",
    "server",
    "customer",
    "proposal",
    "document",
    "slides",
    "issue",
    "question",
    "answer",
    "deadline",
    "time",
    "room",
    "call",
    "notes",
    "list",
    "changes",
    "comments",
    "feedback",
    "details",
    "results",
    "data",
    "test",
    "tests",
    "build",
    "deploy",
    "backup",
    "office",
    "travel",
    "hotel",
    "flight",
    "invoice",
    "contract",
    "of",
    "to",
    "in",
    "on",
    "for",
    "with",
    "about",
    "from",
    "by",
    "after",
    "before",
    "until",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "have",
    "has",
    "had",
    "do",
    "does",
    "did",
    "not",
    "all",
    "some",
    "more",
    "less",
    "first",
    "last",
    "next",
    "other",
    "new",
    "old",
    "good",
    "great",
    "small",
    "large",
    "quick",
    "late",
    "early",
    "clear",
    "important",
    "possible",
    "again",
    "here",
    "there",
    "now",
    "soon",
    "please",
    "thanks",
    "everyone",
    "someone",
    "nothing",
    "everything",
    "part",
    "point",
    "idea",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
        let head = msg.split("\n\n").next()?;
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    }

    #[test]
    fn deterministic_and_prefix_stable() {
        let a: Vec<Vec<u8>> = generate(7, 40).collect();
        let b: Vec<Vec<u8>> = generate(7, 60).collect();
        assert_eq!(a[..], b[..40]);
        assert_eq!(message(7, 39), a[39]);
        assert_ne!(message(8, 0), a[0]);
        let mut unique = b.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), b.len(), "no two messages are the same bytes");
    }

    #[test]
    fn messages_have_rfc5322_headers_and_realistic_sizes() {
        let n = 400;
        let mut sizes = Vec::new();
        let mut attachments = 0;
        let mut replies = 0;
        for (i, m) in generate(1, n).enumerate() {
            let text = String::from_utf8(m).unwrap();
            for h in [
                "From",
                "To",
                "Subject",
                "Date",
                "Message-ID",
                "MIME-Version",
            ] {
                assert!(header(&text, h).is_some(), "message {i} lacks {h}");
            }
            assert_eq!(header(&text, "Message-ID"), Some(&*message_id(1, i)));
            assert!(text.lines().all(|l| l.len() <= 998), "RFC 5322 line limit");
            assert!(!text.contains('\r'));
            if let Some(parent) = header(&text, "In-Reply-To") {
                replies += 1;
                assert!(header(&text, "Subject").unwrap().starts_with("Re: "));
                assert!(text.contains(&format!(
                    "References: {}",
                    message_id(1, ancestors(1, i)[0])
                )));
                assert_ne!(parent, message_id(1, i));
            }
            if text.contains("Content-Transfer-Encoding: base64") {
                attachments += 1;
                assert!(text.len() > ATTACHMENT_MIN * 4 / 3);
                assert!(text.ends_with("--\n"));
            }
            sizes.push(text.len());
        }
        sizes.sort_unstable();
        let median = sizes[n / 2];
        assert!((2_000..20_000).contains(&median), "median {median}");
        assert!(
            (20..=60).contains(&attachments),
            "{attachments} attachments"
        );
        assert!((80..=160).contains(&replies), "{replies} replies");
        assert!(sizes[0] >= 500 && sizes[n - 1] <= 720 * 1024);
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(
            rfc5322_date(EPOCH_SECS, 0),
            "Mon, 1 Jan 2024 00:00:00 +0000"
        );
        assert_eq!(
            rfc5322_date(EPOCH_SECS, -300),
            "Sun, 31 Dec 2023 19:00:00 -0500"
        );
        assert_eq!(
            rfc5322_date(1_709_210_096, 330),
            "Thu, 29 Feb 2024 18:04:56 +0530"
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            (&b""[..], ""),
            (b"f", "Zg==\n"),
            (b"fo", "Zm8=\n"),
            (b"foo", "Zm9v\n"),
            (b"foobar", "Zm9vYmFy\n"),
        ] {
            let mut out = String::new();
            base64_lines(&mut out, input);
            assert_eq!(out, expected);
        }
        let mut out = String::new();
        base64_lines(&mut out, &[0u8; 58]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!((lines.len(), lines[0].len(), lines[1]), (2, 76, "AA=="));
    }

    #[test]
    fn maildir_holds_the_generated_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let n = 100;
        let total = write_maildir(dir.path(), 3, n).unwrap();
        let mut files = Vec::new();
        for sub in ["cur", "new"] {
            for e in std::fs::read_dir(dir.path().join(sub)).unwrap() {
                files.push((sub, e.unwrap().file_name().into_string().unwrap()));
            }
        }
        assert_eq!(files.len(), n);
        assert_eq!(files.iter().filter(|(s, _)| *s == "new").count(), 2);
        assert!(files.contains(&("new", "99.bench".to_string())));
        let mut sum = 0;
        for (sub, name) in &files {
            let i: usize = name.split('.').next().unwrap().parse().unwrap();
            let bytes = std::fs::read(dir.path().join(sub).join(name)).unwrap();
            assert_eq!(bytes, message(3, i));
            assert_eq!(*sub == "cur", name.contains(":2,"));
            sum += bytes.len() as u64;
        }
        assert_eq!(sum, total);
        assert!(dir.path().join("tmp").is_dir());
    }
}
