//! SMTP wire format, pure: command lines in, [`Command`]s or [`ParseError`]s out; [`Reply`]s
//! formatted to bytes; and [`DataReader`], the DATA-stream decoder.
//!
//! Why our own parser instead of Stalwart's `smtp-proto`: we need the exact behaviours of the RFC
//! checklist under our control (the SMTP-smuggling rules for bare CR/LF, source-route stripping,
//! SMTPUTF8 detection per address, strict parameter validation with the RFC's reply codes), and
//! the parser is small. Every rule here is unit-tested below.

use std::fmt::Write as _;

/// Longest command line we accept, CRLF included. RFC 5321 §4.5.3.1.4 sets 512 as the floor and
/// lets extensions (SIZE, DSN's ORCPT/ENVID, AUTH=) raise it; 1000 matches the text-line limit.
pub const MAX_COMMAND_LINE: usize = 1000;
/// RFC 5321 §4.5.3.1.6: text line limit including CRLF.
pub const MAX_TEXT_LINE: usize = 1000;
/// RFC 5321 §4.5.3.1.1-3.
pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
pub const MAX_PATH: usize = 256;

/// An SMTP reply: a code and one or more text lines (each already carrying its enhanced status
/// code, RFC 2034, where one applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code (RFC 3463).
    pub fn new(code: u16, esc: &str, text: impl AsRef<str>) -> Reply {
        Reply {
            code,
            lines: vec![format!("{esc} {}", text.as_ref())],
        }
    }

    /// A reply without an enhanced code (the greeting and EHLO, RFC 2034 §3).
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len();
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let mut s = String::with_capacity(l.len() + 6);
            let _ = write!(s, "{}{}{}\r\n", self.code, sep, l);
            out.extend_from_slice(s.as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }
}

/// A parse failure, carrying the reply the RFCs call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub Reply);

impl ParseError {
    fn syntax(text: &str) -> ParseError {
        ParseError(Reply::new(501, "5.5.4", text))
    }
    fn param(text: &str) -> ParseError {
        ParseError(Reply::new(555, "5.5.4", text))
    }
    fn address(text: &str) -> ParseError {
        ParseError(Reply::new(553, "5.1.3", text))
    }
}

/// A mailbox address as given in a path, with what the session needs to judge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `local@domain` exactly as sent (source route removed, brackets removed).
    pub full: String,
    pub local: String,
    pub domain: String,
    /// Contains non-ASCII: needs SMTPUTF8 (RFC 6531 §3.4).
    pub utf8: bool,
}

