//! `postlog sendmail`: a drop-in for sendmail(8) as mail readers call it (notmuch-emacs,
//! mutt, git send-email). Also runs when the binary is invoked through a link named
//! `sendmail`. Reads one message on stdin and hands it to the server's Send; when the server
//! cannot be reached it keeps the message durably in the profile's outbox, which the next
//! `sync`, `sync --watch` or `sendmail` sends first. Exit codes are sysexits(3).
//!
//! The profile comes from `POSTLOG_PROFILE` or the default location (mail readers cannot
//! pass flags); `--profile DIR` works too.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use postlog_client::outbox::{Outbox, exit_code_for};
use postlog_client::{ClientError, Endpoint, Profile, ProfileError};

use crate::cli::ProfileArg;

const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

pub const USAGE: &str =
    "usage: sendmail [-t] [-i|-oi] [-f ADDR] [-F NAME] [--profile DIR] [RECIPIENT...]
       sendmail -q     send what the outbox holds
       sendmail -bp    list what the outbox holds
Reads one message on stdin. -t takes the recipients from To, Cc and Bcc (plus any given);
without -t, the RECIPIENT arguments are the envelope. Bcc is removed from the relayed copy.
Exit 0 once the server has the message durably, or once it is in the local outbox when the
server cannot be reached; then the next `postlog sync` sends it.
Other options of sendmail (-oem, -odb, -B, -N, -R, -v, ...) are accepted and ignored.";

#[derive(Debug, Default, PartialEq, Eq)]
struct Opts {
    profile: Option<PathBuf>,
    from: Option<String>,
    full_name: Option<String>,
    from_headers: bool,
    /// Without -i/-oi, a line holding a single "." ends the message (sendmail's default).
    dot_ends: bool,
    mode: Mode,
    recipients: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Mode {
    #[default]
    Send,
    Flush,
    List,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        dot_ends: true,
        ..Opts::default()
    };
    let mut i = 0;
    // A value attached to the flag (`-fADDR`) or the next argument (`-f ADDR`).
    let value = |i: &mut usize, flag: &str, arg: &str| -> Result<String, String> {
        if arg.len() > flag.len() {
            return Ok(arg[flag.len()..].to_string());
        }
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value"))
    };
    while i < args.len() {
        let arg = args[i].as_str();
        match arg {
            "--" => {
                o.recipients.extend(args[i + 1..].iter().cloned());
                break;
            }
            "--profile" => o.profile = Some(value(&mut i, arg, arg)?.into()),
            a if a.starts_with("--profile=") => o.profile = Some(a["--profile=".len()..].into()),
            "-t" => o.from_headers = true,
            "-i" | "-oi" => o.dot_ends = false,
            "-q" => o.mode = Mode::Flush,
            "-bp" => o.mode = Mode::List,
            "-bm" | "-v" | "-U" | "-m" | "-n" | "-G" => {}
            a if a.starts_with("-b") => return Err(format!("mode {a} is not supported")),
            a if a.starts_with("-f") || a.starts_with("-r") => {
                o.from = Some(value(&mut i, &a[..2], a)?);
            }
            a if a.starts_with("-F") => o.full_name = Some(value(&mut i, "-F", a)?),
            // Options whose value means nothing here.
            a if ["-B", "-N", "-R", "-V", "-X", "-L", "-h", "-p", "-C", "-O"]
                .iter()
                .any(|f| a.starts_with(f)) =>
            {
                value(&mut i, &a[..2], a)?;
            }
            a if a.starts_with("-o") || a.starts_with("-e") || a.starts_with("-d") => {}
            a if a.starts_with('-') && a.len() > 1 => return Err(format!("unknown option {a}")),
            r => o.recipients.push(r.to_string()),
        }
        i += 1;
    }
    Ok(o)
}

