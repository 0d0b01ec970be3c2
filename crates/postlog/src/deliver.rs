//! `postlog deliver`: a local delivery agent. Reads one message on stdin and stores it in
//! an account: directly in the data directory when no server runs, else through the
//! running server's LMTP listener (the server holds the directory's lock). Exits with
//! sysexits codes, so an MTA knows whether to bounce, retry or forget.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use postlog_server::ServerConfig;
use postlog_server::storage::Storage;
use postlog_store::{NewRecord, StoreError};

use crate::cli::DeliverArgs;

/// sysexits.h: the input was not a mail message (the MTA bounces).
const EX_DATAERR: u8 = 65;
/// sysexits.h: no such user (the MTA bounces).
const EX_NOUSER: u8 = 67;
/// sysexits.h: temporary failure (the MTA keeps the message and retries).
const EX_TEMPFAIL: u8 = 75;

/// How long deliver keeps trying when the data directory is locked and the server's LMTP
/// listener does not answer (another deliver, or a server starting or stopping).
/// `POSTLOG_DELIVER_WAIT_MS` overrides it.
const BUSY_WAIT: Duration = Duration::from_secs(10);

fn busy_wait() -> Duration {
    std::env::var("POSTLOG_DELIVER_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(BUSY_WAIT)
}
/// Limit on each read and write of the LMTP conversation.
const LMTP_IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Room for the trace fields on top of the message size limit.
const TRACE_ROOM: u64 = 4096;

/// Why a delivery failed, with the exit code it maps to.
struct Failure(u8, String);

pub fn run(a: DeliverArgs) -> ExitCode {
    match deliver(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, why)) => {
            eprintln!("postlog deliver: {why}");
            ExitCode::from(code)
        }
    }
}

