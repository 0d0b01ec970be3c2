//! One command line (without its CRLF) into a typed [`Command`], or the reply that rejects it.

use crate::limits::MAX_ADDRESS_LEN;

/// A parsed command. Addresses are the bare paths: no angle brackets, no source route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Helo(String),
    Ehlo(String),
    Lhlo(String),
    Mail { from: String, size: Option<u64> },
    Rcpt { to: String },
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
}

/// A rejected command line: the reply code, enhanced status code and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    pub code: u16,
    pub status: &'static str,
    pub text: String,
}

fn reject(code: u16, status: &'static str, text: impl Into<String>) -> Reject {
    Reject {
        code,
        status,
        text: text.into(),
    }
}

pub(crate) fn parse(line: &[u8]) -> Result<Command, Reject> {
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(reject(500, "5.5.2", "Invalid character in command"));
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(reject(500, "5.5.2", "Command is not valid UTF-8"));
    };
    let (verb, args) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], line[i..].trim_matches([' ', '\t'])),
        None => (line, ""),
    };
    let no_args = |c: Command| {
        if args.is_empty() {
            Ok(c)
        } else {
            Err(reject(501, "5.5.4", "Syntax error: no parameters allowed"))
        }
    };
    let hello = |c: fn(String) -> Command| match args.split([' ', '\t']).next() {
        Some(h) if !h.is_empty() => Ok(c(h.to_owned())),
        _ => Err(reject(
            501,
            "5.5.4",
            "Syntax error: a host name is required",
        )),
    };
    match verb.to_ascii_uppercase().as_str() {
        "HELO" => hello(Command::Helo),
        "EHLO" => hello(Command::Ehlo),
        "LHLO" => hello(Command::Lhlo),
        "MAIL" => {
            let rest = strip_prefix_ci(args, "FROM:")
                .ok_or_else(|| reject(501, "5.5.4", "Syntax: MAIL FROM:<address>"))?;
            let (from, params) = parse_path(rest.trim_start(), true)?;
            let size = mail_params(params)?;
            Ok(Command::Mail { from, size })
        }
        "RCPT" => {
            let rest = strip_prefix_ci(args, "TO:")
                .ok_or_else(|| reject(501, "5.5.4", "Syntax: RCPT TO:<address>"))?;
            let (to, params) = parse_path(rest.trim_start(), false)?;
            if let Some(p) = params.split_whitespace().next() {
                return Err(reject(
                    555,
                    "5.5.4",
                    format!("Unsupported RCPT parameter {p}"),
                ));
            }
            Ok(Command::Rcpt { to })
        }
        "DATA" => no_args(Command::Data),
        "BDAT" => Ok(Command::Bdat),
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls),
        _ => Err(reject(500, "5.5.1", "Command unrecognized")),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `<path>` and what follows it. Quoted local parts may hold `>` and spaces. A source route
/// (`<@a,@b:user@c>`, RFC 5321 §4.1.2, obsolete) is dropped.
fn parse_path(s: &str, allow_null: bool) -> Result<(String, &str), Reject> {
    let bad = |why: &str| reject(501, "5.1.3", format!("Bad address syntax: {why}"));
    let inner = s
        .strip_prefix('<')
        .ok_or_else(|| bad("the address must be enclosed in <>"))?;
    let mut quoted = false;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in inner.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => {
                end = Some(i);
                break;
            }
            ' ' | '\t' | '<' if !quoted => return Err(bad("unexpected character")),
            _ => {}
        }
    }
    let end = end.ok_or_else(|| bad("missing >"))?;
    let mut path = &inner[..end];
    let rest = &inner[end + 1..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(bad("text after >"));
    }
    if path.starts_with('@') {
        path = match path.find(':') {
            Some(i) => &path[i + 1..],
            None => return Err(bad("source route without ':'")),
        };
    }
    if path.len() > MAX_ADDRESS_LEN {
        return Err(reject(
            501,
            "5.1.3",
            format!("Address longer than {MAX_ADDRESS_LEN} bytes"),
        ));
    }
    if path.is_empty() && !allow_null {
        return Err(bad("empty address"));
    }
    if !path.is_empty() && (path.starts_with('@') || path.ends_with('@')) {
        return Err(bad("empty local part or domain"));
    }
    Ok((path.to_owned(), rest))
}

