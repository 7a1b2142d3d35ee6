//! Outbound relay end to end: the real binary, a real DNS server (hickory-server) serving MX
//! and A records, and scriptable SMTP servers on 127.1.T.x addresses (T: one per test, so
//! tests running in parallel never share an address).

mod common;
#[path = "support/dns.rs"]
mod dns;
#[path = "support/sink.rs"]
mod sink;

use common::{Server, Smtp, python};
use sink::{Behaviour, Sink};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

const WAIT: Duration = Duration::from_secs(30);

fn ip(test: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, test, host)
}

/// A port that is free on `first` (others are bound to the same port on other addresses).
fn sink_at(test: u8, host: u8, port: u16, b: Behaviour) -> Sink {
    Sink::start(&RT, SocketAddr::from((ip(test, host), port)), b)
}

/// The usual world: domain `dest{t}.test` with one MX, `mx.dest{t}.test` at 127.1.t.2, played
/// by a sink with behaviour `b`.
fn one_mx(t: u8, b: Behaviour) -> (Sink, dns::TestDns) {
    let mx = sink_at(t, 2, 0, b);
    let zone = dns::Zone::new("test")
        .mx(&format!("dest{t}.test"), 10, &format!("mx.dest{t}.test"))
        .a(&format!("mx.dest{t}.test"), ip(t, 2));
    (mx, dns::start(&RT, zone))
}

fn relay_extra(dns: SocketAddr, port: u16, more: &str) -> String {
    format!(
        r#"
[dns]
nameservers = ["{dns}"]
timeout = "1s"

[delivery]
port = {port}
connect_timeout = "2s"
connection_reuse = "200ms"

[queue]
retry_initial = "300ms"
retry_max = "600ms"
{more}
"#
    )
}

/// Starts postrider with relay rights for loopback clients and the given DNS and port.
fn server(dns: SocketAddr, port: u16, more: &str) -> Server {
    server_edited(dns, port, more, |c| c)
}

/// [`server`] with the config text edited first (to change one of the test defaults).
fn server_edited(
    dns: SocketAddr,
    port: u16,
    more: &str,
    edit: impl Fn(String) -> String,
) -> Server {
    let s = Server::start_with(
        "\"127.0.0.1/32\"",
        "auth_failure_delay = \"10ms\"",
        &edit(relay_extra(dns, port, more)),
    );
    s.add_user("alice@local.test", "alice-pw");
    s
}

