//! Delivery status notifications (RFC 3464 report, RFC 3461 rules for when to send one),
//! built with mail-builder. A DSN is an ordinary message from the null sender `<>`, queued to
//! the original envelope sender and delivered like any other mail.

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;
use postrider_queue::{Envelope, Outcome, QueueId, Recipient, Ret};

/// RFC 3464 §2.3.3 action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }

    /// The RFC 3461 §4.1 NOTIFY keyword that asks for this kind of report.
    fn notify_keyword(self) -> &'static str {
        match self {
            Action::Failed => "FAILURE",
            Action::Delayed => "DELAY",
            Action::Delivered | Action::Relayed => "SUCCESS",
        }
    }

    /// What an outcome reports, if anything (`local`: final delivery here).
    pub fn of(o: &Outcome, local: bool) -> Option<Action> {
        match o {
            Outcome::Failed(_) => Some(Action::Failed),
            Outcome::Relayed => Some(Action::Relayed),
            Outcome::Delivered if local => Some(Action::Delivered),
            // Accepted by a next hop that supports DSN: it reports from now on.
            Outcome::Delivered => None,
            Outcome::Deferred(_) => None,
        }
    }
}

/// Whether the sender wants this report for this recipient (RFC 3461 §4.1): NEVER means
/// nothing; no NOTIFY means failures (and delay warnings, when enabled) only.
pub fn wanted(env: &Envelope, r: &Recipient, action: Action) -> bool {
    if env.sender.is_empty() {
        // Never a bounce to the null sender (RFC 5321 §4.5.5): that is how loops start.
        return false;
    }
    if r.notify.is_empty() {
        return matches!(action, Action::Failed | Action::Delayed);
    }
    r.notify
        .iter()
        .any(|n| n.eq_ignore_ascii_case(action.notify_keyword()))
}

/// One recipient line of a report.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub rcpt: &'a Recipient,
    pub action: Action,
    /// The outcome's text: `"5.1.1 host[ip]:25 said: 550 5.1.1 no (in reply to RCPT TO)"`.
    pub reason: Option<String>,
}

/// Splits an outcome text into (status, remote MTA, diagnostic): the forms our transports
/// write are `"X.Y.Z name[ip]:port said: <reply> (in reply to ...)"` and `"X.Y.Z text"`.
pub fn parse_reason(reason: &str, default_status: &str) -> (String, Option<String>, String) {
    let mut words = reason.splitn(2, ' ');
    let first = words.next().unwrap_or("");
    let valid = {
        let p: Vec<&str> = first.split('.').collect();
        p.len() == 3
            && matches!(p[0], "2" | "4" | "5")
            && p.iter()
                .all(|x| !x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit()))
    };
    let (status, rest) = if valid {
        (first.to_string(), words.next().unwrap_or("").to_string())
    } else {
        (default_status.to_string(), reason.to_string())
    };
    if let Some((who, said)) = rest.split_once(" said: ") {
        let host = who.split('[').next().unwrap_or(who).to_string();
        return (status, Some(host), format!("smtp; {said}"));
    }
    (status, None, format!("X-Postrider; {rest}"))
}

/// Decodes RFC 3461 §4 xtext (`+HH` escapes).
pub fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+'
            && i + 2 < b.len()
            && let Ok(hex) = std::str::from_utf8(&b[i + 1..i + 3])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One header field line, kept within RFC 5322's 998-octet limit and free of line breaks.
fn field(name: &str, value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut v = clean.as_str();
    let max = 900usize.saturating_sub(name.len());
    if v.len() > max {
        let mut cut = max;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v = &v[..cut];
    }
    format!("{name}: {v}\r\n")
}

fn rfc2822(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .with_timezone(&chrono::Local)
        .to_rfc2822()
}