impl Address {
    /// The domain lower-cased (ASCII only: U-labels are compared as sent).
    pub fn domain_lc(&self) -> String {
        self.domain.to_ascii_lowercase()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// The header section of an RFC 5322 message, up to and including the empty line that ends it
/// (the whole message when there is no body).
pub fn header_section(msg: &[u8]) -> &[u8] {
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &msg[..p + 4],
        None => msg,
    }
}

impl Body {
    /// The RFC 6152 keyword, as sent on MAIL FROM.
    pub fn keyword(self) -> &'static str {
        match self {
            Body::SevenBit => "7BIT",
            Body::EightBitMime => "8BITMIME",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// RFC 4954 §5 AUTH= (the submitter the client claims); kept for the logs only.
    pub auth: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// RFC 3461 §4.1: `NEVER`, or a subset of `SUCCESS`, `FAILURE`, `DELAY`.
    pub notify: Vec<String>,
    /// RFC 3461 §4.2: `addr-type;xtext`.
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `None` is the null reverse path `<>`.
    Mail(Option<Address>, MailParams),
    Rcpt(Address, RcptParams),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

fn split_verb(line: &str) -> (&str, &str) {
    match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    }
}

/// Parses one command line (CRLF already removed).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(ParseError(Reply::new(
            500,
            "5.5.2",
            "Command line is not valid UTF-8",
        )));
    };
    if line.bytes().any(|b| b < 0x20 && b != b'\t') {
        return Err(ParseError(Reply::new(
            500,
            "5.5.2",
            "Control characters in command line",
        )));
    }
    let (verb, rest) = split_verb(line);
    let rest_t = rest.trim();
    let no_arg = |cmd: Command| {
        if rest_t.is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::syntax("Syntax error: no parameters allowed"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" | "HELO" => {
            let domain = rest_t;
            if domain.is_empty() || domain.contains(char::is_whitespace) {
                return Err(ParseError::syntax("Syntax: EHLO domain-or-address-literal"));
            }
            Ok(if verb.eq_ignore_ascii_case("EHLO") {
                Command::Ehlo(domain.to_string())
            } else {
                Command::Helo(domain.to_string())
            })
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_arg(Command::Data),
        "BDAT" => parse_bdat(rest_t),
        "RSET" => no_arg(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_arg(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_arg(Command::StartTls),
        "AUTH" => {
            let mut it = rest_t.split(' ').filter(|s| !s.is_empty());
            let Some(mech) = it.next() else {
                return Err(ParseError::syntax(
                    "Syntax: AUTH mechanism [initial-response]",
                ));
            };
            let initial = it.next().map(str::to_string);
            if it.next().is_some() {
                return Err(ParseError::syntax(
                    "Syntax: AUTH mechanism [initial-response]",
                ));
            }
            Ok(Command::Auth {
                mechanism: mech.to_ascii_uppercase(),
                initial,
            })
        }
        _ => Err(ParseError(Reply::new(
            500,
            "5.5.2",
            "Syntax error, command unrecognized",
        ))),
    }
}

/// Splits `FROM:<path> params` after the verb; tolerates a space after the colon as most
/// servers do (RFC 5321 has none, some clients send one).
fn split_path<'a>(rest: &'a str, keyword: &str) -> Result<(&'a str, &'a str), ParseError> {
    let kl = keyword.len();
    if rest.len() < kl || !rest[..kl].eq_ignore_ascii_case(keyword) {
        return Err(ParseError::syntax(&format!("Syntax: {keyword}<address>")));
    }
    let after = rest[kl..].trim_start_matches(' ');
    if let Some(inner) = after.strip_prefix('<') {
        // The path ends at the first '>' outside a quoted local part.
        let mut in_quote = false;
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if in_quote => escaped = true,
                '"' => in_quote = !in_quote,
                '>' if !in_quote => {
                    let params = &inner[i + 1..];
                    if !params.is_empty() && !params.starts_with(' ') {
                        return Err(ParseError::syntax("Syntax error after address"));
                    }
                    return Ok((&inner[..i], params.trim()));
                }
                _ => {}
            }
        }
        Err(ParseError::syntax("Syntax error: missing '>'"))
    } else {
        // No brackets: accepted for compatibility (Postfix does too); the path ends at a space.
        let (p, params) = split_verb(after);
        if p.is_empty() {
            return Err(ParseError::syntax(&format!("Syntax: {keyword}<address>")));
        }
        Ok((p, params.trim()))
    }
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn valid_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn valid_quoted_string(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(c) if (' '..='~').contains(&c) => {}
                _ => return false,
            },
            '"' => return false,
            c if c == ' ' || c == '!' || ('#'..='[').contains(&c) || (']'..='~').contains(&c) => {}
            c if !c.is_ascii() => {}
            _ => return false,
        }
    }
    true
}

/// RFC 5321 §4.1.2 Domain or address-literal; U-labels are allowed (judged by SMTPUTF8 later).
pub fn valid_domain(d: &str) -> bool {
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return false;
    }
    if let Some(lit) = d.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        if let Some(v6) = lit
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
            .map(|_| &lit[5..])
        {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return lit.parse::<std::net::Ipv4Addr>().is_ok();
    }
    d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    })
}