/// Sends one message over SMTP and returns its queue id (from the 250 reply).
fn submit(s: &Server, from: &str, rcpts: &[&str], body: &str) -> String {
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.test"), 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")), 250);
    for r in rcpts {
        assert_eq!(c.cmd(&format!("RCPT TO:<{r}>")), 250, "RCPT {r}");
    }
    assert_eq!(c.cmd("DATA"), 354);
    c.send(common::dot_stuff(body.as_bytes()).as_slice());
    c.send(b".\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    text.split_whitespace()
        .find(|w| w.len() == 16 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .unwrap_or_default()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn queue_len(s: &Server) -> usize {
    s.api("/queue").as_array().map_or(0, |a| a.len())
}

/// Parses a DSN with Python's email package (an independent MIME parser) and returns a JSON
/// object: subject, from, content type, report-type, the per-message and per-recipient fields
/// of message/delivery-status, and the returned part's type and text.
fn parse_dsn(raw: &[u8]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dsn.eml");
    std::fs::write(&p, raw).unwrap();
    let out = python(
        r#"
import email, json, os
from email import policy
m = email.message_from_bytes(open(os.environ["F"], "rb").read(), policy=policy.default)
parts = list(m.iter_parts())
ds = parts[1]
# message/delivery-status: payload is a list of header blocks
blocks = [dict((k, str(v)) for k, v in b.items()) for b in ds.get_payload()]
ret = parts[2]
if ret.get_content_type() == "message/rfc822":
    returned = ret.get_payload()[0].as_string()
else:
    returned = ret.get_payload(decode=True).decode("utf-8", "replace")
print(json.dumps({
  "subject": m["subject"], "from": m["from"], "to": m["to"],
  "auto_submitted": m["auto-submitted"],
  "type": m.get_content_type(), "report_type": m.get_param("report-type"),
  "human": parts[0].get_content(), "message": blocks[0], "recipients": blocks[1:],
  "returned_type": ret.get_content_type(), "returned": returned,
}))
"#,
        &[("F", p.display().to_string())],
    );
    serde_json::from_str(&out).unwrap()
}

/// The one DSN in alice's mailbox.
fn alice_dsn(s: &Server, n: usize) -> serde_json::Value {
    let msgs = s.wait_mailbox("alice@local.test", n);
    let uid = msgs[n - 1]["uid"].as_u64().unwrap();
    let raw = s.message("alice@local.test", uid);
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("Return-Path: <>\r\n"),
        "DSNs come from <>: {text}"
    );
    parse_dsn(&raw)
}

#[test]
fn delivers_through_the_primary_mx_with_pipelining_and_dsn_parameters() {
    let t = 1;
    let primary = sink_at(t, 2, 0, Behaviour::default());
    let port = primary.addr.port();
    let backup = sink_at(t, 3, port, Behaviour::default());
    let d = dns::start(
        &RT,
        dns::Zone::new("test")
            .mx("dest1.test", 10, "mx1.dest1.test")
            .mx("dest1.test", 20, "mx2.dest1.test")
            .a("mx1.dest1.test", ip(t, 2))
            .a("mx2.dest1.test", ip(t, 3)),
    );
    let s = server(d.addr, port, "");
    let body = "Subject: hello\r\nFrom: alice@local.test\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n";
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.test"), 250);
    assert_eq!(
        c.cmd("MAIL FROM:<alice@local.test> RET=HDRS ENVID=env+2B1"),
        250
    );
    assert_eq!(
        c.cmd("RCPT TO:<bob@dest1.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@dest1.test"),
        250
    );
    assert_eq!(c.cmd("RCPT TO:<carol@dest1.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(&common::dot_stuff(body.as_bytes()));
    c.send(b".\r\n");
    assert_eq!(c.reply().0, 250);

    let got = primary.wait(1, WAIT);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.mail_from, "alice@local.test");
    assert_eq!(
        m.rcpts,
        vec!["bob@dest1.test", "carol@dest1.test"],
        "one transaction for both"
    );
    let data = String::from_utf8_lossy(&m.data);
    assert!(data.starts_with("Received: from client.test"), "{data}");
    assert!(
        data.ends_with("\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n"),
        "dot-stuffing must round-trip: {data:?}"
    );
    assert!(backup.received().is_empty());
    // The commands the far side saw: DSN parameters passed on (it offers DSN), SIZE given,
    // and the whole group pipelined (the sink logs the order).
    let cmds: Vec<String> = primary.commands().into_iter().map(|(_, c)| c).collect();
    let mail = cmds.iter().find(|c| c.starts_with("MAIL FROM:")).unwrap();
    assert!(
        mail.contains(" SIZE=") && mail.contains(" RET=HDRS") && mail.contains(" ENVID=env+2B1"),
        "{mail}"
    );
    let rcpt = cmds.iter().find(|c| c.contains("bob@dest1.test")).unwrap();
    assert!(
        rcpt.contains("NOTIFY=FAILURE,DELAY") && rcpt.contains("ORCPT=rfc822;bob@dest1.test"),
        "{rcpt}"
    );
    wait_until("an empty queue", || queue_len(&s) == 0);
    // No DSN: delivered with a next hop that handles DSN, and no SUCCESS asked.
    assert!(s.mailbox("alice@local.test").is_empty());
    let queued = s.cli_ok(&["queue", "list"]);
    assert!(queued.trim().is_empty(), "{queued}");
    let log = s.log();
    assert!(
        log.contains("delivered") && log.contains("relay=mx1.dest1.test[127.1.1.2]"),
        "{log}"
    );
}

#[test]
fn primary_down_goes_to_the_secondary_and_connections_are_reused() {
    let t = 2;
    // Nothing listens on the primary's address: connection refused.
    let backup = sink_at(t, 3, 0, Behaviour::default());
    let port = backup.addr.port();
    let d = dns::start(
        &RT,
        dns::Zone::new("test")
            .mx("dest2.test", 10, "mx1.dest2.test")
            .mx("dest2.test", 20, "mx2.dest2.test")
            .a("mx1.dest2.test", ip(t, 2))
            .a("mx2.dest2.test", ip(t, 3)),
    );
    let s = server(d.addr, port, "");
    for i in 0..5 {
        submit(
            &s,
            "alice@local.test",
            &["bob@dest2.test"],
            &format!("Subject: n{i}\r\n\r\nx\r\n"),
        );
    }
    let got = backup.wait(5, WAIT);
    assert_eq!(got.len(), 5);
    wait_until("an empty queue", || queue_len(&s) == 0);
    assert!(
        backup.connections() < 5,
        "{} connections for 5 messages: no reuse",
        backup.connections()
    );
    assert!(s.mailbox("alice@local.test").is_empty(), "no bounce");
}

#[test]
fn implicit_mx_uses_the_domain_address() {
    let t = 3;
    let host = sink_at(t, 4, 0, Behaviour::default());
    let d = dns::start(&RT, dns::Zone::new("test").a("plain3.test", ip(t, 4)));
    let s = server(d.addr, host.addr.port(), "");
    submit(
        &s,
        "alice@local.test",
        &["x@plain3.test"],
        "Subject: i\r\n\r\nbody\r\n",
    );
    assert_eq!(host.wait(1, WAIT)[0].rcpts, vec!["x@plain3.test"]);
}

#[test]
fn null_mx_and_nxdomain_bounce_at_once() {
    let d = dns::start(&RT, dns::Zone::new("test").null_mx("nomail4.test"));
    let s = server(d.addr, 2525, "");
    submit(
        &s,
        "alice@local.test",
        &["x@nomail4.test"],
        "Subject: n\r\n\r\nbody\r\n",
    );
    let dsn = alice_dsn(&s, 1);
    assert_eq!(dsn["recipients"][0]["Status"], "5.1.10");
    assert_eq!(dsn["recipients"][0]["Action"], "failed");
    submit(
        &s,
        "alice@local.test",
        &["x@nosuch4.test"],
        "Subject: n\r\n\r\nbody\r\n",
    );
    let dsn = alice_dsn(&s, 2);
    assert_eq!(
        dsn["recipients"][0]["Final-Recipient"],
        "rfc822; x@nosuch4.test"
    );
    assert!(
        dsn["recipients"][0]["Status"]
            .as_str()
            .unwrap()
            .starts_with("5.1."),
        "{dsn}"
    );
    wait_until("an empty queue", || queue_len(&s) == 0);
}

#[test]
fn unreachable_dns_defers_and_never_bounces() {
    // The default test config points DNS at a closed port.
    let s = Server::start_with(
        "\"127.0.0.1/32\"",
        "",
        "[queue]\nretry_initial = \"200ms\"\nretry_max = \"300ms\"\n",
    );
    s.add_user("alice@local.test", "pw");
    let id = submit(
        &s,
        "alice@local.test",
        &["x@dnsdown.test"],
        "Subject: d\r\n\r\nx\r\n",
    );
    wait_until("two attempts", || {
        s.api(&format!("/queue/{id}"))["attempts"].as_u64() >= Some(2)
    });
    let e = s.api(&format!("/queue/{id}"));
    let err = e["recipients"][0]["last_error"].as_str().unwrap();
    assert!(err.starts_with("4.4.3 "), "{err}");
    assert!(s.mailbox("alice@local.test").is_empty());
}

#[test]
fn a_4xx_is_retried_until_it_succeeds() {
    let t = 5;
    let b = Behaviour {
        defer_data: 2,
        ..Default::default()
    };
    let (mx, d) = one_mx(t, b);
    let s = server(d.addr, mx.addr.port(), "");
    let id = submit(
        &s,
        "alice@local.test",
        &["bob@dest5.test"],
        "Subject: r\r\n\r\nretry me\r\n",
    );
    let got = mx.wait(1, WAIT);
    assert!(String::from_utf8_lossy(&got[0].data).contains("retry me"));
    wait_until("an empty queue", || queue_len(&s) == 0);
    let log = s.log();
    assert!(
        log.contains(&id) && log.contains("451 4.3.0 try again later"),
        "deferrals are logged"
    );
    assert!(s.mailbox("alice@local.test").is_empty());
}

#[test]
fn permanent_failure_bounces_with_a_standard_dsn() {
    let t = 6;
    let mut b = Behaviour::default();
    b.rcpt_replies.insert(
        "gone@dest6.test".into(),
        "550 5.1.1 <gone@dest6.test>: no such user".into(),
    );
    let (mx, d) = one_mx(t, b);
    let s = server(d.addr, mx.addr.port(), "");
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.test"), 250);
    assert_eq!(c.cmd("MAIL FROM:<alice@local.test> RET=FULL ENVID=E6"), 250);
    assert_eq!(
        c.cmd("RCPT TO:<gone@dest6.test> ORCPT=rfc822;Gone+2Bx@dest6.test"),
        250
    );
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: will bounce\r\nMessage-ID: <m6@local.test>\r\n\r\nthe body\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 250);
    let id = text
        .split_whitespace()
        .find(|w| w.len() == 16)
        .unwrap()
        .to_string();

    let dsn = alice_dsn(&s, 1);
    assert_eq!(dsn["type"], "multipart/report");
    assert_eq!(dsn["report_type"], "delivery-status");
    assert_eq!(dsn["subject"], "Undelivered Mail Returned to Sender");
    assert_eq!(dsn["to"], "alice@local.test");
    assert_eq!(dsn["auto_submitted"], "auto-replied");
    assert!(
        dsn["from"]
            .as_str()
            .unwrap()
            .contains("MAILER-DAEMON@mx.local.test")
    );
    let m = &dsn["message"];
    assert_eq!(m["Reporting-MTA"], "dns; mx.local.test");
    assert_eq!(m["Original-Envelope-Id"], "E6");
    assert_eq!(m["X-Postrider-Queue-ID"], id);
    assert!(m["Arrival-Date"].as_str().is_some());
    let r = &dsn["recipients"][0];
    assert_eq!(r["Final-Recipient"], "rfc822; gone@dest6.test");
    assert_eq!(r["Original-Recipient"], "rfc822; Gone+x@dest6.test");
    assert_eq!(r["Action"], "failed");
    assert_eq!(r["Status"], "5.1.1");
    assert_eq!(r["Remote-MTA"], "dns; mx.dest6.test");
    assert_eq!(
        r["Diagnostic-Code"],
        "smtp; 550 5.1.1 <gone@dest6.test>: no such user (in reply to RCPT TO)"
    );
    assert!(r["Last-Attempt-Date"].as_str().is_some());
    // RET=FULL: the whole original message comes back.
    assert_eq!(dsn["returned_type"], "message/rfc822");
    let ret = dsn["returned"].as_str().unwrap();
    assert!(
        ret.contains("Subject: will bounce") && ret.contains("the body"),
        "{ret}"
    );
    wait_until("an empty queue", || queue_len(&s) == 0);
}

#[test]
fn recipients_are_handled_one_by_one() {
    let t = 7;
    let mut b = Behaviour::default();
    b.rcpt_replies
        .insert("no@dest7.test".into(), "550 5.1.1 no".into());
    b.rcpt_replies
        .insert("later@dest7.test".into(), "452 4.2.2 mailbox full".into());
    let (mx, d) = one_mx(t, b);
    let s = server(d.addr, mx.addr.port(), "");
    let id = submit(
        &s,
        "alice@local.test",
        &[
            "yes@dest7.test",
            "no@dest7.test",
            "later@dest7.test",
            "alice@local.test",
        ],
        "Subject: p\r\n\r\npartial\r\n",
    );
    let got = mx.wait(1, WAIT);
    assert_eq!(got[0].rcpts, vec!["yes@dest7.test"]);
    // alice gets the message itself and a bounce for no@ only.
    let msgs = s.wait_mailbox("alice@local.test", 2);
    let dsn_uid = msgs
        .iter()
        .find(|m| m["subject"] == "Undelivered Mail Returned to Sender")
        .expect("a bounce")["uid"]
        .as_u64()
        .unwrap();
    let dsn = parse_dsn(&s.message("alice@local.test", dsn_uid));
    let rs = dsn["recipients"].as_array().unwrap();
    assert_eq!(rs.len(), 1, "{dsn}");
    assert_eq!(rs[0]["Final-Recipient"], "rfc822; no@dest7.test");
    // later@ stays queued, deferred with the server's words.
    let e = s.api(&format!("/queue/{id}"));
    let states: Vec<(String, String)> = e["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&("yes@dest7.test".into(), "delivered".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("no@dest7.test".into(), "failed".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("later@dest7.test".into(), "deferred".into())),
        "{states:?}"
    );
    let later = e["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "later@dest7.test")
        .unwrap();
    assert!(
        later["last_error"]
            .as_str()
            .unwrap()
            .contains("452 4.2.2 mailbox full"),
        "{later}"
    );
    let show = s.cli_ok(&["queue", "show", &id]);
    assert!(
        show.contains("later@dest7.test") && show.contains("mailbox full"),
        "{show}"
    );
    // Recovery: the mailbox has room again; the next retry delivers it, and no more bounces.
    mx.set(|b| {
        b.rcpt_replies.remove("later@dest7.test");
    });
    let got = mx.wait(2, WAIT);
    assert_eq!(got[1].rcpts, vec!["later@dest7.test"]);
    wait_until("an empty queue", || queue_len(&s) == 0);
    assert_eq!(s.mailbox("alice@local.test").len(), 2);
}

#[test]
fn starttls_with_a_self_signed_certificate() {
    let t = 8;
    let b = Behaviour {
        starttls: true,
        ..Default::default()
    };
    let (mx, d) = one_mx(t, b);
    let s = server(d.addr, mx.addr.port(), "");
    submit(
        &s,
        "alice@local.test",
        &["x@dest8.test"],
        "Subject: tls\r\n\r\nsecret\r\n",
    );
    let got = mx.wait(1, WAIT);
    assert!(got[0].tls, "sent under TLS");
    // Nothing but EHLO and STARTTLS went in clear.
    let clear: Vec<String> = mx
        .commands()
        .into_iter()
        .filter(|(tls, _)| !tls)
        .map(|(_, c)| c)
        .collect();
    assert_eq!(clear, vec!["EHLO mx.local.test", "STARTTLS"]);
    assert!(s.log().contains("tls=TLSv1.3"));
}

#[test]
fn required_tls_is_never_downgraded() {
    let t = 9;
    let mx = sink_at(t, 2, 0, Behaviour::default()); // no STARTTLS
    let d = dns::start(&RT, dns::Zone::new("test"));
    let s = server(
        d.addr,
        mx.addr.port(),
        &format!(
            "[[route]]\ndomains = [\"secure9.test\"]\nnext_hop = \"{}\"\ntls = \"required\"\n",
            mx.addr
        ),
    );
    let id = submit(
        &s,
        "alice@local.test",
        &["x@secure9.test"],
        "Subject: s\r\n\r\nsecret\r\n",
    );
    wait_until("a deferral", || {
        s.api(&format!("/queue/{id}"))["recipients"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("4.7.4 "))
    });
    assert!(mx.received().is_empty());
    assert!(
        !mx.commands().iter().any(|(_, c)| c.starts_with("MAIL")),
        "no transaction in clear"
    );
    assert!(
        s.mailbox("alice@local.test").is_empty(),
        "deferred, not bounced"
    );
}

#[test]
fn smarthost_with_auth_over_starttls() {
    let t = 10;
    let b = Behaviour {
        starttls: true,
        auth: Some(("relay-user".into(), "relay-pass".into())),
        ..Default::default()
    };
    let hub = sink_at(t, 2, 0, b);
    let d = dns::start(&RT, dns::Zone::new("test"));
    let s = server(
        d.addr,
        1,
        &format!(
            "[[route]]\ndomains = [\"*\"]\nnext_hop = \"{}\"\ntls = \"required\"\nauth_username = \"relay-user\"\nauth_password = \"relay-pass\"\n",
            hub.addr
        ),
    );
    // A user submits with AUTH (Python's smtplib, as a mail client would).
    python(
        r#"
import smtplib, os
c = smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]))
c.login("alice@local.test", "alice-pw")
c.sendmail("alice@local.test", ["far@anywhere.example", "other@elsewhere.example"], "Subject: via hub\r\n\r\nhello\r\n")
c.quit()
"#,
        &[("PORT", s.port("submission-plain").port().to_string())],
    );
    let got = hub.wait(1, WAIT);
    assert_eq!(got[0].auth.as_deref(), Some("relay-user"));
    assert!(got[0].tls);
    let mut r = got[0].rcpts.clone();
    r.sort();
    assert_eq!(r, vec!["far@anywhere.example", "other@elsewhere.example"]);
    // A wrong password is a deferral with the hub's answer, not a bounce.
    let wrong = server(
        d.addr,
        1,
        &format!(
            "[[route]]\ndomains = [\"*\"]\nnext_hop = \"{}\"\ntls = \"required\"\nauth_username = \"relay-user\"\nauth_password = \"wrong\"\n",
            hub.addr
        ),
    );
    let id = submit(
        &wrong,
        "alice@local.test",
        &["x@anywhere.example"],
        "Subject: 2\r\n\r\nx\r\n",
    );
    wait_until("the AUTH refusal", || {
        wrong.api(&format!("/queue/{id}"))["recipients"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("535 5.7.8"))
    });
    assert!(wrong.mailbox("alice@local.test").is_empty());
    assert_eq!(hub.received().len(), 1);
}

