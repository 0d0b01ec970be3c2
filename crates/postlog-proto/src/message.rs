//! Requests, responses and log records, and their CBOR encoding.
//!
//! Every message is a definite-length CBOR array whose first element is an unsigned type
//! number. Decoders accept and skip extra trailing array elements (so later versions can
//! add fields) and reject everything else that does not match `docs/PROTOCOL.md`.

use minicbor::{Decoder, Encoder};

use crate::error::DecodeError;
use crate::limits::*;
use crate::types::{BlobHash, LogOffset};

/// A request: the first frame a client writes on a new bidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Authenticate the connection. Must be the first stream of every connection.
    Auth {
        account: String,
        device: u64,
        secret: [u8; 32],
    },
    /// Ask for the offset the next record will get.
    Head,
    /// Stream every record from `from` on, then `Live`, then new records as they arrive.
    /// With `inline_blobs`, each Store record is followed by the message's bytes.
    Log { from: LogOffset, inline_blobs: bool },
    /// Store a message: exactly `size` raw bytes follow this frame, then the stream ends.
    /// `tags` are the initial tags of the Store record if the message is new.
    Store { size: u64, tags: Vec<String> },
    /// Fetch a message's bytes.
    Fetch { hash: BlobHash },
    /// Change a message's tags (see [`crate::tags`]). `seen` is the highest log offset the
    /// device had applied when it made the change; `(device, seq)` makes the request
    /// idempotent, the device being the authenticated one.
    Tag {
        hash: BlobHash,
        add: Vec<String>,
        remove: Vec<String>,
        seen: LogOffset,
        seq: u64,
    },
    /// Send a message: exactly `size` raw bytes follow this frame, then the stream ends.
    /// `from` is the envelope sender and `recipients` the envelope recipients; an empty
    /// `from` means the message's From address, no recipients mean its To, Cc and Bcc.
    /// Idempotent by the message's hash.
    Send {
        size: u64,
        from: String,
        recipients: Vec<String>,
    },
}

/// A response frame written by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The request failed. The stream ends after it.
    Error { code: u16, message: String },
    /// Authentication succeeded; `head` is the account's Head at that moment.
    AuthOk { head: LogOffset },
    /// The account's Head.
    Head { head: LogOffset },
    /// One log record (on a Log stream).
    Entry(LogEntry),
    /// All records below `head` have been sent; new ones follow as they are appended.
    Live { head: LogOffset },
    /// The message is durable: its hash, the offset of its Store record, and whether this
    /// request appended that record (`false`: the account already held the message).
    Stored {
        hash: BlobHash,
        offset: LogOffset,
        new: bool,
    },
    /// Exactly `size` raw message bytes follow this frame, then the stream ends.
    Blob { size: u64 },
    /// The Tag request is durable as the Tags record at `offset`; `new` is false when this
    /// `(device, seq)` had already been recorded (a retry).
    Tagged { offset: LogOffset, new: bool },
    /// The Send request is durable as the Send record at `offset` and queued for relay;
    /// `new` is false when the account had already sent these exact bytes.
    Sent {
        hash: BlobHash,
        offset: LogOffset,
        new: bool,
    },
}

/// A record of the metadata log, with the server's offset and time of append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub offset: LogOffset,
    /// Milliseconds since the Unix epoch, server clock, at append.
    pub time_ms: u64,
    pub record: Record,
}

/// What happened to the mailbox. Only the server writes records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A message arrived, with its initial tags.
    Store {
        hash: BlobHash,
        size: u64,
        tags: Vec<String>,
    },
    /// A message was submitted for sending to `recipients` with envelope sender `from`.
    Send {
        hash: BlobHash,
        size: u64,
        from: String,
        recipients: Vec<String>,
    },
    /// A message's tags changed (see the tag CRDT in docs/PROTOCOL.md).
    Tags {
        hash: BlobHash,
        add: Vec<String>,
        remove: Vec<String>,
        /// The log offset the device had applied when it made the change.
        seen: LogOffset,
        device: u64,
        seq: u64,
    },
    /// The records at `offsets` were deleted; their contents are gone.
    Scrub { offsets: Vec<LogOffset> },
}

