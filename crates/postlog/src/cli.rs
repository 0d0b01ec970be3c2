//! Command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "postlog",
    version,
    about = "Sync a whole mailbox over one QUIC connection.",
    long_about = "Postlog is a mail server and client. The server keeps, per account, an \
append-only metadata log and a content-addressed blob store; clients keep a complete Maildir \
replica and sync it with one request: \"everything after offset N\".\n\n\
Quick start:  postlog demo\n\
Server:       postlog serve --data DIR   and   postlog account add NAME --data DIR\n\
Mail in:      postlog serve --data DIR --lmtp 127.0.0.1:2424   or   postlog deliver\n\
Client:       postlog login URL   then   postlog sync   or   postlog sync --watch"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server in the foreground (creates config, certificate and store on first start).
    Serve(ServeArgs),
    /// Manage accounts (works while the server runs).
    #[command(subcommand)]
    Account(AccountCmd),
    /// List and revoke devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Deliver one message from stdin into an account (a local delivery agent for
    /// Postfix's mailbox_command or procmail).
    Deliver(DeliverArgs),
    /// Check every record and every blob of a data directory; non-zero exit on problems.
    Verify(DataArg),
    /// Copy an embedded data directory (server stopped) into the PostgreSQL + S3 storage
    /// configured in --data's postlog.toml, keeping every offset (docs/DEPLOYMENT.md).
    Migrate(MigrateArgs),
    /// Remove objects that no record names (left by a crash between upload and commit;
    /// PostgreSQL + S3 storage only).
    Gc(GcArgs),
    /// Store a login URL (from `postlog account add`) in a client profile.
    Login(LoginArgs),
    /// Sync the account into the local Maildir (oneshot, or --watch for push).
    Sync(SyncArgs),
    /// Store existing mail on the server.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Change a message's tags (+TAG adds, -TAG removes), or print its tags (no +/-).
    Tag(TagArgs),
    /// Delete messages everywhere: on the server and, at their next sync, on every device.
    Delete(DeleteArgs),
    /// Show server, account, cursor, Head and local message count.
    Status(ProfileArg),
    /// Send one message from stdin, as sendmail(8) does (also runs when postlog is invoked
    /// through a link named `sendmail`). Queued in the outbox when the server is offline.
    #[command(disable_help_flag = true)]
    Sendmail(SendmailArgs),
    /// Run a self-contained demonstration on loopback, with timings; needs no setup.
    Demo(DemoArgs),
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The embedded data directory to copy (no server may run on it).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    #[command(flatten)]
    pub data: DataArg,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Only objects at least this old (uploads of a commit still running are younger).
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub min_age: String,
}

#[derive(Args, Debug)]
pub struct DataArg {
    /// The server's data directory.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// UDP address to listen on (overrides `listen` in postlog.toml).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Accept mail over LMTP on this TCP address, e.g. 127.0.0.1:2424 (overrides [lmtp]).
    #[arg(long, value_name = "ADDR:PORT")]
    pub lmtp: Option<SocketAddr>,
    /// Accept mail over LMTP on this Unix socket (overrides [lmtp] unix).
    #[arg(long, value_name = "PATH")]
    pub lmtp_socket: Option<PathBuf>,
    /// Accept mail over SMTP (with STARTTLS) on this TCP address (overrides [smtp]).
    #[arg(long, value_name = "ADDR:PORT")]
    pub smtp: Option<SocketAddr>,
    /// Relay sent mail through this SMTP server (overrides [relay] url):
    /// smtp://[USER:PASS@]HOST[:PORT] (STARTTLS), smtps://... (TLS), smtp+plain://... (none).
    #[arg(long, value_name = "URL")]
    pub relay: Option<String>,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status (sysexits, as MTAs expect): 0 stored durably; 65 not a \
mail message (EX_DATAERR); 67 no such account (EX_NOUSER); 75 could not store now, try again \
later (EX_TEMPFAIL).\n\n\
With no server running, the message is stored directly in DIR. While the server runs (it \
holds DIR's lock), the message goes to the server's LMTP listener: --lmtp, else [lmtp] in \
DIR/postlog.toml. With [storage] backend = \"postgres\" there is no lock: the message is \
stored directly, beside any running server.\n\n\
Postfix:   mailbox_command = /usr/local/bin/postlog deliver --data DIR --account NAME\n\
procmail:  :0 w\n           | postlog deliver --data DIR --account NAME"
)]
pub struct DeliverArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// The account that receives the message.
    #[arg(long, value_name = "NAME")]
    pub account: String,
    /// Envelope sender for the Return-Path field (default: $SENDER, as Postfix sets it).
    #[arg(long, short = 'f', value_name = "ADDR", env = "SENDER")]
    pub from: Option<String>,
    /// The running server's LMTP listener: ADDR:PORT or a socket path (default: from
    /// DIR/postlog.toml).
    #[arg(long, value_name = "ADDR:PORT|PATH")]
    pub lmtp: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    /// Create an account, or add a device to an existing one; prints a login URL last.
    Add(AccountAddArgs),
}

