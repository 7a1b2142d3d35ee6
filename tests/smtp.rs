//! End-to-end SMTP tests: the real binary on ephemeral loopback ports, driven by Python's
//! smtplib and by a raw socket client (for byte-exact and adversarial input).

mod common;
use common::{Server, Smtp, python, strip_trace_headers};

fn session(s: &Server) -> Smtp {
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO client.example"), 250);
    c
}

#[test]
fn smtplib_local_delivery_lands_in_store() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let out = python(
        r#"
import os, smtplib
from email.message import EmailMessage
m = EmailMessage()
m['From'] = 'bob@example.org'; m['To'] = 'alice@local.test'; m['Subject'] = 'Hello Alice'
m.set_content('Hi!\n')
with smtplib.SMTP('127.0.0.1', int(os.environ['PORT'])) as c:
    print(c.send_message(m))
"#,
        &[("PORT", s.port("smtp").port().to_string())],
    );
    assert_eq!(out.trim(), "{}");
    let list = s.wait_mailbox("alice@local.test", 1);
    assert_eq!(list[0]["subject"], "Hello Alice");
    let raw = s.message("alice@local.test", list[0]["uid"].as_u64().unwrap());
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with(
        "Return-Path: <bob@example.org>\r\nDelivered-To: alice@local.test\r\nReceived: from "
    ));
    assert!(text.contains("by mx.local.test (postrider) with ESMTP id "));
    s.wait_queue(0);
}

#[test]
fn dot_stuffing_and_8bit_round_trip_byte_exact() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let body: &[u8] = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...three\r\n \xc3\xa9t\xc3\xa9 \xff\xfe 8-bit\r\nend .\r\n. \r\n";
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org> BODY=8BITMIME"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    let mut wire = common::dot_stuff(body);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    assert_eq!(c.reply().0, 250);
    let list = s.wait_mailbox("alice@local.test", 1);
    let raw = s.message("alice@local.test", list[0]["uid"].as_u64().unwrap());
    assert_eq!(strip_trace_headers(&raw), body);
}

#[test]
fn starttls_then_auth_on_submission() {
    let s = Server::start();
    s.add_user("alice@local.test", "s3cret");
    s.add_user("carol@local.test", "pw");
    let out = python(
        r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP('127.0.0.1', int(os.environ['PORT'])) as c:
    c.ehlo()
    assert 'auth' not in c.esmtp_features, 'AUTH offered before TLS'
    assert c.has_extn('starttls')
    c.starttls(context=ctx)
    c.ehlo()
    assert 'auth' in c.esmtp_features
    try:
        c.login('alice@local.test', 'wrong')
        raise SystemExit('bad password accepted')
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535, e
    c.login('alice@local.test', 's3cret')
    print(c.sendmail('alice@local.test', ['carol@local.test', 'dave@remote.example'], 'Subject: via tls\r\n\r\nx\r\n'))
"#,
        &[("PORT", s.port("submission").port().to_string())],
    );
    assert_eq!(out.trim(), "{}");
    let list = s.wait_mailbox("carol@local.test", 1);
    let raw = s.message("carol@local.test", list[0]["uid"].as_u64().unwrap());
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("with ESMTPSA id"), "{text}");
    assert!(text.contains("(using TLSv1."), "{text}");
    // The remote recipient stays queued (remote delivery is the relay issue's job).
    // Wait for the first delivery attempt (the runner gathers bursts for a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let q = loop {
        let q = s.wait_queue(1);
        if q[0]["recipients"][1]["state"] != "pending" {
            break q;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never attempted: {q:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(q[0]["recipients"][0]["state"], "delivered");
    assert_eq!(q[0]["recipients"][1]["address"], "dave@remote.example");
    assert_eq!(q[0]["recipients"][1]["state"], "deferred");
}

#[test]
fn implicit_tls_submissions_and_auth_login() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let out = python(
        r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP_SSL('127.0.0.1', int(os.environ['PORT']), context=ctx) as c:
    c.ehlo()
    assert 'starttls' not in c.esmtp_features
    c.user, c.password = 'alice@local.test', 'pw'
    code, _ = c.auth('LOGIN', c.auth_login)
    assert code == 235, code
    print(c.sendmail('alice@local.test', ['alice@local.test'], 'Subject: 465\r\n\r\nx\r\n'))
"#,
        &[("PORT", s.port("submissions").port().to_string())],
    );
    assert_eq!(out.trim(), "{}");
    s.wait_mailbox("alice@local.test", 1);
}

