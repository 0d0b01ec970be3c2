//! Every named limit on peer input. Each has a test that crosses it.

/// Largest control frame payload (the CBOR bytes after the 4-byte length).
pub const MAX_FRAME_LEN: u32 = 64 * 1024;
/// Largest message a client may Store (servers may configure a lower one).
pub const MAX_MESSAGE_SIZE: u64 = 64 * 1024 * 1024;
/// Longest account name, in bytes.
pub const MAX_ACCOUNT_NAME_LEN: usize = 64;
/// Longest tag, in bytes (UTF-8).
pub const MAX_TAG_LEN: usize = 256;
/// Most tags in one Store record or one Tag operation (add and remove counted together).
pub const MAX_TAGS: usize = 64;
/// Most addresses in a Send envelope.
pub const MAX_RECIPIENTS: usize = 1000;
/// Longest mail address, in bytes (RFC 5321 path limit).
pub const MAX_ADDRESS_LEN: usize = 256;
/// Most offsets one Scrub record lists.
pub const MAX_SCRUB_OFFSETS: usize = 4096;
/// Most dots of one tag in a TagSnapshot record (a message whose tag has more concurrent
/// adds is not compacted).
pub const MAX_SNAPSHOT_DOTS: usize = 32;
/// Longest human-readable error message in an Error response.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

// The list limits keep every message inside one frame: 64 tags x 256 bytes x 2 lists and
// 4096 offsets x 9 bytes are both well under MAX_FRAME_LEN.
const _: () = assert!((2 * MAX_TAGS * (MAX_TAG_LEN + 3)) < MAX_FRAME_LEN as usize);
const _: () = assert!(MAX_SCRUB_OFFSETS * 9 + 16 < MAX_FRAME_LEN as usize);
// A TagSnapshot of MAX_TAGS tags with MAX_SNAPSHOT_DOTS dots of two u64 each.
const _: () =
    assert!(MAX_TAGS * (MAX_TAG_LEN + 6 + MAX_SNAPSHOT_DOTS * 19) + 64 < MAX_FRAME_LEN as usize);