/// Parses the inside of `<...>`: optional source route (ignored, RFC 5321 §4.1.2 and
/// §3.6.1: never relayed along), then `local@domain`.
pub fn parse_address(path: &str) -> Result<Address, ParseError> {
    if path.len() > MAX_PATH {
        return Err(ParseError(Reply::new(501, "5.1.3", "Path too long")));
    }
    let mailbox = if path.starts_with('@') {
        match path.find(':') {
            Some(i) => {
                let route = &path[..i];
                if !route
                    .split(',')
                    .all(|hop| hop.strip_prefix('@').is_some_and(valid_domain))
                {
                    return Err(ParseError::address("Bad source route"));
                }
                &path[i + 1..]
            }
            None => return Err(ParseError::address("Bad source route")),
        }
    } else {
        path
    };
    let Some(at) = mailbox.rfind('@') else {
        return Err(ParseError::address(
            "Address must be fully qualified: local-part@domain",
        ));
    };
    let (local, domain) = (&mailbox[..at], &mailbox[at + 1..]);
    if local.is_empty() || local.len() > MAX_LOCAL_PART {
        return Err(ParseError::address("Bad local part length"));
    }
    if !(valid_dot_string(local) || valid_quoted_string(local)) {
        return Err(ParseError::address("Bad local part syntax"));
    }
    if !valid_domain(domain) {
        return Err(ParseError::address("Bad domain syntax"));
    }
    Ok(Address {
        full: mailbox.to_string(),
        local: local.to_string(),
        domain: domain.to_string(),
        utf8: !mailbox.is_ascii(),
    })
}

/// RFC 3461 §4 xtext: printable ASCII except `+` and `=`, with `+XX` hex escapes.
pub fn valid_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if i + 2 >= b.len() {
                    return false;
                }
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if !(hex(b[i + 1]) && hex(b[i + 2])) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

fn params(s: &str) -> impl Iterator<Item = (String, Option<&str>)> {
    s.split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| match p.find('=') {
            Some(i) => (p[..i].to_ascii_uppercase(), Some(&p[i + 1..])),
            None => (p.to_ascii_uppercase(), None),
        })
}

fn parse_mail(rest: &str) -> Result<Command, ParseError> {
    let (path, ps) = split_path(rest, "FROM:")?;
    let addr = if path.is_empty() {
        None
    } else {
        Some(parse_address(path)?)
    };
    let mut mp = MailParams::default();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in params(ps) {
        if !seen.insert(k.clone()) {
            return Err(ParseError::syntax("Duplicate MAIL parameter"));
        }
        match (k.as_str(), v) {
            ("SIZE", Some(v))
                if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) =>
            {
                mp.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => mp.body = Some(Body::SevenBit),
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                mp.body = Some(Body::EightBitMime)
            }
            ("SMTPUTF8", None) => mp.smtputf8 = true,
            ("RET", Some(v)) if v.eq_ignore_ascii_case("FULL") => mp.ret = Some(Ret::Full),
            ("RET", Some(v)) if v.eq_ignore_ascii_case("HDRS") => mp.ret = Some(Ret::Hdrs),
            ("ENVID", Some(v)) if !v.is_empty() && v.len() <= 100 && valid_xtext(v) => {
                mp.envid = Some(v.to_string())
            }
            ("AUTH", Some(v)) if !v.is_empty() && (v == "<>" || valid_xtext(v)) => {
                mp.auth = Some(v.to_string())
            }
            ("SIZE" | "BODY" | "RET" | "ENVID" | "AUTH" | "SMTPUTF8", _) => {
                return Err(ParseError::param(&format!(
                    "Invalid value for MAIL parameter {k}"
                )));
            }
            _ => {
                return Err(ParseError::param(&format!(
                    "Unsupported MAIL parameter {k}"
                )));
            }
        }
    }
    Ok(Command::Mail(addr, mp))
}