#[test]
fn submission_requires_auth_and_plaintext_auth_needs_permission() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let mut c = Smtp::connect(s.port("submission"));
    let (_, ehlo) = {
        c.send(b"EHLO x\r\n");
        c.reply()
    };
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<alice@local.test>"), 530);
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAcHc="), 538);
    // The loopback listener with allow_plaintext_auth offers AUTH without TLS.
    let mut c = Smtp::connect(s.port("submission-plain"));
    c.send(b"EHLO x\r\n");
    assert!(c.reply().1.contains("AUTH PLAIN LOGIN"));
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAcHc="), 235);
    assert_eq!(c.cmd("MAIL FROM:<alice@local.test>"), 250);
}

#[test]
fn relay_denied_unknown_user_and_null_sender() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<>"), 250);
    let (code, text) = {
        c.send(b"RCPT TO:<victim@elsewhere.example>\r\n");
        c.reply()
    };
    assert_eq!(code, 554);
    assert!(text.contains("5.7.1"), "{text}");
    let (code, text) = {
        c.send(b"RCPT TO:<nobody@local.test>\r\n");
        c.reply()
    };
    assert_eq!(code, 550);
    assert!(text.contains("5.1.1"), "{text}");
    // A source route through us is not a way to relay.
    assert_eq!(
        c.cmd("RCPT TO:<@mx.local.test:victim@elsewhere.example>"),
        554
    );
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: bounce-like\r\n\r\nnull sender\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let list = s.wait_mailbox("alice@local.test", 1);
    let raw = s.message("alice@local.test", list[0]["uid"].as_u64().unwrap());
    assert!(raw.starts_with(b"Return-Path: <>\r\n"));
}

#[test]
fn relay_network_may_relay() {
    let s = Server::start_with("\"127.0.0.0/8\"", "", "");
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<app@local.test>"), 250);
    assert_eq!(c.cmd("RCPT TO:<someone@elsewhere.example>"), 250);
}

#[test]
fn postmaster_is_accepted_for_every_local_domain() {
    let s = Server::start();
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<x@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<postmaster@local.test>"), 250);
    assert_eq!(c.cmd("RCPT TO:<PostMaster@LOCALHOST>"), 250);
    assert_eq!(c.cmd("RCPT TO:<Postmaster>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: pm\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    // All three reach the configured postmaster account, deduplicated to one copy.
    let list = s.wait_mailbox("admin@local.test", 1);
    s.wait_queue(0);
    assert_eq!(s.mailbox("admin@local.test").len(), 1, "{list:?}");
}

#[test]
fn pipelining_replies_in_order() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    c.send(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<nobody@local.test>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 550);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 354);
    c.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nMAIL FROM:<bob@example.org>\r\nRCPT TO:<nobody@local.test>\r\nDATA\r\nNOOP\r\n");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 550);
    // RFC 2920: DATA after all recipients failed is refused, and NOOP still answered.
    assert_eq!(c.reply().0, 554);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.cmd("QUIT"), 221);
    assert_eq!(s.wait_mailbox("alice@local.test", 1)[0]["subject"], "piped");
}

#[test]
fn bdat_chunks() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    let part1: &[u8] = b"Subject: chunked\r\n\r\n.no stuffing in BDAT\r\n";
    let part2: &[u8] = b"\r\n.\r\nstill data\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.cmd("DATA"), 503);
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    c.send(part2);
    assert_eq!(c.reply().0, 250);
    // BDAT 0 LAST on its own is legal.
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    c.send(b"BDAT 9\r\nSubject: ");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.cmd("BDAT 0 LAST"), 250);
    let list = s.wait_mailbox("alice@local.test", 2);
    let raw = s.message("alice@local.test", list[0]["uid"].as_u64().unwrap());
    assert_eq!(strip_trace_headers(&raw), [part1, part2].concat());
}

#[test]
fn size_limits_declared_and_actual() {
    let s = Server::start_with("", "max_message_size = 10000", "");
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    c.send(b"EHLO x\r\n");
    assert!(c.reply().1.contains("SIZE 10000"));
    let (code, text) = {
        c.send(b"MAIL FROM:<bob@example.org> SIZE=20000\r\n");
        c.reply()
    };
    assert_eq!(code, 552);
    assert!(text.contains("5.3.4"));
    // The declared size can lie: the limit holds while reading too.
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org> SIZE=100"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    let line = format!("{}\r\n", "x".repeat(98));
    for _ in 0..200 {
        c.send(line.as_bytes());
    }
    c.send(b".\r\n");
    assert_eq!(c.reply().0, 552);
    // The session goes on.
    assert_eq!(c.cmd("NOOP"), 250);
    // So does BDAT.
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    c.send(b"BDAT 20000 LAST\r\n");
    c.send(&vec![b'y'; 20000]);
    assert_eq!(c.reply().0, 552);
    assert_eq!(c.cmd("NOOP"), 250);
    assert!(s.mailbox("alice@local.test").is_empty());
}

