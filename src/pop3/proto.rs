//! POP3 wire format (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 AUTH), pure.

/// Longest command line we accept, CRLF included. RFC 2449 §4 caps commands at 255 octets;
/// RFC 5034 lets an AUTH initial response be longer, so AUTH lines get more room.
pub const MAX_LINE: usize = 255 + 2;
pub const MAX_AUTH_LINE: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    /// The password is the rest of the line: it may contain spaces (RFC 1939 §7).
    Pass(String),
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Quit,
    Top(u32, u32),
    Uidl(Option<u32>),
    Capa,
    Stls,
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    Apop,
}

fn number(s: &str) -> Result<u32, String> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Invalid number: {s}"));
    }
    s.parse().map_err(|_| format!("Invalid number: {s}"))
}

/// Parses one command line (CRLF removed). Keywords are case-insensitive (RFC 1939 §3).
pub fn parse(line: &[u8]) -> Result<Command, String> {
    let line = std::str::from_utf8(line).map_err(|_| "Command is not valid UTF-8".to_string())?;
    if line.bytes().any(|b| b < 0x20 && b != b'\t') {
        return Err("Control characters in command".into());
    }
    let (kw, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let args: Vec<&str> = rest.split(' ').filter(|a| !a.is_empty()).collect();
    let none = |c: Command| {
        if args.is_empty() {
            Ok(c)
        } else {
            Err("Too many arguments".to_string())
        }
    };
    let opt_num = |c: fn(Option<u32>) -> Command| match args.as_slice() {
        [] => Ok(c(None)),
        [n] => Ok(c(Some(number(n)?))),
        _ => Err("Too many arguments".to_string()),
    };
    let one_num = |c: fn(u32) -> Command| match args.as_slice() {
        [n] => Ok(c(number(n)?)),
        _ => Err("Expected one message number".to_string()),
    };
    match kw.to_ascii_uppercase().as_str() {
        "USER" => match args.as_slice() {
            [u] => Ok(Command::User((*u).to_string())),
            _ => Err("Syntax: USER name".into()),
        },
        "PASS" if !rest.is_empty() => Ok(Command::Pass(rest.to_string())),
        "PASS" => Err("Syntax: PASS password".into()),
        "STAT" => none(Command::Stat),
        "LIST" => opt_num(Command::List),
        "RETR" => one_num(Command::Retr),
        "DELE" => one_num(Command::Dele),
        "NOOP" => none(Command::Noop),
        "RSET" => none(Command::Rset),
        "QUIT" => none(Command::Quit),
        "TOP" => match args.as_slice() {
            [n, m] => Ok(Command::Top(number(n)?, number(m)?)),
            _ => Err("Syntax: TOP msg n".into()),
        },
        "UIDL" => opt_num(Command::Uidl),
        "CAPA" => none(Command::Capa),
        "STLS" => none(Command::Stls),
        "AUTH" => match args.as_slice() {
            [] => Ok(Command::Auth {
                mechanism: None,
                initial: None,
            }),
            [m] => Ok(Command::Auth {
                mechanism: Some(m.to_ascii_uppercase()),
                initial: None,
            }),
            [m, i] => Ok(Command::Auth {
                mechanism: Some(m.to_ascii_uppercase()),
                initial: Some((*i).to_string()),
            }),
            _ => Err("Syntax: AUTH mechanism [initial-response]".into()),
        },
        "APOP" => Ok(Command::Apop),
        _ => Err("Unknown command".into()),
    }
}

/// Appends `msg` to `out` as a multi-line response body: every line starting with '.' gets
/// another '.' (RFC 1939 §3), a final line without CRLF gets one, then the terminating ".".
/// `max_body_lines` limits the lines after the header/body separator (TOP).
pub fn write_stuffed(out: &mut Vec<u8>, msg: &[u8], max_body_lines: Option<u32>) {
    let mut in_body = false;
    let mut body_lines = 0u32;
    let mut rest = msg;
    while !rest.is_empty() {
        if in_body && max_body_lines.is_some_and(|m| body_lines >= m) {
            break;
        }
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1);
        let line = &rest[..end];
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        if in_body {
            body_lines += 1;
        } else if line == b"\r\n" || line == b"\n" {
            in_body = true;
        }
        rest = &rest[end..];
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(
            parse(b"user alice@x").unwrap(),
            Command::User("alice@x".into())
        );
        assert_eq!(
            parse(b"PASS secret with spaces").unwrap(),
            Command::Pass("secret with spaces".into())
        );
        assert_eq!(parse(b"LIST").unwrap(), Command::List(None));
        assert_eq!(parse(b"list 3").unwrap(), Command::List(Some(3)));
        assert_eq!(parse(b"TOP 1 10").unwrap(), Command::Top(1, 10));
        assert_eq!(parse(b"uidl").unwrap(), Command::Uidl(None));
        assert_eq!(
            parse(b"AUTH PLAIN AGEAYg==").unwrap(),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some("AGEAYg==".into())
            }
        );
        assert!(parse(b"RETR").is_err());
        assert!(parse(b"RETR x").is_err());
        assert!(parse(b"RETR -1").is_err());
        assert!(parse(b"RETR 99999999999").is_err());
        assert!(parse(b"STAT now").is_err());
        assert!(parse(b"FOO").is_err());
        assert!(parse(b"PASS").is_err());
        assert!(parse(b"NOOP\x00").is_err());
    }

    #[test]
    fn stuffing_and_top() {
        let msg = b"Subject: x\r\n.hidden: no\r\n\r\n.line one\r\ntwo\r\n..three\r\nlast";
        let mut out = Vec::new();
        write_stuffed(&mut out, msg, None);
        assert_eq!(
            out,
            b"Subject: x\r\n..hidden: no\r\n\r\n..line one\r\ntwo\r\n...three\r\nlast\r\n.\r\n"
        );
        let mut top = Vec::new();
        write_stuffed(&mut top, msg, Some(1));
        assert_eq!(
            top,
            b"Subject: x\r\n..hidden: no\r\n\r\n..line one\r\n.\r\n"
        );
        let mut top0 = Vec::new();
        write_stuffed(&mut top0, msg, Some(0));
        assert_eq!(top0, b"Subject: x\r\n..hidden: no\r\n\r\n.\r\n");
    }
}