/// The message as sendmail reads it: everything, or (without -i) up to a line holding a
/// single dot.
fn cut_at_dot(mut bytes: Vec<u8>) -> Vec<u8> {
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |p| start + p + 1);
        let line = &bytes[start..end];
        if line == b".\n" || line == b".\r\n" || line == b"." {
            bytes.truncate(start);
            break;
        }
        start = end;
    }
    bytes
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("sendmail: {msg}");
    ExitCode::from(code)
}

pub async fn run(args: Vec<String>) -> ExitCode {
    if args.iter().any(|a| a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => return fail(EX_USAGE, format!("{e}\n{USAGE}")),
    };
    // clap reads POSTLOG_PROFILE for the other commands; sendmail parses its own flags.
    let profile = o.profile.clone().or_else(|| {
        std::env::var_os("POSTLOG_PROFILE")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    let dir = match (ProfileArg { profile }).dir() {
        Ok(d) => d,
        Err(e) => return fail(EX_CONFIG, e),
    };
    let profile = match Profile::load(&dir) {
        Ok(p) => p,
        Err(e @ ProfileError::NotLoggedIn(_)) => return fail(EX_CONFIG, e),
        Err(e) => return fail(EX_TEMPFAIL, e),
    };
    let outbox = match Outbox::open(&profile.dir) {
        Ok(o) => o,
        Err(e) => return fail(EX_TEMPFAIL, e),
    };
    match o.mode {
        Mode::List => return list(&outbox),
        Mode::Flush => return flush_only(&profile, &outbox).await,
        Mode::Send => {}
    }

    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut bytes) {
        return fail(EX_TEMPFAIL, format!("reading the message: {e}"));
    }
    if o.dot_ends {
        bytes = cut_at_dot(bytes);
    }
    let from = o.from.clone().unwrap_or_default();
    let bytes = match add_from(bytes, &from, o.full_name.as_deref()) {
        Ok(b) => b,
        Err(e) => return fail(EX_DATAERR, e),
    };
    let explicit: Vec<String> = if o.from_headers {
        if o.recipients.is_empty() {
            Vec::new()
        } else {
            let mut all = postlog_mail::submission(&bytes, &from, &[])
                .map(|s| s.recipients)
                .unwrap_or_default();
            all.extend(o.recipients.iter().cloned());
            all
        }
    } else if o.recipients.is_empty() {
        return fail(
            EX_USAGE,
            "no recipients: give them as arguments, or -t to read To, Cc and Bcc",
        );
    } else {
        o.recipients.clone()
    };
    // Check here what the server would refuse, so a message that can never be sent is not
    // queued while offline.
    if let Err(e) = postlog_mail::submission(&bytes, &from, &explicit) {
        return fail(EX_DATAERR, e);
    }

    let queue = |why: &dyn std::fmt::Display| match outbox.put(&bytes, &from, &explicit) {
        Ok(hash) => {
            eprintln!(
                "sendmail: {why}\nsendmail: message {} queued in {}; the next `postlog sync` \
                 (or sendmail -q) sends it",
                &hash.to_hex()[..16],
                outbox.dir().display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(
            EX_TEMPFAIL,
            format!("{why}; and cannot queue the message: {e}"),
        ),
    };
    let endpoint = match Endpoint::new(&profile.login.fingerprint) {
        Ok(e) => e,
        Err(e) => return fail(EX_CONFIG, e),
    };
    let conn = match endpoint.connect(&profile.login).await {
        Ok(c) => c,
        Err(e) if e.is_retryable() => return queue(&e),
        Err(e) => return fail(EX_CONFIG, e),
    };
    report_flush(outbox.flush(&conn).await);
    let code = match conn.send(&bytes, &from, &explicit).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if e.is_retryable() => queue(&e),
        Err(ClientError::Server { code, message }) => fail(
            exit_code_for(code),
            format!("the server refused the message: {message}"),
        ),
        Err(e) => queue(&e),
    };
    conn.close();
    code
}

/// Adds `From: NAME <ADDR>` when the message has no From field and `-f` gave the address.
fn add_from(bytes: Vec<u8>, from: &str, name: Option<&str>) -> Result<Vec<u8>, String> {
    let has_from = postlog_mail::submission(&bytes, "", &["x@x.invalid".into()])
        .map(|_| true)
        .unwrap_or(false);
    if has_from || from.is_empty() {
        return Ok(bytes);
    }
    postlog_mail::check_address(from).map_err(|e| e.to_string())?;
    let line = match name {
        Some(n) if !n.is_empty() => {
            let n = n.replace(['"', '\\', '\r', '\n'], " ");
            format!("From: \"{n}\" <{from}>\n")
        }
        _ => format!("From: {from}\n"),
    };
    let mut out = line.into_bytes();
    out.extend_from_slice(&bytes);
    Ok(out)
}

fn report_flush(
    r: Result<postlog_client::outbox::Flushed, postlog_client::outbox::FlushError>,
) -> usize {
    match r {
        Ok(f) => {
            for (hash, why) in &f.failed {
                eprintln!(
                    "sendmail: queued message {} was refused and moved to outbox/failed: {why}",
                    &hash.to_hex()[..16]
                );
            }
            f.sent.len()
        }
        Err(e) => {
            eprintln!("sendmail: the outbox could not be sent yet: {e}");
            0
        }
    }
}

fn list(outbox: &Outbox) -> ExitCode {
    match outbox.list() {
        Ok(q) if q.is_empty() => {
            println!("the outbox is empty");
            ExitCode::SUCCESS
        }
        Ok(q) => {
            for m in q {
                let to = if m.recipients.is_empty() {
                    "(To/Cc/Bcc)".to_string()
                } else {
                    m.recipients.join(", ")
                };
                println!("{}  {to}", m.hash);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(EX_TEMPFAIL, e),
    }
}

async fn flush_only(profile: &Profile, outbox: &Outbox) -> ExitCode {
    let endpoint = match Endpoint::new(&profile.login.fingerprint) {
        Ok(e) => e,
        Err(e) => return fail(EX_CONFIG, e),
    };
    let conn = match endpoint.connect(&profile.login).await {
        Ok(c) => c,
        Err(e) => return fail(EX_TEMPFAIL, e),
    };
    let r = outbox.flush(&conn).await;
    conn.close();
    let failed = r.is_err();
    let sent = report_flush(r);
    eprintln!("sendmail: {sent} queued messages sent");
    if failed {
        ExitCode::from(EX_TEMPFAIL)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_what_mail_readers_pass() {
        let o = parse(&args("-oi -t -oem -odb -f ann@x.org -FAnn")).unwrap();
        assert!(o.from_headers && !o.dot_ends);
        assert_eq!(o.from.as_deref(), Some("ann@x.org"));
        assert_eq!(o.full_name.as_deref(), Some("Ann"));
        let o = parse(&args("-i -fann@x.org -- bob@y.org -t")).unwrap();
        assert_eq!(o.recipients, ["bob@y.org", "-t"]);
        assert!(!o.from_headers);
        let o = parse(&args("-N never -B 8BITMIME bob@y.org -r a@b.c")).unwrap();
        assert_eq!((o.recipients.len(), o.from.as_deref()), (1, Some("a@b.c")));
        assert_eq!(parse(&args("-q")).unwrap().mode, Mode::Flush);
        assert!(parse(&args("-bs")).is_err());
        assert!(parse(&args("-Z")).is_err());
        assert!(parse(&args("-f")).is_err());
    }

    #[test]
    fn a_lone_dot_ends_the_message_unless_i() {
        assert_eq!(cut_at_dot(b"a\n..b\n.\nafter\n".to_vec()), b"a\n..b\n");
        assert_eq!(cut_at_dot(b"a\r\n.\r\n".to_vec()), b"a\r\n");
        assert_eq!(cut_at_dot(b"a\n.x\n".to_vec()), b"a\n.x\n");
    }
}