fn parse_rcpt(rest: &str) -> Result<Command, ParseError> {
    let (path, ps) = split_path(rest, "TO:")?;
    if path.is_empty() {
        return Err(ParseError::address("Empty recipient address"));
    }
    // RFC 5321 §4.5.1: <Postmaster> without a domain must be accepted.
    let addr = if path.eq_ignore_ascii_case("postmaster") {
        Address {
            full: path.to_string(),
            local: path.to_string(),
            domain: String::new(),
            utf8: false,
        }
    } else {
        parse_address(path)?
    };
    let mut rp = RcptParams::default();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in params(ps) {
        if !seen.insert(k.clone()) {
            return Err(ParseError::syntax("Duplicate RCPT parameter"));
        }
        match (k.as_str(), v) {
            ("NOTIFY", Some(v)) => {
                let items: Vec<String> = v.split(',').map(|s| s.to_ascii_uppercase()).collect();
                let ok_items = items
                    .iter()
                    .all(|i| matches!(i.as_str(), "NEVER" | "SUCCESS" | "FAILURE" | "DELAY"));
                let never_alone = !items.iter().any(|i| i == "NEVER") || items.len() == 1;
                if !ok_items || !never_alone {
                    return Err(ParseError::param("Invalid NOTIFY value"));
                }
                rp.notify = items;
            }
            ("ORCPT", Some(v)) => {
                let valid = v.split_once(';').is_some_and(|(t, x)| {
                    !t.is_empty()
                        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !x.is_empty()
                        && (valid_xtext(x) || t.eq_ignore_ascii_case("utf-8"))
                });
                if !valid || v.len() > 500 {
                    return Err(ParseError::param("Invalid ORCPT value"));
                }
                rp.orcpt = Some(v.to_string());
            }
            _ => {
                return Err(ParseError::param(&format!(
                    "Unsupported RCPT parameter {k}"
                )));
            }
        }
    }
    Ok(Command::Rcpt(addr, rp))
}