impl Record {
    /// The message a record refers to (none for Scrub).
    pub fn hash(&self) -> Option<BlobHash> {
        match self {
            Record::Store { hash, .. } | Record::Send { hash, .. } | Record::Tags { hash, .. } => {
                Some(*hash)
            }
            Record::Scrub { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding

type Enc = Encoder<Vec<u8>>;

fn enc() -> Enc {
    Encoder::new(Vec::new())
}

/// Writing into a `Vec` cannot fail; this keeps the encoders free of error plumbing.
fn done(r: Result<&mut Enc, minicbor::encode::Error<std::convert::Infallible>>) {
    if let Err(e) = r {
        unreachable!("encoding into a Vec failed: {e}");
    }
}

fn strs(e: &mut Enc, v: &[String]) {
    done(e.array(v.len() as u64));
    for s in v {
        done(e.str(s));
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = enc();
        match self {
            Request::Auth {
                account,
                device,
                secret,
            } => {
                done(
                    e.array(4)
                        .and_then(|e| e.u8(0))
                        .and_then(|e| e.str(account)),
                );
                done(e.u64(*device).and_then(|e| e.bytes(secret)));
            }
            Request::Head => done(e.array(1).and_then(|e| e.u8(1))),
            Request::Log { from, inline_blobs } => {
                done(e.array(3).and_then(|e| e.u8(2)).and_then(|e| e.u64(*from)));
                done(e.bool(*inline_blobs));
            }
            Request::Store { size, tags } => {
                done(e.array(3).and_then(|e| e.u8(3)).and_then(|e| e.u64(*size)));
                strs(&mut e, tags);
            }
            Request::Fetch { hash } => done(
                e.array(2)
                    .and_then(|e| e.u8(4))
                    .and_then(|e| e.bytes(&hash.0)),
            ),
            Request::Tag {
                hash,
                add,
                remove,
                seen,
                seq,
            } => {
                done(
                    e.array(6)
                        .and_then(|e| e.u8(5))
                        .and_then(|e| e.bytes(&hash.0)),
                );
                strs(&mut e, add);
                strs(&mut e, remove);
                done(e.u64(*seen).and_then(|e| e.u64(*seq)));
            }
            Request::Send {
                size,
                from,
                recipients,
            } => {
                done(e.array(4).and_then(|e| e.u8(6)).and_then(|e| e.u64(*size)));
                done(e.str(from));
                strs(&mut e, recipients);
            }
        }
        e.into_writer()
    }

    /// The request framed, ready to write.
    pub fn to_frame(&self) -> Vec<u8> {
        crate::frame::encode(&self.encode())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let (kind, len) = r.header()?;
        let req = match kind {
            0 => Request::Auth {
                account: r.string("account", MAX_ACCOUNT_NAME_LEN)?,
                device: r.u64()?,
                secret: r.fixed32("secret")?,
            },
            1 => Request::Head,
            2 => Request::Log {
                from: r.u64()?,
                inline_blobs: r.bool()?,
            },
            3 => Request::Store {
                size: r.u64()?,
                tags: r.tags()?,
            },
            4 => Request::Fetch { hash: r.hash()? },
            5 => Request::Tag {
                hash: r.hash()?,
                add: r.tags()?,
                remove: r.tags()?,
                seen: r.u64()?,
                seq: r.u64()?,
            },
            6 => Request::Send {
                size: r.u64()?,
                from: r.string("from", MAX_ADDRESS_LEN)?,
                recipients: r.strings("recipients", MAX_RECIPIENTS, MAX_ADDRESS_LEN)?,
            },
            k => {
                return Err(DecodeError::UnknownKind {
                    what: "request",
                    kind: k,
                });
            }
        };
        r.finish(len)?;
        Ok(req)
    }

    /// Whether executing this request changes server state. Such requests never run from
    /// 0-RTT data before the handshake completes (docs/PROTOCOL.md, "0-RTT profile").
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Request::Store { .. } | Request::Tag { .. } | Request::Send { .. }
        )
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = enc();
        match self {
            Response::Error { code, message } => {
                done(e.array(3).and_then(|e| e.u8(0)).and_then(|e| e.u16(*code)));
                done(e.str(message));
            }
            Response::AuthOk { head } => {
                done(e.array(2).and_then(|e| e.u8(1)).and_then(|e| e.u64(*head)))
            }
            Response::Head { head } => {
                done(e.array(2).and_then(|e| e.u8(2)).and_then(|e| e.u64(*head)))
            }
            Response::Entry(entry) => {
                done(
                    e.array(4)
                        .and_then(|e| e.u8(3))
                        .and_then(|e| e.u64(entry.offset)),
                );
                done(e.u64(entry.time_ms));
                entry.record.encode_into(&mut e);
            }
            Response::Live { head } => {
                done(e.array(2).and_then(|e| e.u8(4)).and_then(|e| e.u64(*head)))
            }
            Response::Stored { hash, offset, new } => {
                done(
                    e.array(4)
                        .and_then(|e| e.u8(5))
                        .and_then(|e| e.bytes(&hash.0)),
                );
                done(e.u64(*offset).and_then(|e| e.bool(*new)));
            }
            Response::Blob { size } => {
                done(e.array(2).and_then(|e| e.u8(6)).and_then(|e| e.u64(*size)))
            }
            Response::Tagged { offset, new } => {
                done(
                    e.array(3)
                        .and_then(|e| e.u8(7))
                        .and_then(|e| e.u64(*offset)),
                );
                done(e.bool(*new));
            }
            Response::Sent { hash, offset, new } => {
                done(
                    e.array(4)
                        .and_then(|e| e.u8(8))
                        .and_then(|e| e.bytes(&hash.0)),
                );
                done(e.u64(*offset).and_then(|e| e.bool(*new)));
            }
        }
        e.into_writer()
    }

    pub fn to_frame(&self) -> Vec<u8> {
        crate::frame::encode(&self.encode())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let (kind, len) = r.header()?;
        let resp = match kind {
            0 => Response::Error {
                code: u16::try_from(r.u64()?).map_err(|_| DecodeError::InvalidField("code"))?,
                message: r.string("message", MAX_ERROR_MESSAGE_LEN)?,
            },
            1 => Response::AuthOk { head: r.u64()? },
            2 => Response::Head { head: r.u64()? },
            3 => Response::Entry(LogEntry {
                offset: r.u64()?,
                time_ms: r.u64()?,
                record: Record::decode_from(&mut r)?,
            }),
            4 => Response::Live { head: r.u64()? },
            5 => Response::Stored {
                hash: r.hash()?,
                offset: r.u64()?,
                new: r.bool()?,
            },
            6 => Response::Blob { size: r.u64()? },
            7 => Response::Tagged {
                offset: r.u64()?,
                new: r.bool()?,
            },
            8 => Response::Sent {
                hash: r.hash()?,
                offset: r.u64()?,
                new: r.bool()?,
            },
            k => {
                return Err(DecodeError::UnknownKind {
                    what: "response",
                    kind: k,
                });
            }
        };
        r.finish(len)?;
        Ok(resp)
    }

    /// An error response with a message cut to the protocol limit.
    pub fn error(code: crate::ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut cut = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error {
            code: code.code(),
            message,
        }
    }
}

impl Record {
    fn encode_into(&self, e: &mut Enc) {
        match self {
            Record::Store { hash, size, tags } => {
                done(
                    e.array(4)
                        .and_then(|e| e.u8(0))
                        .and_then(|e| e.bytes(&hash.0)),
                );
                done(e.u64(*size));
                strs(e, tags);
            }
            Record::Send {
                hash,
                size,
                from,
                recipients,
            } => {
                done(
                    e.array(5)
                        .and_then(|e| e.u8(1))
                        .and_then(|e| e.bytes(&hash.0)),
                );
                done(e.u64(*size).and_then(|e| e.str(from)));
                strs(e, recipients);
            }
            Record::Tags {
                hash,
                add,
                remove,
                seen,
                device,
                seq,
            } => {
                done(
                    e.array(7)
                        .and_then(|e| e.u8(2))
                        .and_then(|e| e.bytes(&hash.0)),
                );
                strs(e, add);
                strs(e, remove);
                done(
                    e.u64(*seen)
                        .and_then(|e| e.u64(*device))
                        .and_then(|e| e.u64(*seq)),
                );
            }
            Record::Scrub { offsets } => {
                done(
                    e.array(2)
                        .and_then(|e| e.u8(3))
                        .and_then(|e| e.array(offsets.len() as u64)),
                );
                for o in offsets {
                    done(e.u64(*o));
                }
            }
        }
    }

    /// The record alone, as stored on disk and hashed into its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = enc();
        self.encode_into(&mut e);
        e.into_writer()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let rec = Record::decode_from(&mut r)?;
        r.end()?;
        Ok(rec)
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        // A record nested in an Entry is one element of the outer array.
        let outer = r.read;
        let (kind, len) = r.header()?;
        let rec = match kind {
            0 => Record::Store {
                hash: r.hash()?,
                size: r.u64()?,
                tags: r.tags()?,
            },
            1 => Record::Send {
                hash: r.hash()?,
                size: r.u64()?,
                from: r.string("from", MAX_ADDRESS_LEN)?,
                recipients: r.strings("recipients", MAX_RECIPIENTS, MAX_ADDRESS_LEN)?,
            },
            2 => Record::Tags {
                hash: r.hash()?,
                add: r.tags()?,
                remove: r.tags()?,
                seen: r.u64()?,
                device: r.u64()?,
                seq: r.u64()?,
            },
            3 => {
                let n = r.array_len("offsets", MAX_SCRUB_OFFSETS)?;
                let mut offsets = Vec::with_capacity(n);
                for _ in 0..n {
                    offsets.push(r.d.u64()?);
                }
                Record::Scrub { offsets }
            }
            k => {
                return Err(DecodeError::UnknownKind {
                    what: "record",
                    kind: k,
                });
            }
        };
        r.skip_extra(len)?;
        r.read = outer + 1;
        Ok(rec)
    }
}

// ---------------------------------------------------------------------------------------
// Decoding helpers

/// A decoder that tracks how many array elements of the current message it has read.
struct Reader<'b> {
    d: Decoder<'b>,
    read: u64,
}