fn deliver(a: &DeliverArgs) -> Result<(), Failure> {
    let data = &a.data.data;
    let temp = |why: String| Failure(EX_TEMPFAIL, why);
    // A data directory has its postlog.toml (the store may be elsewhere: [storage]).
    if !data.join("postlog.toml").exists() && !data.join("postlog.db").exists() {
        return Err(temp(format!(
            "{} is not a Postlog data directory (or is not readable by this user)",
            data.display()
        )));
    }
    let config = ServerConfig::load_or_init(data).map_err(|e| temp(e.to_string()))?;
    let max = config.max_message_size;
    let mut message = Vec::new();
    std::io::stdin()
        .lock()
        .take(max + 1 + 4096)
        .read_to_end(&mut message)
        .map_err(|e| temp(format!("reading the message from stdin: {e}")))?;
    let message = normalise(&message);
    if let Some(why) = postlog_client::import::garbage_reason(&message, max) {
        return Err(Failure(EX_DATAERR, format!("message refused: {why}")));
    }
    let started = Instant::now();
    let busy_wait = busy_wait();
    loop {
        match Storage::open(data, &config) {
            Ok(store) => return store_directly(&store, &config, a, &message),
            Err(StoreError::Locked(_)) => {}
            Err(e) => return Err(temp(format!("opening {}: {e}", data.display()))),
        }
        // The server (or another deliver) holds the directory: go through LMTP.
        let target = a
            .lmtp
            .clone()
            .or_else(|| {
                config
                    .lmtp
                    .unix
                    .as_ref()
                    .map(|p| data.join(p).display().to_string())
            })
            .or_else(|| config.lmtp.listen.map(|l| l.to_string()));
        if let Some(target) = &target {
            match lmtp_connect(target) {
                Ok(conn) => return lmtp_deliver(conn, a, &message),
                Err(e) if started.elapsed() >= busy_wait => {
                    return Err(temp(format!(
                        "{} is locked by a running server, and its LMTP listener {target} \
                         does not answer: {e}",
                        data.display()
                    )));
                }
                Err(_) => {}
            }
        } else if started.elapsed() >= busy_wait {
            return Err(temp(format!(
                "{} is in use by a running server without an LMTP listener: set [lmtp] in \
                 postlog.toml (or pass --lmtp) so that deliver can hand it the message",
                data.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes a leading mbox `From ` line (procmail passes one) and turns bare LF line ends
/// into CRLF, so a message is stored with the same bytes whichever way it arrives.
fn normalise(input: &[u8]) -> Vec<u8> {
    let mut body = input;
    if body.starts_with(b"From ") {
        body = match body.iter().position(|&b| b == b'\n') {
            Some(i) => &body[i + 1..],
            None => &[],
        };
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / 32);
    let mut prev = 0u8;
    for &b in body {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

fn store_directly(
    store: &Storage,
    config: &ServerConfig,
    a: &DeliverArgs,
    message: &[u8],
) -> Result<(), Failure> {
    let temp = |e: StoreError| Failure(EX_TEMPFAIL, e.to_string());
    let account = match store.backend().account_by_name(&a.account) {
        Ok(Some(id)) => id,
        Ok(None) => {
            return Err(Failure(
                EX_NOUSER,
                format!("no account named {}", a.account),
            ));
        }
        Err(e) => return Err(temp(e)),
    };
    let id = format!("{:016x}", rand::random::<u64>());
    let trace = postlog_smtp::received::Trace {
        helo: None,
        peer: "localhost",
        by: config.mail_hostname(),
        with: "local",
        id: &id,
        recipient: None,
    };
    let mut head = postlog_smtp::received::return_path(a.from.as_deref().unwrap_or(""));
    head.push_str(&postlog_smtp::received::received(&trace, unix_now()));
    let mut writer = store
        .backend()
        .blob_writer(config.max_message_size + TRACE_ROOM)
        .map_err(temp)?;
    writer.write(head.as_bytes()).map_err(temp)?;
    writer.write(message).map_err(temp)?;
    let blob = writer.finish().map_err(temp)?;
    let tags = config.delivery.initial_tags.clone();
    store
        .backend()
        .append_blocking(account, NewRecord::Store { blob, tags })
        .map_err(temp)?;
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A socket path (contains `/`) or a TCP address.
fn lmtp_connect(target: &str) -> std::io::Result<Box<dyn Stream>> {
    if target.contains('/') {
        let s = std::os::unix::net::UnixStream::connect(PathBuf::from(target))?;
        s.set_read_timeout(Some(LMTP_IO_TIMEOUT))?;
        s.set_write_timeout(Some(LMTP_IO_TIMEOUT))?;
        Ok(Box::new(s))
    } else {
        let addr: std::net::SocketAddr = target.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{target:?} is neither ADDR:PORT nor a socket path"),
            )
        })?;
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(LMTP_IO_TIMEOUT))?;
        s.set_write_timeout(Some(LMTP_IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(Box::new(s))
    }
}

/// One LMTP transaction for one recipient: the account name (the server's LMTP listener
/// accepts account names as well as addresses).
fn lmtp_deliver(conn: Box<dyn Stream>, a: &DeliverArgs, message: &[u8]) -> Result<(), Failure> {
    let mut lmtp = Lmtp {
        r: BufReader::new(conn),
    };
    let io = |e: std::io::Error| Failure(EX_TEMPFAIL, format!("LMTP: {e}"));
    lmtp.expect(&[220], "greeting").map_err(|f| f.or(io))?;
    lmtp.command("LHLO localhost").map_err(io)?;
    lmtp.expect(&[250], "LHLO").map_err(|f| f.or(io))?;
    let from = a.from.as_deref().unwrap_or("");
    let from = if from.contains(['<', '>', '\r', '\n', ' ']) {
        ""
    } else {
        from
    };
    lmtp.command(&format!("MAIL FROM:<{from}>")).map_err(io)?;
    lmtp.expect(&[250], "MAIL").map_err(|f| f.or(io))?;
    lmtp.command(&format!("RCPT TO:<{}>", a.account))
        .map_err(io)?;
    lmtp.expect(&[250], "RCPT").map_err(|f| f.or(io))?;
    lmtp.command("DATA").map_err(io)?;
    lmtp.expect(&[354], "DATA").map_err(|f| f.or(io))?;
    let w = lmtp.r.get_mut();
    let mut stuffed = Vec::with_capacity(message.len() + 64);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            stuffed.push(b'.');
        }
        stuffed.push(b);
        line_start = b == b'\n';
    }
    if !line_start {
        stuffed.extend_from_slice(b"\r\n");
    }
    stuffed.extend_from_slice(b".\r\n");
    w.write_all(&stuffed).map_err(io)?;
    w.flush().map_err(io)?;
    lmtp.expect(&[250], "end of DATA").map_err(|f| f.or(io))?;
    let _ = lmtp.command("QUIT");
    Ok(())
}

struct Lmtp {
    r: BufReader<Box<dyn Stream>>,
}

/// A failed LMTP step: the server's reply, or an I/O error still to be mapped.
enum StepError {
    Reply(Failure),
    Io(std::io::Error),
}

impl StepError {
    fn or(self, io: impl Fn(std::io::Error) -> Failure) -> Failure {
        match self {
            StepError::Reply(f) => f,
            StepError::Io(e) => io(e),
        }
    }
}

impl Lmtp {
    fn command(&mut self, line: &str) -> std::io::Result<()> {
        let w = self.r.get_mut();
        w.write_all(format!("{line}\r\n").as_bytes())?;
        w.flush()
    }

    /// Reads one (possibly multi-line) reply and checks its code.
    fn expect(&mut self, ok: &[u16], step: &str) -> Result<(), StepError> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).map_err(StepError::Io)?;
            if n == 0 {
                return Err(StepError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed during {step}"),
                )));
            }
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        let code: u16 = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        if ok.contains(&code) {
            return Ok(());
        }
        let reply = text.trim_end().replace("\r\n", " / ");
        let exit = match code {
            550 | 551 | 553 => EX_NOUSER,
            500..=599 => EX_DATAERR,
            _ => EX_TEMPFAIL,
        };
        Err(StepError::Reply(Failure(
            exit,
            format!("the server refused the message at {step}: {reply}"),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_strips_the_postmark_and_makes_crlf() {
        assert_eq!(
            normalise(b"From x@y Mon Jan  1 00:00:00 2026\nA: b\n\nbody\r\nmore\n"),
            b"A: b\r\n\r\nbody\r\nmore\r\n"
        );
        assert_eq!(normalise(b"A: b"), b"A: b");
    }
}
