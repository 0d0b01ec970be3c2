//! Framing: every control message on a stream is `len: u32 big-endian` followed by `len`
//! bytes of CBOR. Raw message bytes (a Store body, a Fetch answer, an inline Log blob) are
//! not framed; the frame before them announces their exact size.

use crate::error::DecodeError;
use crate::limits::MAX_FRAME_LEN;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// Wraps an encoded message in a frame.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Parses a frame header into the payload length, rejecting lengths over [`MAX_FRAME_LEN`].
/// A zero length is malformed: no message encodes to nothing.
pub fn payload_len(header: [u8; HEADER_LEN]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLarge(len));
    }
    if len == 0 {
        return Err(DecodeError::InvalidField("frame length"));
    }
    Ok(len as usize)
}

/// Splits the first complete frame off `buf`: `Ok(Some((payload, consumed)))` when a whole
/// frame is there, `Ok(None)` when more bytes are needed.
pub fn split(buf: &[u8]) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = payload_len(h)?;
    match buf.get(HEADER_LEN..HEADER_LEN + len) {
        Some(payload) => Ok(Some((payload, HEADER_LEN + len))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_waits_for_whole_frame_and_rejects_oversize() {
        let f = encode(b"\x81\x01");
        assert_eq!(split(&f[..3]), Ok(None));
        assert_eq!(split(&f[..5]), Ok(None));
        assert_eq!(split(&f), Ok(Some((&b"\x81\x01"[..], 6))));
        let over = (MAX_FRAME_LEN + 1).to_be_bytes();
        assert_eq!(
            split(&over),
            Err(DecodeError::FrameTooLarge(MAX_FRAME_LEN + 1))
        );
        assert!(payload_len(MAX_FRAME_LEN.to_be_bytes()).is_ok());
        assert!(payload_len([0; 4]).is_err());
    }
}