/// MAIL parameters: SIZE (RFC 1870), BODY (RFC 6152: 7BIT or 8BITMIME) and SMTPUTF8
/// (RFC 6531). Anything else was not advertised.
fn mail_params(params: &str) -> Result<Option<u64>, Reject> {
    let mut size = None;
    for p in params.split_whitespace() {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) if !v.is_empty() && v.len() <= 20 => {
                size = Some(
                    v.parse::<u64>()
                        .map_err(|_| reject(501, "5.5.4", format!("Bad SIZE parameter {v:?}")))?,
                );
            }
            ("BODY", Some(v))
                if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
            ("SMTPUTF8", None) => {}
            _ => {
                return Err(reject(
                    555,
                    "5.5.4",
                    format!("Unsupported MAIL parameter {p}"),
                ));
            }
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        parse(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e:?}"))
    }

    fn code(line: &[u8]) -> u16 {
        parse(line)
            .map(|c| panic!("{line:?} parsed as {c:?}"))
            .unwrap_err()
            .code
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            ok("ehlo client.example"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(ok("LHLO x y"), Command::Lhlo("x".into()));
        assert_eq!(
            ok("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8"),
            Command::Mail {
                from: "a@b.example".into(),
                size: Some(1000)
            }
        );
        assert_eq!(
            ok("mail from: <>"),
            Command::Mail {
                from: String::new(),
                size: None
            }
        );
        assert_eq!(
            ok("RCPT TO:<@relay.example:Ann@Example.org>"),
            Command::Rcpt {
                to: "Ann@Example.org".into()
            }
        );
        assert_eq!(
            ok("RCPT TO:<\"odd > name\"@example.org>"),
            Command::Rcpt {
                to: "\"odd > name\"@example.org".into()
            }
        );
        assert_eq!(
            ok("RCPT TO:<postmaster>"),
            Command::Rcpt {
                to: "postmaster".into()
            }
        );
        assert_eq!(ok("data"), Command::Data);
        assert_eq!(ok("StartTLS"), Command::StartTls);
        assert_eq!(ok("NOOP anything"), Command::Noop);
    }

    #[test]
    fn bad_commands_are_rejected_with_the_right_code() {
        assert_eq!(code(b"FOO"), 500);
        assert_eq!(code(b"EHLO"), 501);
        assert_eq!(code(b"MAIL TO:<a@b>"), 501);
        assert_eq!(code(b"MAIL FROM:a@b"), 501);
        assert_eq!(code(b"MAIL FROM:<a@b"), 501);
        assert_eq!(code(b"MAIL FROM:<a@b>x"), 501);
        assert_eq!(code(b"MAIL FROM:<a@b> AUTH=<>"), 555);
        assert_eq!(code(b"MAIL FROM:<a@b> SIZE=x"), 501);
        assert_eq!(code(b"MAIL FROM:<a@b> BODY=BINARYMIME"), 555);
        assert_eq!(code(b"RCPT TO:<>"), 501);
        assert_eq!(code(b"RCPT TO:<a@b> NOTIFY=NEVER"), 555);
        assert_eq!(code(b"RCPT TO:<a b@c>"), 501);
        assert_eq!(code(b"DATA now"), 501);
        assert_eq!(code(b"NOOP \x00"), 500);
        assert_eq!(code(b"NOOP \xff"), 500);
    }

    #[test]
    fn address_length_limit_is_crossed() {
        let local = "a".repeat(MAX_ADDRESS_LEN - 2);
        assert!(parse(format!("RCPT TO:<{local}@b>").as_bytes()).is_ok());
        assert_eq!(code(format!("RCPT TO:<{local}@bc>").as_bytes()), 501);
    }
}
