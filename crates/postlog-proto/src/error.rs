//! Error codes sent to peers, and decoder errors.

/// Why a request failed. Sent in an `Error` response and as the QUIC stream reset code.
/// The numbers are part of the protocol (docs/PROTOCOL.md, "Error codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame or its CBOR could not be decoded (truncated, bad length, bad field).
    Malformed = 1,
    /// The request type is not known to this server.
    UnknownRequest = 2,
    /// A request arrived before the connection authenticated.
    Unauthenticated = 3,
    /// Unknown account, unknown device, revoked device or wrong secret (indistinguishable).
    AuthFailed = 4,
    /// No such message in this account.
    NotFound = 5,
    /// A message, frame or list is larger than its limit.
    TooLarge = 6,
    /// The stream ended before the announced number of bytes, or carried data after them.
    SizeMismatch = 7,
    /// A per-connection or server-wide limit was reached; retry later.
    Busy = 8,
    /// The server failed to read or write its storage; retry later.
    Internal = 9,
    /// A stored blob failed verification against its hash; it is never served.
    Corrupt = 10,
    /// The request is well-formed but not acceptable (e.g. an invalid field value).
    Invalid = 11,
    /// A Send carried something that is not a mail message (no header section, no From).
    NotMail = 12,
    /// A Send's envelope sender or From address is not one of the account's addresses.
    SenderNotAllowed = 13,
    /// A Send had no recipients, explicit or in To/Cc/Bcc, or an invalid one.
    BadRecipients = 14,
}

impl ErrorCode {
    /// The wire number.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a wire number; unknown numbers decode as `None` (callers treat them as
    /// a generic failure, so new codes can be added).
    pub fn from_code(n: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match n {
            1 => Malformed,
            2 => UnknownRequest,
            3 => Unauthenticated,
            4 => AuthFailed,
            5 => NotFound,
            6 => TooLarge,
            7 => SizeMismatch,
            8 => Busy,
            9 => Internal,
            10 => Corrupt,
            11 => Invalid,
            12 => NotMail,
            13 => SenderNotAllowed,
            14 => BadRecipients,
            _ => return None,
        })
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::Internal)
    }
}

/// QUIC application error codes used when closing a whole connection.
pub mod close {
    /// Normal close by either side.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol on the connection level (e.g. the first stream was not Auth).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// Authentication failed.
    pub const AUTH_FAILED: u32 = 2;
    /// The server is shutting down; reconnect later.
    pub const SHUTDOWN: u32 = 3;
    /// The server has too many connections; reconnect later.
    pub const BUSY: u32 = 4;
    /// The device was revoked.
    pub const REVOKED: u32 = 5;
}

/// What a decoder rejects. Never a panic: every malformed input ends here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame length {0} exceeds the limit of {max}", max = crate::limits::MAX_FRAME_LEN)]
    FrameTooLarge(u32),
    #[error("truncated input")]
    Truncated,
    #[error("invalid CBOR: {0}")]
    Cbor(String),
    #[error("unknown {what} type {kind}")]
    UnknownKind { what: &'static str, kind: u64 },
    #[error("field {0} is invalid")]
    InvalidField(&'static str),
    #[error("{what} exceeds its limit")]
    TooLong { what: &'static str },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The error code a server answers for this decode error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge(_) | DecodeError::TooLong { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownKind {
                what: "request", ..
            } => ErrorCode::UnknownRequest,
            _ => ErrorCode::Malformed,
        }
    }
}

impl From<minicbor::decode::Error> for DecodeError {
    fn from(e: minicbor::decode::Error) -> Self {
        if e.is_end_of_input() {
            DecodeError::Truncated
        } else {
            DecodeError::Cbor(e.to_string())
        }
    }
}
