//! Byte-level work on a message's header section that must leave every other byte alone.

/// The length of the header section, up to and including the empty line that ends it (or
/// the whole input when there is no body). `None` when the input does not start with a
/// header field (`Name: value`), i.e. it is not a mail message.
pub fn header_section(bytes: &[u8]) -> Option<usize> {
    let first = bytes.split(|&b| b == b'\n').next()?;
    let colon = first.iter().position(|&b| b == b':')?;
    let name = &first[..colon];
    if name.is_empty() || !name.iter().all(|&b| b.is_ascii_graphic()) {
        return None;
    }
    let mut pos = 0;
    while pos < bytes.len() {
        let end = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| pos + i + 1);
        let line = &bytes[pos..end];
        if line == b"\n" || line == b"\r\n" {
            return Some(end);
        }
        pos = end;
    }
    Some(bytes.len())
}

/// The message without every header field named `name` (ASCII case-insensitive), their
/// continuation lines included. The body and all other bytes are unchanged.
pub fn strip_header(bytes: &[u8], name: &str) -> Vec<u8> {
    let Some(head_len) = header_section(bytes) else {
        return bytes.to_vec();
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut pos = 0;
    let mut dropping = false;
    while pos < head_len {
        let end = bytes[pos..head_len]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head_len, |i| pos + i + 1);
        let line = &bytes[pos..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            dropping = line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()..]
                    .iter()
                    .find(|&&b| b != b' ' && b != b'\t')
                    == Some(&b':');
        }
        if !dropping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out.extend_from_slice(&bytes[head_len..]);
    out
}

/// The message with every line ending as CRLF (SMTP's form); bare CR and bare LF become CRLF.
pub fn to_crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The copy of a stored message that goes to the relay: without Bcc (and Resent-Bcc)
/// fields, with CRLF line endings. The account's own copy keeps its Bcc.
///
/// Line endings are made CRLF first: a bare CR turned into a line break afterwards could
/// otherwise start a Bcc field the stripping did not see (found by fuzzing).
pub fn relay_copy(bytes: &[u8]) -> Vec<u8> {
    strip_header(&strip_header(&to_crlf(bytes), "Bcc"), "Resent-Bcc")
}