#[test]
fn deferred_mail_survives_a_restart() {
    let t = 11;
    let b = Behaviour {
        greeting: 421,
        ..Default::default()
    };
    let (mx, d) = one_mx(t, b);
    let mut s = server(d.addr, mx.addr.port(), "");
    let id = submit(
        &s,
        "alice@local.test",
        &["bob@dest11.test"],
        "Subject: persist\r\n\r\nkeep me\r\n",
    );
    wait_until("a deferral", || {
        s.api(&format!("/queue/{id}"))["attempts"].as_u64() >= Some(1)
    });
    s.stop();
    mx.set(|b| b.greeting = 220);
    s.launch();
    let got = mx.wait(1, WAIT);
    assert!(String::from_utf8_lossy(&got[0].data).contains("keep me"));
    wait_until("an empty queue", || queue_len(&s) == 0);
}

#[test]
fn queue_control_through_the_cli() {
    let t = 12;
    let b = Behaviour {
        greeting: 421,
        ..Default::default()
    };
    let (mx, d) = one_mx(t, b);
    // Long retry delays: only hold/release/flush make things happen.
    let s = server_edited(d.addr, mx.addr.port(), "", |c| {
        c.replace(
            "retry_initial = \"300ms\"\nretry_max = \"600ms\"",
            "retry_initial = \"1h\"\nretry_max = \"2h\"",
        )
    });
    let a = submit(
        &s,
        "alice@local.test",
        &["a@dest12.test"],
        "Subject: a\r\n\r\nA\r\n",
    );
    let b = submit(
        &s,
        "alice@local.test",
        &["b@dest12.test"],
        "Subject: b\r\n\r\nB\r\n",
    );
    let c = submit(
        &s,
        "alice@local.test",
        &["c@dest12.test"],
        "Subject: c\r\n\r\nC\r\n",
    );
    wait_until("three deferrals", || {
        [&a, &b, &c]
            .iter()
            .all(|id| s.api(&format!("/queue/{id}"))["attempts"].as_u64() >= Some(1))
    });
    let show = s.cli_ok(&["queue", "show", &a]);
    assert!(
        show.contains("421") && show.contains("a@dest12.test"),
        "{show}"
    );
    s.cli_ok(&["queue", "hold", &a]);
    s.cli_ok(&["queue", "delete", &c, "--bounce"]);
    mx.set(|b| b.greeting = 220);
    s.cli_ok(&["queue", "flush", "--domain", "dest12.test"]);
    let got = mx.wait(1, WAIT);
    assert_eq!(
        got[0].rcpts,
        vec!["b@dest12.test"],
        "held and deleted messages are not sent"
    );
    // The deleted one was bounced to its sender.
    let dsn = alice_dsn(&s, 1);
    assert_eq!(
        dsn["recipients"][0]["Final-Recipient"],
        "rfc822; c@dest12.test"
    );
    assert_eq!(dsn["recipients"][0]["Action"], "failed");
    s.cli_ok(&["queue", "release", &a]);
    let got = mx.wait(2, WAIT);
    assert_eq!(got[1].rcpts, vec!["a@dest12.test"]);
    wait_until("an empty queue", || queue_len(&s) == 0);
}