impl<'b> Reader<'b> {
    fn new(bytes: &'b [u8]) -> Self {
        Reader {
            d: Decoder::new(bytes),
            read: 0,
        }
    }

    /// Reads `[kind, ...`: a definite array of at least one element and its type number.
    fn header(&mut self) -> Result<(u64, u64), DecodeError> {
        let len = self
            .d
            .array()?
            .ok_or(DecodeError::InvalidField("indefinite array"))?;
        if len == 0 {
            return Err(DecodeError::InvalidField("empty message"));
        }
        self.read = 0;
        let kind = self.u64()?;
        Ok((kind, len))
    }

    fn count(&mut self) {
        self.read += 1;
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.count();
        Ok(self.d.u64()?)
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        self.count();
        Ok(self.d.bool()?)
    }

    fn fixed32(&mut self, what: &'static str) -> Result<[u8; 32], DecodeError> {
        self.count();
        let b = self.d.bytes()?;
        b.try_into().map_err(|_| DecodeError::InvalidField(what))
    }

    fn hash(&mut self) -> Result<BlobHash, DecodeError> {
        Ok(BlobHash(self.fixed32("hash")?))
    }

    fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        self.count();
        let s = self.d.str()?;
        if s.len() > max {
            return Err(DecodeError::TooLong { what });
        }
        Ok(s.to_owned())
    }

    fn array_len(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        self.count();
        let n = self
            .d
            .array()?
            .ok_or(DecodeError::InvalidField("indefinite array"))?;
        if n > max as u64 {
            return Err(DecodeError::TooLong { what });
        }
        Ok(n as usize)
    }

    fn strings(
        &mut self,
        what: &'static str,
        max_items: usize,
        max_len: usize,
    ) -> Result<Vec<String>, DecodeError> {
        let n = self.array_len(what, max_items)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let s = self.d.str()?;
            if s.len() > max_len {
                return Err(DecodeError::TooLong { what });
            }
            out.push(s.to_owned());
        }
        Ok(out)
    }

    fn tags(&mut self) -> Result<Vec<String>, DecodeError> {
        let tags = self.strings("tags", MAX_TAGS, MAX_TAG_LEN)?;
        if tags.iter().any(|t| !valid_tag(t)) {
            return Err(DecodeError::InvalidField("tag"));
        }
        Ok(tags)
    }

    /// Skips array elements a newer peer added after the ones this version knows.
    fn skip_extra(&mut self, len: u64) -> Result<(), DecodeError> {
        if self.read > len {
            return Err(DecodeError::Truncated);
        }
        for _ in self.read..len {
            self.d.skip()?;
        }
        Ok(())
    }

    fn finish(&mut self, len: u64) -> Result<(), DecodeError> {
        self.skip_extra(len)?;
        self.end()
    }

    fn end(&self) -> Result<(), DecodeError> {
        let rest = self.d.input().len() - self.d.position();
        if rest > 0 {
            return Err(DecodeError::TrailingBytes(rest));
        }
        Ok(())
    }
}

/// A tag is non-empty UTF-8 without control characters (spaces and non-ASCII are fine).
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= MAX_TAG_LEN && !tag.chars().any(char::is_control)
}

#[cfg(test)]
mod tests;