/// Builds the report for `entries` (all of one action kind, or failed and relayed mixed).
pub fn build(
    reporting_mta: &str,
    id: QueueId,
    env: &Envelope,
    original: &[u8],
    entries: &[Entry<'_>],
    retry_until_ms: Option<u64>,
) -> std::io::Result<Vec<u8>> {
    let now = postrider_queue::now_ms();
    let any_failed = entries.iter().any(|e| e.action == Action::Failed);
    let any_delayed = entries.iter().any(|e| e.action == Action::Delayed);
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else if any_delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };

    let mut human = format!("This is the mail system at host {reporting_mta}.\r\n\r\n");
    if any_failed {
        human.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\r\n",
        );
    } else if any_delayed {
        human.push_str(
            "Your message could not be delivered yet. The mail system will keep\r\n\
             trying; you do not need to send it again.\r\n\r\n",
        );
    } else {
        human.push_str(
            "Your message was successfully delivered or relayed as listed below.\r\n\r\n",
        );
    }

    let mut status = String::new();
    status.push_str(&field("Reporting-MTA", &format!("dns; {reporting_mta}")));
    status.push_str(&field("X-Postrider-Queue-ID", &id.to_string()));
    if let Some(e) = &env.envid {
        status.push_str(&field("Original-Envelope-Id", e));
    }
    if !env.sender.is_empty() {
        status.push_str(&field(
            "X-Postrider-Sender",
            &format!("rfc822; {}", env.sender),
        ));
    }
    status.push_str(&field("Arrival-Date", &rfc2822(env.arrival_ms)));
    for e in entries {
        let default = match e.action {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
            _ => "2.0.0",
        };
        let (code, remote, diag) = match &e.reason {
            Some(r) => {
                let (c, m, d) = parse_reason(r, default);
                (c, m, Some(d))
            }
            None => (default.to_string(), None, None),
        };
        human.push_str(&format!(
            "<{}>: {}\r\n",
            e.rcpt.address,
            e.reason.as_deref().unwrap_or(e.action.as_str())
        ));
        status.push_str("\r\n");
        if let Some(o) = &e.rcpt.orcpt {
            let (kind, addr) = o.split_once(';').unwrap_or(("rfc822", o));
            status.push_str(&field(
                "Original-Recipient",
                &format!("{kind}; {}", xtext_decode(addr)),
            ));
        }
        let kind = if e.rcpt.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        status.push_str(&field(
            "Final-Recipient",
            &format!("{kind}; {}", e.rcpt.address),
        ));
        status.push_str(&field("Action", e.action.as_str()));
        status.push_str(&field("Status", &code));
        if let Some(m) = remote {
            status.push_str(&field("Remote-MTA", &format!("dns; {m}")));
        }
        if let Some(d) = diag {
            status.push_str(&field("Diagnostic-Code", &d));
        }
        status.push_str(&field("Last-Attempt-Date", &rfc2822(now)));
        if e.action == Action::Delayed
            && let Some(t) = retry_until_ms
        {
            status.push_str(&field("Will-Retry-Until", &rfc2822(t)));
        }
    }

    // RFC 3461 §4.3: the whole message only when asked for (and only for failures).
    let full = env.ret == Some(Ret::Full) && any_failed;
    let returned = if full {
        original
    } else {
        crate::smtp::proto::header_section(original)
    };
    let cte = if returned.is_ascii() { "7bit" } else { "8bit" };
    let returned_part = MimePart::new(
        ContentType::new(if full {
            "message/rfc822"
        } else {
            "text/rfc822-headers"
        }),
        returned.to_vec(),
    )
    .transfer_encoding(cte);
    let status_cte = if status.is_ascii() { "7bit" } else { "8bit" };
    let parts = vec![
        MimePart::new(
            ContentType::new("text/plain").attribute("charset", "utf-8"),
            human.into_bytes(),
        )
        .transfer_encoding("8bit"),
        MimePart::new(
            ContentType::new("message/delivery-status"),
            status.into_bytes(),
        )
        .transfer_encoding(status_cte),
        returned_part,
    ];
    let from = format!("MAILER-DAEMON@{reporting_mta}");
    MessageBuilder::new()
        .from(("Mail Delivery System".to_string(), from))
        .to(env.sender.clone())
        .subject(subject)
        .date(now as i64 / 1000)
        .message_id(format!("{id}.{now}@{reporting_mta}"))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
            parts,
        ))
        .write_to_vec()
}