#[test]
fn over_long_lines_get_500_class_errors() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    let (code, _) = {
        c.send(format!("NOOP {}\r\n", "a".repeat(5000)).as_bytes());
        c.reply()
    };
    assert_eq!(code, 500);
    assert_eq!(
        c.cmd("NOOP"),
        250,
        "session resynchronises after the long line"
    );
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(format!("Subject: long\r\n\r\n{}\r\n.\r\n", "b".repeat(1500)).as_bytes());
    let (code, _) = c.reply();
    assert!((500..600).contains(&code), "{code}");
    assert_eq!(c.cmd("NOOP"), 250);
    assert!(s.mailbox("alice@local.test").is_empty());
}

#[test]
fn smtputf8_addresses() {
    let s = Server::start();
    s.add_user("josé@local.test", "pw");
    let out = python(
        r#"
import os, smtplib
with smtplib.SMTP('127.0.0.1', int(os.environ['PORT'])) as c:
    c.ehlo()
    assert c.has_extn('smtputf8')
    msg = 'Subject: =?utf-8?q?ol=C3=A9?=\r\nFrom: δοκιμή@example.org\r\n\r\nολά\r\n'.encode('utf-8')
    print(c.sendmail('δοκιμή@example.org', ['josé@local.test'], msg, mail_options=['SMTPUTF8', 'BODY=8BITMIME']))
    try:
        c.sendmail('δοκιμή@example.org', ['josé@local.test'], b'x\r\n')
        raise SystemExit('UTF-8 address without SMTPUTF8 accepted')
    except smtplib.SMTPSenderRefused as e:
        assert e.smtp_code == 553, e
"#,
        &[("PORT", s.port("smtp").port().to_string())],
    );
    assert_eq!(out.trim(), "{}");
    let list = s.wait_mailbox("josé@local.test", 1);
    let raw = s.message("josé@local.test", list[0]["uid"].as_u64().unwrap());
    assert!(String::from_utf8_lossy(&raw).contains("with UTF8SMTP id"));
    assert!(raw.ends_with("ολά\r\n".as_bytes()));
}

#[test]
fn hundred_recipients_in_one_message() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    let mut cmds = String::new();
    for i in 0..100 {
        cmds.push_str(&format!("RCPT TO:<alice+{i}@local.test>\r\n"));
    }
    c.send(cmds.as_bytes());
    for _ in 0..100 {
        assert_eq!(c.reply().0, 250);
    }
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: many\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    s.wait_queue(0);
    // All 100 sub-addresses map to one account: one copy, not 100.
    assert_eq!(s.wait_mailbox("alice@local.test", 1).len(), 1);
}

#[test]
fn smuggled_message_is_never_accepted() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    for smuggle in [&b"\n.\n"[..], b"\r.\r", b"\r\n.\n", b"\n.\r\n"] {
        let mut c = session(&s);
        assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
        assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
        assert_eq!(c.cmd("DATA"), 354);
        let mut data = b"Subject: visible\r\n\r\nfirst".to_vec();
        data.extend_from_slice(smuggle);
        data.extend_from_slice(
            b"MAIL FROM:<admin@local.test>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nhidden\r\n.\r\n",
        );
        c.send(&data);
        let (code, text) = c.reply();
        assert!((500..600).contains(&code), "{smuggle:?}: {text}");
        // Nothing else was executed: the next reply is for our NOOP.
        assert_eq!(c.cmd("NOOP"), 250, "{smuggle:?}");
    }
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: clean\r\n\r\nok\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let list = s.wait_mailbox("alice@local.test", 1);
    s.wait_queue(0);
    let list2 = s.mailbox("alice@local.test");
    assert_eq!(list2.len(), 1, "{list:?}");
    assert_eq!(list2[0]["subject"], "clean");
}