#[derive(Args, Debug)]
pub struct AccountAddArgs {
    /// Account name (letters, digits and ._-@+; at most 64 bytes).
    pub name: String,
    #[command(flatten)]
    pub data: DataArg,
    /// A mail address this account owns (repeatable).
    #[arg(long = "address", value_name = "ADDR")]
    pub addresses: Vec<String>,
    /// A name for the new device, shown by `postlog device list`.
    #[arg(long, default_value = "device")]
    pub device: String,
    /// Server address to put in the login URL (default: public_host and port from postlog.toml).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// List an account's devices.
    List {
        account: String,
        #[command(flatten)]
        data: DataArg,
    },
    /// Revoke a device: its secret stops working for new connections.
    Revoke {
        account: String,
        device: u64,
        #[command(flatten)]
        data: DataArg,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ProfileArg {
    /// Client profile directory (default: $POSTLOG_PROFILE, else $XDG_DATA_HOME/postlog).
    #[arg(long, value_name = "DIR", env = "POSTLOG_PROFILE")]
    pub profile: Option<PathBuf>,
}

impl ProfileArg {
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.profile {
            return Ok(p.clone());
        }
        let base = match std::env::var_os("XDG_DATA_HOME") {
            Some(x) if !x.is_empty() => PathBuf::from(x),
            _ => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    anyhow::anyhow!("neither --profile, POSTLOG_PROFILE nor HOME is set")
                })?;
                PathBuf::from(home).join(".local/share")
            }
        };
        Ok(base.join("postlog"))
    }
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The login URL printed by `postlog account add`.
    pub url: String,
    #[command(flatten)]
    pub profile: ProfileArg,
    /// Where to keep the Maildir (default: PROFILE/mail; with --notmuch, DIR/postlog).
    #[arg(long, value_name = "PATH")]
    pub maildir: Option<PathBuf>,
    /// Index synced mail in notmuch and sync every notmuch tag both ways. DIR is the
    /// notmuch mail root, the directory holding .notmuch/ (default: what notmuch itself
    /// uses: $NOTMUCH_CONFIG or ~/.notmuch-config, else ~/mail). The Maildir must lie inside
    /// it. Needs a postlog built with `--features notmuch`.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub notmuch: Option<Option<PathBuf>>,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub profile: ProfileArg,
    /// Keep the Log stream open and write new mail as it arrives; reconnect on failures.
    #[arg(long)]
    pub watch: bool,
    /// Print nothing on success (for cron); errors still go to stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum ImportCmd {
    /// Store every message of a Maildir (cur/, new/ and Maildir++ subfolders). Idempotent.
    Maildir {
        /// The Maildir to import.
        src: PathBuf,
        #[command(flatten)]
        profile: ProfileArg,
        /// Never show a progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Copy every message of an IMAP account (all folders, or --folder ones) into the
    /// account; flags, keywords and folders become tags. Resumable: the next run copies only
    /// what is new, so it can run periodically as a bridge.
    Imap(ImportImapArgs),
}

/// How to reach the IMAP server.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsArg {
    /// TLS from the first byte (IMAPS, port 993).
    Implicit,
    /// STARTTLS on a plain connection (port 143).
    Starttls,
    /// No TLS: the password travels in the clear. Needs --insecure-plaintext.
    Plain,
}

