//! The Postlog client library: keep a complete local copy of an account.
//!
//! - [`LoginUrl`] and [`Profile`]: what `postlog login` stores (server, account, device
//!   secret, pinned certificate fingerprint, Maildir path, cursor).
//! - [`Connection`]: a QUIC connection to the server, authenticated, with typed requests
//!   (`head`, `store`, `fetch`, `log`). Certificates are pinned by fingerprint.
//! - [`Maildir`]: the local replica, written durably in batches (one barrier per batch).
//! - [`sync`]: the sync engine: Log from the durable cursor, write mail, advance the cursor
//!   only after what it covers is durable; `watch` keeps going and reconnects.
//! - [`state`]: the replica's tag CRDT state, Maildir names and queued local tag changes
//!   (`PROFILE/state.db`).
//! - [`import`]: store an existing Maildir's messages on the server, many at once.
//! - [`outbox`]: mail `postlog sendmail` could not hand to the server yet, kept durably and
//!   sent (idempotently) by the next sync, watch or sendmail.
//! - [`imap`]: copy an IMAP account's folders into the account (flags, keywords and folders
//!   become tags), resumable by per-folder UIDVALIDITY/UID checkpoints in state.db.
//! - `notmuch` (feature `notmuch`, links GPL-3.0-or-later libnotmuch): index synced mail in
//!   a notmuch database and sync every notmuch tag both ways.
//!
//! Architecture invariant: the cursor on disk never covers a record whose effects are not
//! durable locally, so a crash at any point followed by another sync converges.

mod connection;
pub mod imap;
pub mod import;
mod maildir;
#[cfg(feature = "notmuch")]
pub mod notmuch;
pub mod outbox;
mod profile;
pub mod state;
pub mod sync;

pub use connection::{ClientError, Connection, Endpoint, LogItem, LogStream};
pub use maildir::hash_of_name;
pub use maildir::{Maildir, MaildirError, NewMessage};
pub use profile::{LoginUrl, NOTMUCH_FOLDER, Profile, ProfileError, notmuch_folder};
