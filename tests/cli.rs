//! The command line: config commands, and the admin-API-backed commands against a running server.

mod common;
use common::Server;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_postrider"))
}

#[test]
fn config_default_is_valid_and_check_reports_every_error() {
    let out = bin().args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &out.stdout).unwrap();
    let o = bin().args(["config", "check"]).arg(&good).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bad = dir.path().join("bad.toml");
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .replace(
            "max_recipients = 1000",
            "max_recipients = 5\nmax_recipent = 7",
        )
        .replace("level = \"info\"", "level = \"info\"\nformatt = \"x\"");
    std::fs::write(&bad, text).unwrap();
    let o = bin().args(["config", "check"]).arg(&bad).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("limits.max_recipent: unknown key"), "{err}");
    assert!(err.contains("log.formatt: unknown key"), "{err}");
}

#[test]
fn cli_without_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        common::config_text(&dir.path().join("data"), "", "", "")
            .replace("127.0.0.1:0\"\nadmin_token", "127.0.0.1:1\"\nadmin_token"),
    )
    .unwrap();
    let o = bin()
        .args(["user", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not running"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn users_aliases_queue_and_mailbox_commands() {
    let s = Server::start();
    s.add_user("alice@local.test", "pw");
    let o = s.cli(&["user", "add", "alice@local.test", "--password", "x"]);
    assert!(!o.status.success(), "duplicate account refused");
    let mut child = bin()
        .args([
            "user",
            "add",
            "bob@local.test",
            "--password-stdin",
            "--config",
        ])
        .arg(&s.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"bobpw\n").unwrap();
    assert!(child.wait().unwrap().success());
    let users = s.cli_ok(&["user", "list"]);
    assert!(
        users.contains("alice@local.test\n") && users.contains("bob@local.test\n"),
        "{users}"
    );
    assert!(users.contains("admin@local.test (no password)"), "{users}");
    s.cli_ok(&["user", "passwd", "bob@local.test", "--password", "newpw"]);
    s.cli_ok(&["alias", "add", "sales@local.test", "alice@local.test"]);
    assert_eq!(
        s.cli_ok(&["alias", "list"]),
        "sales@local.test -> alice@local.test\n"
    );

    // Mail to the alias lands in alice's INBOX; mail to a remote domain waits in the queue.
    let mut c = common::Smtp::connect(s.port("submission-plain"));
    assert_eq!(c.cmd("EHLO x"), 250);
    // AUTH PLAIN bob@local.test / newpw
    assert_eq!(c.cmd("AUTH PLAIN AGJvYkBsb2NhbC50ZXN0AG5ld3B3"), 235);
    assert_eq!(c.cmd("MAIL FROM:<bob@local.test>"), 250);
    assert_eq!(c.cmd("RCPT TO:<sales@local.test>"), 250);
    assert_eq!(c.cmd("RCPT TO:<far@remote.example>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: Quarterly\r\n\r\nnumbers\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    s.wait_mailbox("alice@local.test", 1);
    let listing = s.cli_ok(&["mailbox", "list", "alice@local.test"]);
    let fields: Vec<&str> = listing.trim_end().split('\t').collect();
    assert_eq!(fields[0], "1");
    assert_eq!(fields[4], "Quarterly");
    let raw = s
        .cli(&["mailbox", "show", "alice@local.test", "1", "INBOX"])
        .stdout;
    assert!(raw.ends_with(b"\r\n\r\nnumbers\r\n"));
    assert!(String::from_utf8_lossy(&raw).contains("Delivered-To: sales@local.test\r\n"));

    // The store write lands before the queue records the outcome: wait for the latter.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let q = loop {
        let q = s.wait_queue(1);
        if q[0]["recipients"][1]["state"] == "deferred" {
            break q;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never attempted: {q:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let id = q[0]["id"].as_str().unwrap().to_string();
    let listing = s.cli_ok(&["queue", "list"]);
    assert!(
        listing.contains(&id) && listing.contains("far@remote.example(deferred)"),
        "{listing}"
    );
    let show = s.cli_ok(&["queue", "show", &id]);
    assert!(show.contains("sales@local.test delivered"), "{show}");
    assert!(show.contains("far@remote.example deferred"), "{show}");
    let json: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["queue", "show", &id, "--json"])).unwrap();
    assert_eq!(json["sender"], "bob@local.test");
    assert!(
        !s.cli(&["queue", "show", "FFFFFFFFFFFFFFFF"])
            .status
            .success()
    );

    s.cli_ok(&["alias", "del", "sales@local.test"]);
    s.cli_ok(&["user", "del", "bob@local.test"]);
    assert!(!s.cli_ok(&["user", "list"]).contains("bob@"));
}

#[test]
fn metrics_and_health_and_token() {
    let s = Server::start();
    let base = format!("http://{}", s.port("http"));
    let h = ureq::get(&format!("{base}/healthz"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(h, "ok\n");
    let mut c = common::Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO x"), 250);
    assert_eq!(c.cmd("MAIL FROM:<a@b.example>"), 250);
    assert_eq!(c.cmd("RCPT TO:<x@remote.example>"), 554);
    let m = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        m.contains("postrider_smtp_connections_total{listener=\"smtp\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("postrider_messages_rejected_total{reason=\"relay_denied\"} 1"),
        "{m}"
    );
    assert!(m.contains("postrider_queue_messages 0"), "{m}");
    match ureq::get(&format!("{base}/api/users")).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("API without token: {other:?}"),
    }
}

#[test]
fn shipped_configs_are_valid() {
    let o = bin()
        .args([
            "config",
            "check",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/postrider.container.toml"
            ),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn queue_hold_release_flush_delete() {
    let s = Server::start_with("\"127.0.0.0/8\"", "", "");
    let mut c = common::Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO x"), 250);
    for rcpt in ["far@remote.example", "other@elsewhere.example"] {
        assert_eq!(c.cmd("MAIL FROM:<a@local.test>"), 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")), 250);
        assert_eq!(c.cmd("DATA"), 354);
        c.send(b"Subject: q\r\n\r\nx\r\n.\r\n");
        assert_eq!(c.reply().0, 250);
    }
    // Wait for both first attempts (remote delivery defers).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let attempts =
        |s: &Server, id: &str| s.api(&format!("/queue/{id}"))["attempts"].as_u64().unwrap();
    let list = loop {
        let l = s.wait_queue(2);
        if l.iter().all(|e| e["attempts"].as_u64() >= Some(1)) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let id = list
        .iter()
        .find(|e| e["recipients"][0]["address"] == "far@remote.example")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let only_remote = s.cli_ok(&["queue", "list", "--domain", "remote.example"]);
    assert_eq!(only_remote.lines().count(), 1, "{only_remote}");
    assert!(only_remote.starts_with(&id));
    assert_eq!(
        s.cli_ok(&["queue", "list", "--state", "deferred"])
            .lines()
            .count(),
        2
    );
    assert_eq!(
        s.cli_ok(&["queue", "list", "--older-than", "1h"])
            .lines()
            .count(),
        0
    );

    s.cli_ok(&["queue", "hold", &id]);
    assert!(
        s.cli_ok(&["queue", "list", "--state", "held"])
            .starts_with(&id)
    );
    // Held messages are not retried by a flush.
    let before = attempts(&s, &id);
    assert!(
        s.cli_ok(&["queue", "flush"])
            .starts_with("1 messages due now")
    );
    s.cli_ok(&["queue", "release", &id]);
    while attempts(&s, &id) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "release did not retry"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Flush by domain makes that message due now: another attempt.
    let n = attempts(&s, &id);
    assert!(
        s.cli_ok(&["queue", "flush", "--domain", "remote.example"])
            .starts_with("1 messages")
    );
    while attempts(&s, &id) == n {
        assert!(std::time::Instant::now() < deadline, "flush did not retry");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s.cli_ok(&["queue", "delete", &id]);
    assert_eq!(s.wait_queue(1).len(), 1);
    assert!(!s.cli(&["queue", "show", &id]).status.success());
    assert!(!s.cli(&["queue", "delete", &id]).status.success());
}
