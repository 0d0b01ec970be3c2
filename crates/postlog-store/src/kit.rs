//! Building blocks every storage backend shares, so that a record, a checksum, a tag state
//! or an account rule means the same thing in the embedded store and in
//! `postlog-store-pg` (PostgreSQL + S3). Nothing here touches a database.

pub use crate::accounts::{
    address_candidates, normalize_address, secret_hash, validate_account_name,
};
pub use crate::blobs::{blob_path, read_verified};
pub use crate::db::{KIND_SCRUBBED, checksum};
pub use crate::now_ms;
pub use crate::relay::{DELIVERED, FAILED, PENDING, attempts, push_due};
pub use crate::scrub::{History, apply, decode_row};
pub use crate::store::HeadWatcher;
pub use crate::verify::RowCheck;

use postlog_proto::Record;

/// The `kind` column of a record (docs/DURABILITY.md): 0 Store, 1 Send, 2 Tags, 3 Scrub,
/// 4 TagSnapshot; 255 ([`KIND_SCRUBBED`]) is an emptied record.
pub fn record_kind(record: &Record) -> i64 {
    match record {
        Record::Store { .. } => 0,
        Record::Send { .. } => 1,
        Record::Tags { .. } => 2,
        Record::Scrub { .. } => 3,
        Record::TagSnapshot { .. } => 4,
    }
}
