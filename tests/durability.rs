//! Crash safety: every message that got a 250 survives `kill -9`, exactly once.

mod common;
use common::Server;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sends messages on one connection until the server dies; records the acknowledged subjects.
fn sender(addr: SocketAddr, thread: usize, acked: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let run = || -> std::io::Result<()> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let mut reply = || -> std::io::Result<u16> {
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return line[..3]
                        .parse()
                        .map_err(|_| std::io::ErrorKind::InvalidData.into());
                }
            }
        };
        reply()?;
        w.write_all(b"EHLO crash.example\r\n")?;
        reply()?;
        for n in 0..2000 {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let subject = format!("crash-{thread}-{n}");
            w.write_all(b"MAIL FROM:<load@example.org>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n")?;
            for _ in 0..3 {
                reply()?;
            }
            let body = format!("{}\r\n", "z".repeat(75)).repeat(20);
            w.write_all(format!("Subject: {subject}\r\n\r\n{body}.\r\n").as_bytes())?;
            if reply()? == 250 {
                acked.lock().unwrap().push(subject);
            }
        }
        Ok(())
    };
    let _ = run();
}

#[test]
fn kill_9_mid_burst_loses_nothing_acknowledged_and_duplicates_nothing() {
    let mut s = Server::start();
    s.add_user("alice@local.test", "pw");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.port("smtp");
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (a, st) = (acked.clone(), stop.clone());
            std::thread::spawn(move || sender(addr, t, a, st))
        })
        .collect();
    // Let a burst build up, with deliveries in flight, then pull the plug.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 1500 {
        assert!(std::time::Instant::now() < deadline, "burst too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let acked = acked.lock().unwrap().clone();
    s.launch();
    s.wait_queue(0);
    let subjects: Vec<String> = s
        .mailbox("alice@local.test")
        .iter()
        .map(|m| m["subject"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut counts = std::collections::HashMap::new();
    for sub in &subjects {
        *counts.entry(sub.clone()).or_insert(0) += 1;
    }
    let lost: Vec<_> = acked.iter().filter(|a| !counts.contains_key(*a)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert!(subjects.len() >= acked.len());
}

#[test]
fn clean_shutdown_keeps_queued_mail() {
    let mut s = Server::start_with("\"127.0.0.0/8\"", "", "");
    let mut c = common::Smtp::connect(s.port("smtp"));
    assert_eq!(c.cmd("EHLO x"), 250);
    assert_eq!(c.cmd("MAIL FROM:<a@local.test>"), 250);
    assert_eq!(c.cmd("RCPT TO:<b@remote.example>"), 250);
    assert_eq!(c.cmd("DATA"), 354);
    c.send(b"Subject: keep me\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    drop(c);
    // Wait for the first delivery attempt (remote delivery defers), then stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let before = loop {
        let q = s.wait_queue(1);
        if q[0]["recipients"][0]["state"] == "deferred" {
            break q;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never attempted: {q:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(s.stop().success(), "SIGTERM exits cleanly");
    s.launch();
    let after = s.wait_queue(1);
    assert_eq!(before[0]["id"], after[0]["id"]);
    assert_eq!(after[0]["recipients"][0]["state"], "deferred");
}