#[derive(Debug, thiserror::Error)]
pub enum DsnError {
    #[error("cannot build the report: {0}")]
    Build(#[from] std::io::Error),
    #[error("cannot queue the report: {0}")]
    Queue(#[from] postrider_queue::Error),
    #[error("the queue stopped before the report was durable")]
    Stopped,
}

/// Builds a report and queues it to the original sender from `<>`; returns once it is
/// durable.
pub async fn enqueue(
    queue: &postrider_queue::Queue,
    reporting_mta: &str,
    id: QueueId,
    env: &Envelope,
    original: &[u8],
    entries: &[Entry<'_>],
    retry_until_ms: Option<u64>,
) -> Result<QueueId, DsnError> {
    let raw = build(reporting_mta, id, env, original, entries, retry_until_ms)?;
    let mut dsn_env = Envelope::new(
        "",
        vec![Recipient::new(env.sender.clone())],
        raw.len() as u64,
    );
    dsn_env.smtputf8 = !env.sender.is_ascii();
    dsn_env.info.insert("dsn_for".into(), id.to_string());
    let dsn_id = queue.new_id()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    queue.enqueue_with(
        dsn_id,
        &dsn_env,
        raw,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    rx.await
        .map_err(|_| DsnError::Stopped)?
        .map_err(postrider_queue::Error::from)?;
    for e in entries {
        crate::metrics::METRICS
            .dsn_sent
            .with_label_values(&[e.action.as_str()])
            .inc();
    }
    Ok(dsn_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_split_into_status_mta_and_diagnostic() {
        let (s, m, d) = parse_reason(
            "5.1.1 mx.example[127.0.0.2]:25 said: 550 5.1.1 no such user (in reply to RCPT TO)",
            "5.0.0",
        );
        assert_eq!(s, "5.1.1");
        assert_eq!(m.as_deref(), Some("mx.example"));
        assert_eq!(d, "smtp; 550 5.1.1 no such user (in reply to RCPT TO)");
        let (s, m, d) = parse_reason("5.1.10 x does not accept mail", "5.0.0");
        assert_eq!(
            (s.as_str(), m, d.as_str()),
            ("5.1.10", None, "X-Postrider; x does not accept mail")
        );
        let (s, _, _) = parse_reason("no code here", "4.0.0");
        assert_eq!(s, "4.0.0");
    }

    #[test]
    fn notify_rules() {
        let mut env = Envelope::new("a@x", vec![Recipient::new("b@y")], 1);
        let mut r = Recipient::new("b@y");
        assert!(wanted(&env, &r, Action::Failed));
        assert!(!wanted(&env, &r, Action::Delivered));
        r.notify = vec!["NEVER".into()];
        assert!(!wanted(&env, &r, Action::Failed));
        r.notify = vec!["SUCCESS".into()];
        assert!(wanted(&env, &r, Action::Relayed));
        assert!(!wanted(&env, &r, Action::Failed));
        env.sender.clear();
        r.notify = vec!["FAILURE".into()];
        assert!(!wanted(&env, &r, Action::Failed), "never bounce to <>");
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_decode("a+2Bb@x"), "a+b@x");
        assert_eq!(xtext_decode("plain"), "plain");
        assert_eq!(xtext_decode("bad+Z"), "bad+Z");
    }

    #[test]
    fn report_structure() {
        let mut env = Envelope::new("alice@x", vec![Recipient::new("bob@y")], 10);
        env.envid = Some("E1".into());
        let mut r = Recipient::new("bob@y");
        r.orcpt = Some("rfc822;Bob+2Bx@y".into());
        let body = b"Subject: hello\r\nFrom: alice@x\r\n\r\nsecret body\r\n";
        let out = build(
            "mx.local",
            QueueId(0xAB),
            &env,
            body,
            &[Entry {
                rcpt: &r,
                action: Action::Failed,
                reason: Some(
                    "5.1.1 h[127.0.0.1]:25 said: 550 5.1.1 no (in reply to RCPT TO)".into(),
                ),
            }],
            None,
        )
        .unwrap();
        let msg = mail_parser::MessageParser::default().parse(&out).unwrap();
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("multipart/report"));
        assert!(
            text.contains("report-type=\"delivery-status\"")
                || text.contains("report-type=delivery-status")
        );
        assert!(text.contains("Original-Recipient: rfc822; Bob+x@y"));
        assert!(text.contains("Final-Recipient: rfc822; bob@y"));
        assert!(text.contains("Status: 5.1.1"));
        assert!(text.contains("Remote-MTA: dns; h\r\n"));
        assert!(text.contains("Original-Envelope-Id: E1"));
        assert!(text.contains("Subject: hello"));
        assert!(!text.contains("secret body"), "RET=HDRS by default");
    }
}