#[derive(Args, Debug)]
#[command(
    after_help = "The password comes from --password-file FILE (its first line) or from \
the environment variable POSTLOG_IMAP_PASSWORD; never from the command line.\n\n\
Tags: INBOX -> inbox, other folders -> their name (hierarchy delimiter turned into /), \
\\Seen -> no unread, \\Flagged -> flagged, \\Answered -> replied, \\Draft -> draft, \
\\Deleted -> deleted, keywords -> themselves. A message in several folders gets every \
folder's tag. The importer only adds tags; the source account is never changed (EXAMINE, \
BODY.PEEK).\n\n\
Examples:\n  \
POSTLOG_IMAP_PASSWORD=... postlog import imap --host imap.example.org --user ann\n  \
postlog import imap --host mail.example.org --user ann --password-file ~/.imap-pass \\\n    \
--folder INBOX --folder Archive --folder-tag Archive=archive"
)]
pub struct ImportImapArgs {
    #[command(flatten)]
    pub profile: ProfileArg,
    /// The IMAP server's host name (checked against its certificate).
    #[arg(long)]
    pub host: String,
    /// Port (default: 993 with --tls implicit, else 143).
    #[arg(long)]
    pub port: Option<u16>,
    /// The IMAP login name.
    #[arg(long)]
    pub user: String,
    /// A file whose first line is the password (else $POSTLOG_IMAP_PASSWORD).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// How the connection is protected.
    #[arg(long, value_enum, default_value = "implicit")]
    pub tls: TlsArg,
    /// Allow --tls plain (for an IMAP server on loopback).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Also trust the CA certificates in this PEM file (a private CA or a self-signed server).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Copy this folder (repeatable; default: every folder).
    #[arg(long = "folder", value_name = "NAME")]
    pub folders: Vec<String>,
    /// Tag FOLDER's messages with TAG instead of the folder's name (repeatable).
    #[arg(long = "folder-tag", value_name = "FOLDER=TAG")]
    pub folder_tags: Vec<String>,
    /// Print nothing on success, no progress bar and no summary (for cron); errors still
    /// go to stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  postlog tag +flagged -unread 3f2a...  (64-hex message hashes; Maildir file names start with them)\n  postlog tag 3f2a...                   (prints the message's tags, one per line)\n\nThe change is sent at once when the server is reachable, else at the next sync."
)]
pub struct TagArgs {
    #[command(flatten)]
    pub profile: ProfileArg,
    /// +TAG, -TAG and message hashes, in any order.
    #[arg(required = true, allow_hyphen_values = true, num_args = 1.., value_name = "+TAG|-TAG|HASH")]
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SendmailArgs {
    /// sendmail(8) options and recipients (`postlog sendmail --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  postlog delete 3f2a...  (64-hex message hashes; Maildir file names start with them)\n\nThe server removes the message and every record about it, and each device removes its\nfile, its tags and its notmuch entry when it next syncs. Sent at once when the server is\nreachable, else queued for the next sync. To delete after a grace period instead, tag the\nmessage `deleted` (postlog tag +deleted HASH): the server's retention rule removes it later."
)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub profile: ProfileArg,
    /// Message hashes.
    #[arg(required = true, num_args = 1.., value_name = "HASH")]
    pub hashes: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Messages in the generated sample mailbox.
    #[arg(long, default_value_t = 3000)]
    pub messages: usize,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use crate::{client_cmds as c, server_cmds as s};
    match cli.command {
        Command::Serve(a) => s::serve(a).await,
        Command::Account(AccountCmd::Add(a)) => s::account_add(a),
        Command::Device(d) => s::device(d),
        Command::Verify(a) => s::verify(a),
        Command::Migrate(a) => s::migrate(a),
        Command::Gc(a) => s::gc(a),
        Command::Deliver(a) => Ok(crate::deliver::run(a)),
        Command::Login(a) => c::login(a).await,
        Command::Sync(a) => c::sync(a).await,
        Command::Import(ImportCmd::Maildir {
            src,
            profile,
            quiet,
        }) => c::import_maildir(src, profile, quiet).await,
        Command::Import(ImportCmd::Imap(a)) => c::import_imap(a).await,
        Command::Status(a) => c::status(a).await,
        Command::Tag(a) => c::tag(a).await,
        Command::Delete(a) => c::delete(a).await,
        Command::Demo(a) => crate::demo::run(a).await,
        Command::Sendmail(a) => Ok(crate::sendmail::run(a.args).await),
    }
}