#[test]
fn starttls_injection_is_not_executed() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let out = python(
        r#"
import os, socket, ssl
sock = socket.create_connection(('127.0.0.1', int(os.environ['PORT'])), timeout=10)
f = sock.makefile('rb')
def reply(f):
    lines = []
    while True:
        l = f.readline()
        lines.append(l)
        if len(l) < 4 or l[3:4] != b'-':
            return lines
reply(f)
sock.sendall(b'EHLO x\r\n'); reply(f)
# The injected MAIL travels in the same packet as STARTTLS.
sock.sendall(b'STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n')
r = reply(f)
assert r[0].startswith(b'220'), r
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(sock, server_hostname='mx.local.test')
tf = t.makefile('rb')
t.sendall(b'EHLO x\r\n')
r = reply(tf)
assert r[0].startswith(b'250'), ('first TLS reply must answer EHLO', r)
t.sendall(b'RCPT TO:<alice@local.test>\r\n')
r = reply(tf)
assert r[0].startswith(b'503'), ('injected MAIL must not have run', r)
print('ok')
"#,
        &[("PORT", s.port("smtp").port().to_string())],
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn idle_clients_time_out_with_421() {
    let s = Server::start_with("", "command_timeout = \"1s\"", "");
    let mut c = Smtp::connect(s.port("smtp"));
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(c.closed());
}

#[test]
fn connection_limit_per_ip() {
    let s = Server::start_with("", "max_connections_per_ip = 2", "");
    let _a = Smtp::connect(s.port("smtp"));
    let _b = Smtp::connect(s.port("smtp"));
    let stream = std::net::TcpStream::connect(s.port("smtp")).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).unwrap();
    assert!(line.starts_with("421"), "{line}");
}

#[test]
fn too_many_bad_commands_disconnects() {
    let s = Server::start_with("", "max_bad_commands = 3", "");
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("FOO"), 500);
    assert_eq!(c.cmd("BAR"), 500);
    assert_eq!(c.cmd("BAZ"), 421);
    assert!(c.closed());
}

#[test]
fn mail_loops_are_refused() {
    let s = Server::start_with("", "max_received_headers = 5", "");
    s.add_user("alice@local.test", "pw");
    let mut c = session(&s);
    assert_eq!(c.cmd("MAIL FROM:<bob@example.org>"), 250);
    assert_eq!(c.cmd("RCPT TO:<alice@local.test>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send("Received: from a\r\n".repeat(6).as_bytes());
    c.send(b"Subject: loop\r\n\r\nx\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("5.4.6"));
}

#[test]
fn repeated_auth_failures_from_one_ip_are_cut_off() {
    let s = Server::start_with(
        "",
        "auth_failure_delay = \"1ms\"\nauth_failures_per_minute = 2",
        "",
    );
    s.add_user("alice@local.test", "pw");
    let mut c = Smtp::connect(s.port("submission-plain"));
    assert_eq!(c.cmd("EHLO x"), 250);
    // alice@local.test / wrong
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc="), 535);
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc="), 535);
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc="), 421);
    assert!(c.closed());
    // The limit is per IP, across connections.
    let mut c = Smtp::connect(s.port("submission-plain"));
    assert_eq!(c.cmd("EHLO x"), 250);
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc="), 421);
}

#[test]
fn shutdown_answers_421_to_idle_sessions() {
    let mut s = Server::start();
    let mut c = Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO x"), 250);
    assert!(s.stop().success());
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.3.2"), "{text}");
}

#[test]
fn configured_certificate_and_ipv6_listener() {
    // First run generates a self-signed pair; a second server is configured with it as [tls].
    let first = Server::start();
    let data = first.dir.path().join("data");
    let (cert, key) = (
        data.join("selfsigned-cert.pem"),
        data.join("selfsigned-key.pem"),
    );
    assert!(cert.exists() && key.exists());
    let extra = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[listener]]\nname = \"smtp6\"\nkind = \"smtp\"\nbind = \"[::1]:0\"\n",
        cert.display(),
        key.display()
    );
    // [tls] and [[listener]] must come before the [limits] table the harness appends to: use
    // a config of our own.
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(&dir.path().join("data"), "", "", "")
        .replace("[domains]", &format!("{extra}\n[domains]"));
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_postrider"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut ports = std::collections::HashMap::new();
    for line in std::io::BufRead::lines(out) {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        let p: Vec<&str> = line.split(' ').collect();
        ports.insert(p[1].to_string(), p[2].to_string());
    }
    let v6: std::net::SocketAddr = ports["smtp6"].parse().unwrap();
    assert!(v6.is_ipv6());
    let result = python(
        r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP('::1', int(os.environ['PORT'])) as c:
    c.starttls(context=ctx)
    der = c.sock.getpeercert(binary_form=True)
    print(len(der) > 100)
    c.ehlo()
    print(c.noop()[0])
"#,
        &[("PORT", v6.port().to_string())],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        result.split_whitespace().collect::<Vec<_>>(),
        ["True", "250"]
    );
    // It served the configured pair: nothing was generated in its own data directory.
    assert!(!dir.path().join("data/selfsigned-cert.pem").exists());
}