fn metrics(s: &Server) -> String {
    ureq::get(&format!("http://{}/metrics", s.port("http")))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

#[test]
fn per_destination_concurrency_is_capped_and_metrics_count_attempts() {
    let t = 13;
    let (mx, d) = one_mx(t, Behaviour::default());
    // Two connections for this destination instead of the default 20.
    let s = server_edited(d.addr, mx.addr.port(), "", |c| {
        c.replace(
            "[delivery]\n",
            "[delivery]\nconcurrency_per_destination = 2\n",
        )
    });
    // 12 messages in one SMTP session, as fast as the server takes them.
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.test"), 250);
    for i in 0..12 {
        assert_eq!(c.cmd("MAIL FROM:<load@local.test>"), 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<r{i}@dest13.test>")), 250);
        assert_eq!(c.cmd("DATA"), 354);
        c.send(format!("Subject: m{i}\r\n\r\nbody {i}\r\n.\r\n").as_bytes());
        assert_eq!(c.reply().0, 250);
    }
    mx.wait(12, WAIT);
    wait_until("an empty queue", || queue_len(&s) == 0);
    assert!(
        mx.max_concurrent() <= 2,
        "{} connections at once",
        mx.max_concurrent()
    );
    let m = metrics(&s);
    assert!(
        m.contains(
            "postrider_delivery_attempts_total{result=\"delivered\",transport=\"remote\"} 12"
        ),
        "{m}"
    );
    assert!(
        m.contains("postrider_dns_lookup_seconds_count{type=\"MX\"}"),
        "{m}"
    );
    assert!(
        m.contains("postrider_delivery_delay_seconds_count{transport=\"remote\"} 12"),
        "{m}"
    );
    assert!(
        m.contains("postrider_queue_entries{state=\"deferred\"} 0"),
        "{m}"
    );
}

#[test]
fn notify_success_gets_relayed_and_delivered_reports_and_never_gets_none() {
    let t = 14;
    let mut b = Behaviour {
        dsn: false,
        ..Default::default()
    };
    b.rcpt_replies
        .insert("never@dest14.test".into(), "550 5.1.1 no".into());
    let (mx, d) = one_mx(t, b);
    let s = server(d.addr, mx.addr.port(), "");
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.test"), 250);
    assert_eq!(c.cmd("MAIL FROM:<alice@local.test> ENVID=S14"), 250);
    assert_eq!(c.cmd("RCPT TO:<ok@dest14.test> NOTIFY=SUCCESS"), 250);
    assert_eq!(c.cmd("RCPT TO:<never@dest14.test> NOTIFY=NEVER"), 250);
    assert_eq!(
        c.cmd("RCPT TO:<alice@local.test> NOTIFY=SUCCESS,FAILURE"),
        250
    );
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: notify\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let got = mx.wait(1, WAIT);
    // The next hop has no DSN extension: no NOTIFY passed on, so we report success ourselves.
    assert!(!mx.commands().iter().any(|(_, c)| c.contains("NOTIFY=")));
    assert_eq!(got[0].rcpts, vec!["ok@dest14.test"]);
    wait_until("an empty queue", || queue_len(&s) == 0);
    // One report per message and attempt, covering both successes.
    let msgs = s.wait_mailbox("alice@local.test", 2);
    let mut actions = Vec::new();
    for m in &msgs {
        if m["subject"] == "Successful Mail Delivery Report" {
            let dsn = parse_dsn(&s.message("alice@local.test", m["uid"].as_u64().unwrap()));
            assert_eq!(dsn["message"]["Original-Envelope-Id"], "S14");
            for r in dsn["recipients"].as_array().unwrap() {
                actions.push(format!(
                    "{} {} {}",
                    r["Final-Recipient"].as_str().unwrap(),
                    r["Action"].as_str().unwrap(),
                    r["Status"].as_str().unwrap()
                ));
            }
        }
    }
    actions.sort();
    assert_eq!(
        actions,
        vec![
            "rfc822; alice@local.test delivered 2.0.0",
            "rfc822; ok@dest14.test relayed 2.0.0"
        ],
        "{msgs:?}"
    );
    assert_eq!(
        s.mailbox("alice@local.test").len(),
        2,
        "the message and one report; nothing for NOTIFY=NEVER"
    );
}

#[test]
fn smtputf8_and_size_limits_of_the_next_hop_fail_clearly() {
    let t = 15;
    let b = Behaviour {
        smtputf8: false,
        size: 5000,
        ..Default::default()
    };
    let (mx, d) = one_mx(t, b);
    let s = server(d.addr, mx.addr.port(), "");
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.test"), 250);
    assert_eq!(c.cmd("MAIL FROM:<alice@local.test> SMTPUTF8"), 250);
    assert_eq!(c.cmd("RCPT TO:<j\u{f6}rg@dest15.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send("Subject: gr\u{fc}\u{df}e\r\n\r\nx\r\n.\r\n".as_bytes());
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.cmd("MAIL FROM:<alice@local.test>"), 250);
    assert_eq!(c.cmd("RCPT TO:<big@dest15.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(
        format!(
            "Subject: big\r\n\r\n{}.\r\n",
            ("y".repeat(98) + "\r\n").repeat(60)
        )
        .as_bytes(),
    );
    assert_eq!(c.reply().0, 250);
    s.wait_mailbox("alice@local.test", 2);
    wait_until("an empty queue", || queue_len(&s) == 0);
    let mut statuses: Vec<String> = (1..=2)
        .map(|n| {
            let d = alice_dsn(&s, n);
            format!(
                "{} {}",
                d["recipients"][0]["Status"].as_str().unwrap(),
                d["recipients"][0]["Final-Recipient"].as_str().unwrap()
            )
        })
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![
            "5.3.4 rfc822; big@dest15.test",
            "5.6.7 utf-8; j\u{f6}rg@dest15.test"
        ]
    );
    assert!(mx.received().is_empty());
    assert!(
        !mx.commands().iter().any(|(_, c)| c.starts_with("MAIL")),
        "refused before MAIL"
    );
}

#[test]
fn one_delay_warning_then_the_message_still_goes_out() {
    let t = 16;
    let b = Behaviour {
        greeting: 421,
        ..Default::default()
    };
    let (mx, d) = one_mx(t, b);
    let s = server_edited(d.addr, mx.addr.port(), "", |c| {
        c.replace("[queue]\n", "[queue]\ndelay_warning = \"700ms\"\n")
    });
    let id = submit(
        &s,
        "alice@local.test",
        &["slow@dest16.test"],
        "Subject: slow\r\n\r\nx\r\n",
    );
    let dsn = alice_dsn(&s, 1);
    assert_eq!(dsn["subject"], "Delayed Mail (still being retried)");
    let r = &dsn["recipients"][0];
    assert_eq!(r["Action"], "delayed");
    assert!(r["Status"].as_str().unwrap().starts_with("4."), "{r}");
    assert!(r["Will-Retry-Until"].as_str().is_some(), "{r}");
    assert_eq!(dsn["returned_type"], "text/rfc822-headers");
    // More failed attempts, but no second warning.
    let after = s.api(&format!("/queue/{id}"))["attempts"].as_u64().unwrap();
    wait_until("two more attempts", || {
        s.api(&format!("/queue/{id}"))["attempts"].as_u64().unwrap() >= after + 2
    });
    assert_eq!(s.mailbox("alice@local.test").len(), 1);
    mx.set(|b| b.greeting = 220);
    mx.wait(1, WAIT);
    wait_until("an empty queue", || queue_len(&s) == 0);
    assert_eq!(s.mailbox("alice@local.test").len(), 1);
}

#[test]
fn a_5xx_greeting_moves_on_to_the_next_mx() {
    let t = 17;
    let refusing = sink_at(
        t,
        2,
        0,
        Behaviour {
            greeting: 554,
            ..Default::default()
        },
    );
    let port = refusing.addr.port();
    let backup = sink_at(t, 3, port, Behaviour::default());
    let d = dns::start(
        &RT,
        dns::Zone::new("test")
            .mx("dest17.test", 10, "mx1.dest17.test")
            .mx("dest17.test", 20, "mx2.dest17.test")
            .a("mx1.dest17.test", ip(t, 2))
            .a("mx2.dest17.test", ip(t, 3)),
    );
    let s = server(d.addr, port, "");
    submit(
        &s,
        "alice@local.test",
        &["x@dest17.test"],
        "Subject: g\r\n\r\nx\r\n",
    );
    assert_eq!(backup.wait(1, WAIT)[0].rcpts, vec!["x@dest17.test"]);
    assert!(refusing.connections() >= 1, "the primary was tried first");
    wait_until("an empty queue", || queue_len(&s) == 0);
    assert!(s.mailbox("alice@local.test").is_empty());
}

#[test]
fn an_mx_that_is_ourselves_is_a_loop_not_a_delivery() {
    let t = 18;
    // The far side answers EHLO with our own name, as we would if the MX pointed back at us.
    let (mx, d) = one_mx(
        t,
        Behaviour {
            name: "mx.local.test".into(),
            ..Default::default()
        },
    );
    let s = server(d.addr, mx.addr.port(), "");
    submit(
        &s,
        "alice@local.test",
        &["x@dest18.test"],
        "Subject: l\r\n\r\nx\r\n",
    );
    let dsn = alice_dsn(&s, 1);
    assert_eq!(dsn["recipients"][0]["Status"], "5.4.6");
    assert!(mx.received().is_empty());
    wait_until("an empty queue", || queue_len(&s) == 0);
}

#[test]
fn many_recipients_go_in_transactions_of_100_and_address_literals_skip_dns() {
    let t = 19;
    let (mx, d) = one_mx(t, Behaviour::default());
    let s = server(d.addr, mx.addr.port(), "");
    let rcpts: Vec<String> = (0..150).map(|i| format!("r{i}@dest19.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    submit(&s, "alice@local.test", &refs, "Subject: many\r\n\r\nx\r\n");
    let got = mx.wait(2, WAIT);
    assert_eq!(got[0].rcpts.len() + got[1].rcpts.len(), 150);
    assert!(
        got.iter().all(|m| m.rcpts.len() <= 100),
        "RFC 5321 4.5.3.1.8"
    );
    assert_eq!(mx.connections(), 1, "both transactions on one connection");
    // user@[127.1.19.2]: straight to that address, no MX lookup.
    let lit = format!("lit@[{}]", ip(t, 2));
    submit(
        &s,
        "alice@local.test",
        &[lit.as_str()],
        "Subject: literal\r\n\r\nx\r\n",
    );
    assert_eq!(mx.wait(3, WAIT)[2].rcpts, vec![lit.clone()]);
    wait_until("an empty queue", || queue_len(&s) == 0);
}

#[test]
fn a_silent_server_times_out_and_the_next_mx_is_used() {
    let t = 20;
    let silent = sink_at(
        t,
        2,
        0,
        Behaviour {
            greeting: 0,
            ..Default::default()
        },
    );
    let port = silent.addr.port();
    let backup = sink_at(t, 3, port, Behaviour::default());
    let d = dns::start(
        &RT,
        dns::Zone::new("test")
            .mx("dest20.test", 10, "mx1.dest20.test")
            .mx("dest20.test", 20, "mx2.dest20.test")
            .a("mx1.dest20.test", ip(t, 2))
            .a("mx2.dest20.test", ip(t, 3)),
    );
    let s = server_edited(d.addr, port, "", |c| {
        c.replace("[delivery]\n", "[delivery]\ngreeting_timeout = \"300ms\"\n")
    });
    submit(
        &s,
        "alice@local.test",
        &["x@dest20.test"],
        "Subject: t\r\n\r\nx\r\n",
    );
    assert_eq!(backup.wait(1, WAIT)[0].rcpts, vec!["x@dest20.test"]);
    assert_eq!(silent.connections(), 1);
    let log = s.log();
    assert!(
        log.contains("timed out") && log.contains("initial greeting"),
        "{log}"
    );
}

#[test]
fn verify_accepts_a_trusted_certificate_and_defers_on_a_name_mismatch() {
    let t = 21;
    let b = Behaviour {
        starttls: true,
        ..Default::default()
    };
    let mx = sink_at(t, 2, 0, b);
    let d = dns::start(
        &RT,
        dns::Zone::new("test")
            .a("sink.test", ip(t, 2))
            .a("wrongname.test", ip(t, 2)),
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &mx.ca_pem).unwrap();
    let port = mx.addr.port();
    let routes = format!(
        "[[route]]\ndomains = [\"good21.test\"]\nnext_hop = \"sink.test:{port}\"\ntls = \"verify\"\n\
         [[route]]\ndomains = [\"bad21.test\"]\nnext_hop = \"wrongname.test:{port}\"\ntls = \"verify\"\n"
    );
    let s = server_edited(d.addr, 1, &routes, |c| {
        c.replace(
            "[delivery]\n",
            &format!("[delivery]\nca_file = \"{}\"\n", ca.display()),
        )
    });
    submit(
        &s,
        "alice@local.test",
        &["x@good21.test"],
        "Subject: v\r\n\r\nx\r\n",
    );
    let got = mx.wait(1, WAIT);
    assert!(got[0].tls && got[0].rcpts == vec!["x@good21.test"]);
    let id = submit(
        &s,
        "alice@local.test",
        &["y@bad21.test"],
        "Subject: v\r\n\r\ny\r\n",
    );
    wait_until("a TLS deferral", || {
        s.api(&format!("/queue/{id}"))["recipients"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("4.7.5 ") || e.starts_with("4.7.4 "))
    });
    assert_eq!(
        mx.received().len(),
        1,
        "nothing sent to the host with the wrong name"
    );
    assert!(
        s.mailbox("alice@local.test").is_empty(),
        "deferred, not bounced"
    );
}

#[test]
fn a_crash_during_a_remote_attempt_does_not_retry_it_at_once() {
    let t = 22;
    // A server that never greets: the attempt hangs until we kill postrider.
    let (mx, d) = one_mx(
        t,
        Behaviour {
            greeting: 0,
            ..Default::default()
        },
    );
    let mut s = server_edited(d.addr, mx.addr.port(), "", |c| {
        c.replace(
            "retry_initial = \"300ms\"\nretry_max = \"600ms\"",
            "retry_initial = \"1h\"\nretry_max = \"2h\"",
        )
    });
    let id = submit(
        &s,
        "alice@local.test",
        &["x@dest22.test"],
        "Subject: c\r\n\r\nx\r\n",
    );
    wait_until("the attempt to start", || mx.connections() == 1);
    s.kill9();
    s.launch();
    // The message is still queued, with its next attempt moved out before it was tried: a
    // message that crashes the server cannot make it crash-loop.
    let e = s.api(&format!("/queue/{id}"));
    let next = e["next_attempt_ms"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        next > now + 50 * 60 * 1000,
        "next attempt {next} is not an hour out (now {now})"
    );
    assert_eq!(e["recipients"][0]["state"], "pending");
    assert_eq!(mx.connections(), 1);
}

#[test]
fn a_5xx_at_end_of_data_fails_every_accepted_recipient() {
    let t = 23;
    let (mx, d) = one_mx(
        t,
        Behaviour {
            reject_data: Some("554 5.7.1 message refused: spam".into()),
            ..Default::default()
        },
    );
    let s = server(d.addr, mx.addr.port(), "");
    submit(
        &s,
        "alice@local.test",
        &["a@dest23.test", "b@dest23.test"],
        "Subject: spammy\r\n\r\nx\r\n",
    );
    let dsn = alice_dsn(&s, 1);
    let rs = dsn["recipients"].as_array().unwrap();
    assert_eq!(rs.len(), 2, "{dsn}");
    for r in rs {
        assert_eq!(r["Status"], "5.7.1");
        assert_eq!(
            r["Diagnostic-Code"],
            "smtp; 554 5.7.1 message refused: spam (in reply to end of data)"
        );
    }
    assert!(mx.received().is_empty());
    wait_until("an empty queue", || queue_len(&s) == 0);
}