fn parse_bdat(rest: &str) -> Result<Command, ParseError> {
    let mut it = rest.split(' ').filter(|s| !s.is_empty());
    let size = it
        .next()
        .filter(|s| s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ParseError::syntax("Syntax: BDAT chunk-size [LAST]"))?;
    let last = match it.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::syntax("Syntax: BDAT chunk-size [LAST]")),
    };
    if it.next().is_some() {
        return Err(ParseError::syntax("Syntax: BDAT chunk-size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

/// Why a DATA stream was refused after it was read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    TooBig,
    LineTooLong,
    /// A CR or LF not part of a CRLF pair: the raw material of SMTP smuggling.
    BareLineEnding,
}

impl DataError {
    pub fn reply(self) -> Reply {
        match self {
            DataError::TooBig => Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ),
            DataError::LineTooLong => Reply::new(
                500,
                "5.5.2",
                "Message contains a line longer than 1000 octets (RFC 5321 4.5.3.1.6)",
            ),
            DataError::BareLineEnding => Reply::new(
                550,
                "5.6.11",
                "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)",
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DState {
    /// At the start of a line.
    LineStart,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.` CR at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line.
    Cr,
}

/// Decodes the DATA stream (RFC 5321 §4.5.2): undoes dot-stuffing, finds the end `CRLF.CRLF`,
/// and flags what we refuse. Pure: bytes in, progress out. The body keeps every byte except
/// stuffing dots and the final `.CRLF`; it ends with the CRLF that precedes the final dot.
///
/// A bare CR or LF never ends the data and never starts a line, so `LF.LF` or `CR.CR` cannot end
/// a message early (SMTP smuggling, CVE-2023-51764); a message containing one is refused whole.
#[derive(Debug)]
pub struct DataReader {
    state: DState,
    line_len: usize,
    max_size: usize,
    body: Vec<u8>,
    consumed: u64,
    error: Option<DataError>,
}

/// What [`DataReader::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum DataProgress {
    /// All input consumed; more is needed.
    NeedMore,
    /// End of data found after consuming this many bytes of the input; the rest belongs to the
    /// next command.
    Done(usize),
}

impl DataReader {
    pub fn new(max_size: usize) -> DataReader {
        DataReader {
            state: DState::LineStart,
            line_len: 0,
            max_size,
            body: Vec::with_capacity(max_size.min(64 * 1024)),
            consumed: 0,
            error: None,
        }
    }

    /// Total bytes read from the wire so far (stuffing included).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    fn push(&mut self, b: u8) {
        if self.error == Some(DataError::TooBig) {
            return;
        }
        if self.body.len() >= self.max_size {
            self.error = Some(DataError::TooBig);
            self.body = Vec::new();
            return;
        }
        self.body.push(b);
    }

    fn flag(&mut self, e: DataError) {
        // TooBig wins: it is the one the client can act on by itself.
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    pub fn feed(&mut self, input: &[u8]) -> DataProgress {
        let mut i = 0;
        while i < input.len() {
            if self.state == DState::Mid {
                // Fast path: copy the run up to the next CR or LF in one go.
                let run = input[i..]
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(input.len() - i);
                if run > 0 {
                    self.push_run(&input[i..i + run]);
                    i += run;
                    continue;
                }
            }
            let b = input[i];
            i += 1;
            self.consumed += 1;
            self.line_len += 1;
            if self.line_len > MAX_TEXT_LINE {
                self.flag(DataError::LineTooLong);
            }
            match (self.state, b) {
                (DState::LineStart, b'.') => self.state = DState::Dot,
                (DState::Dot, b'\r') => self.state = DState::DotCr,
                (DState::DotCr, b'\n') => return DataProgress::Done(i),
                (DState::DotCr, other) => {
                    // ".\r" then not LF: bare CR. Keep the bytes (minus the stuffing dot).
                    self.flag(DataError::BareLineEnding);
                    self.push(b'\r');
                    self.state = DState::Mid;
                    self.mid(other);
                }
                (DState::Dot, other) => {
                    // Stuffed dot removed (RFC 5321 §4.5.2).
                    self.state = DState::Mid;
                    self.mid(other);
                }
                (DState::LineStart | DState::Mid, other) => self.mid(other),
                (DState::Cr, b'\n') => {
                    self.push(b'\n');
                    self.state = DState::LineStart;
                    self.line_len = 0;
                }
                (DState::Cr, other) => {
                    self.flag(DataError::BareLineEnding);
                    self.state = DState::Mid;
                    self.mid(other);
                }
            }
        }
        DataProgress::NeedMore
    }

    /// A run of bytes inside a line (no CR or LF).
    fn push_run(&mut self, run: &[u8]) {
        self.consumed += run.len() as u64;
        self.line_len += run.len();
        if self.line_len > MAX_TEXT_LINE {
            self.flag(DataError::LineTooLong);
        }
        if self.error == Some(DataError::TooBig) {
            return;
        }
        if self.body.len() + run.len() > self.max_size {
            self.error = Some(DataError::TooBig);
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(run);
    }

    fn mid(&mut self, b: u8) {
        self.push(b);
        match b {
            b'\r' => self.state = DState::Cr,
            b'\n' => {
                self.flag(DataError::BareLineEnding);
                self.state = DState::Mid;
            }
            _ => self.state = DState::Mid,
        }
    }

    /// The decoded body, or why it is refused.
    pub fn finish(self) -> Result<Vec<u8>, DataError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Result<Command, ParseError> {
        parse_command(s.as_bytes())
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            cmd("ehlo client.example").unwrap(),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(cmd("QuIt").unwrap(), Command::Quit);
        assert_eq!(cmd("noop anything").unwrap(), Command::Noop);
        assert_eq!(cmd("data").unwrap(), Command::Data);
    }

    #[test]
    fn unknown_and_malformed() {
        assert_eq!(cmd("FOO").unwrap_err().0.code, 500);
        assert_eq!(cmd("EHLO").unwrap_err().0.code, 501);
        assert_eq!(cmd("DATA x").unwrap_err().0.code, 501);
        assert_eq!(cmd("MAIL TO:<a@b>").unwrap_err().0.code, 501);
        assert_eq!(cmd("MAIL FROM:<a@b").unwrap_err().0.code, 501);
        assert_eq!(cmd("RCPT TO:<>").unwrap_err().0.code, 553);
        assert_eq!(parse_command(b"NOOP \x00").unwrap_err().0.code, 500);
        assert_eq!(parse_command(b"\xff\xfe").unwrap_err().0.code, 500);
    }

    #[test]
    fn mail_from_forms() {
        let Command::Mail(None, _) = cmd("MAIL FROM:<>").unwrap() else {
            panic!()
        };
        let Command::Mail(Some(a), p) =
            cmd("MAIL FROM: <a.b@Example.ORG> SIZE=1000 BODY=8BITMIME").unwrap()
        else {
            panic!()
        };
        assert_eq!(a.full, "a.b@Example.ORG");
        assert_eq!(a.domain_lc(), "example.org");
        assert_eq!(p.size, Some(1000));
        assert_eq!(p.body, Some(Body::EightBitMime));
        let Command::Mail(Some(a), _) = cmd("mail from:bare@example.org").unwrap() else {
            panic!()
        };
        assert_eq!(a.full, "bare@example.org");
        let Command::Mail(Some(a), _) = cmd(r#"MAIL FROM:<"john >doe"@example.org>"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.local, r#""john >doe""#);
    }

    #[test]
    fn source_route_is_dropped() {
        let Command::Rcpt(a, _) =
            cmd("RCPT TO:<@relay.example,@other.example:user@dest.example>").unwrap()
        else {
            panic!()
        };
        assert_eq!(a.full, "user@dest.example");
        assert_eq!(a.domain, "dest.example");
    }

    #[test]
    fn dsn_and_other_params() {
        let Command::Mail(_, p) =
            cmd("MAIL FROM:<a@b.c> RET=HDRS ENVID=QQ314159+2B SMTPUTF8 AUTH=<>").unwrap()
        else {
            panic!()
        };
        assert_eq!(p.ret, Some(Ret::Hdrs));
        assert_eq!(p.envid.as_deref(), Some("QQ314159+2B"));
        assert!(p.smtputf8);
        let Command::Rcpt(_, r) =
            cmd("RCPT TO:<x@y.z> NOTIFY=SUCCESS,failure ORCPT=rfc822;x+40y.z").unwrap()
        else {
            panic!()
        };
        assert_eq!(r.notify, vec!["SUCCESS", "FAILURE"]);
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;x+40y.z"));
        assert_eq!(
            cmd("RCPT TO:<x@y.z> NOTIFY=NEVER,DELAY")
                .unwrap_err()
                .0
                .code,
            555
        );
        assert_eq!(cmd("MAIL FROM:<a@b.c> FOO=bar").unwrap_err().0.code, 555);
        assert_eq!(
            cmd("MAIL FROM:<a@b.c> BODY=BINARYMIME").unwrap_err().0.code,
            555
        );
        assert_eq!(
            cmd("MAIL FROM:<a@b.c> SIZE=12 SIZE=13").unwrap_err().0.code,
            501
        );
        assert_eq!(cmd("MAIL FROM:<a@b.c> SIZE=abc").unwrap_err().0.code, 555);
        assert_eq!(cmd("MAIL FROM:<a@b.c> ENVID=a=b").unwrap_err().0.code, 555);
    }

    #[test]
    fn address_syntax_and_limits() {
        assert!(parse_address("user@[192.0.2.1]").is_ok());
        assert!(parse_address("user@[IPv6:2001:db8::1]").is_ok());
        assert!(parse_address("user@[300.1.1.1]").is_err());
        assert!(parse_address("us..er@example.org").is_err());
        assert!(parse_address("user@-bad.example").is_err());
        assert!(parse_address("noat").is_err());
        assert!(parse_address(&format!("{}@x.org", "a".repeat(65))).is_err());
        assert!(parse_address(&format!("a@{}.org", "b".repeat(64))).is_err());
        let a = parse_address("δοκιμή@παράδειγμα.δοκιμή").unwrap();
        assert!(a.utf8);
        assert!(!parse_address("plain@example.org").unwrap().utf8);
    }

    #[test]
    fn bdat_and_auth() {
        assert_eq!(
            cmd("BDAT 0 LAST").unwrap(),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(
            cmd("bdat 100").unwrap(),
            Command::Bdat {
                size: 100,
                last: false
            }
        );
        assert!(cmd("BDAT -1").is_err());
        assert!(cmd("BDAT 99999999999999999999999").is_err());
        assert_eq!(
            cmd("AUTH plain AGFsaWNlAHNlY3JldA==").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGFsaWNlAHNlY3JldA==".into())
            }
        );
    }

    #[test]
    fn reply_format() {
        let r = Reply {
            code: 250,
            lines: vec!["a".into(), "b".into()],
        };
        assert_eq!(r.to_bytes(), b"250-a\r\n250 b\r\n");
        assert_eq!(
            Reply::new(550, "5.1.1", "no").to_bytes(),
            b"550 5.1.1 no\r\n"
        );
    }

    fn decode_all(input: &[u8], max: usize) -> (Result<Vec<u8>, DataError>, usize) {
        let mut r = DataReader::new(max);
        match r.feed(input) {
            DataProgress::Done(n) => (r.finish(), n),
            DataProgress::NeedMore => panic!("no end found"),
        }
    }

    #[test]
    fn data_unstuffs_and_ends() {
        let (b, n) = decode_all(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", 1000);
        assert_eq!(b.unwrap(), b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(n, 24);
        let (b, _) = decode_all(b".\r\n", 1000);
        assert_eq!(b.unwrap(), b"");
    }

    #[test]
    fn data_byte_by_byte_is_the_same() {
        let input = b"a\r\n..b\r\n\xff\x80 8bit\r\n.\r\n";
        let mut r = DataReader::new(1000);
        let mut done = None;
        for (i, b) in input.iter().enumerate() {
            if let DataProgress::Done(_) = r.feed(std::slice::from_ref(b)) {
                done = Some(i);
                break;
            }
        }
        assert_eq!(done, Some(input.len() - 1));
        assert_eq!(r.finish().unwrap(), b"a\r\n.b\r\n\xff\x80 8bit\r\n");
    }

    /// Feeding in any split gives the same result as feeding at once (the I/O layer hands
    /// over whatever the socket returned), over many pseudo-random inputs rich in CR, LF, '.'.
    #[test]
    fn split_feeding_is_equivalent() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"ab.\r\n\r\n.x";
        for _ in 0..2000 {
            let len = (next() % 60) as usize;
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            input.extend_from_slice(b"\r\n.\r\ntail");
            let mut whole = DataReader::new(40);
            let w = whole.feed(&input);
            let mut parts = DataReader::new(40);
            let mut pos = 0;
            let mut p = DataProgress::NeedMore;
            while pos < input.len() {
                let n = 1 + (next() % 7) as usize;
                let end = (pos + n).min(input.len());
                p = parts.feed(&input[pos..end]);
                if let DataProgress::Done(k) = p {
                    p = DataProgress::Done(pos + k);
                    break;
                }
                pos = end;
            }
            assert_eq!(w, p, "{input:?}");
            assert_eq!(whole.finish(), parts.finish(), "{input:?}");
        }
    }

    #[test]
    fn smuggling_never_ends_data_early() {
        // LF.LF, CR.CR and CRLF.LF must not end the data; the real end is the later CRLF.CRLF.
        for smuggle in [&b"\n.\n"[..], b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"] {
            let mut input = b"Subject: one\r\n\r\nbody".to_vec();
            input.extend_from_slice(smuggle);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x.org>\r\nRCPT TO:<v@y.org>\r\nDATA\r\nhidden\r\n.\r\n",
            );
            let (b, n) = decode_all(&input, 10_000);
            assert_eq!(n, input.len(), "ended early on {smuggle:?}");
            assert_eq!(b, Err(DataError::BareLineEnding), "{smuggle:?}");
        }
    }

    #[test]
    fn data_limits() {
        let mut long = vec![b'a'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode_all(&long, 10_000).0, Err(DataError::LineTooLong));
        let mut ok = vec![b'a'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(decode_all(&ok, 10_000).0.is_ok());
        let (b, _) = decode_all(b"0123456789\r\n.\r\n", 5);
        assert_eq!(b, Err(DataError::TooBig));
    }
}
