//! Micro-benchmarks of the pure SMTP codec: command parsing and DATA decoding.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use postrider::smtp::proto::{DataReader, parse_command};

fn commands(c: &mut Criterion) {
    let lines: &[&[u8]] = &[
        b"EHLO client.example.org",
        b"MAIL FROM:<sender@example.org> SIZE=2048 BODY=8BITMIME",
        b"RCPT TO:<user+tag@local.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user+2Btag@local.test",
        b"DATA",
        b"BDAT 65536 LAST",
    ];
    let mut g = c.benchmark_group("parse_command");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("typical transaction", |b| {
        b.iter(|| {
            for l in lines {
                let _ = black_box(parse_command(black_box(l)));
            }
        })
    });
    g.finish();
}

fn message(size: usize) -> Vec<u8> {
    let mut m = b"Subject: bench\r\nFrom: a@example.org\r\n\r\n".to_vec();
    while m.len() < size {
        m.extend_from_slice(b"..a stuffed line of text that is long enough to look like prose\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn data(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_reader");
    for size in [2 * 1024, 100 * 1024] {
        let m = message(size);
        g.throughput(Throughput::Bytes(m.len() as u64));
        g.bench_function(format!("{} KiB", size / 1024), |b| {
            b.iter(|| {
                let mut r = DataReader::new(1 << 20);
                black_box(r.feed(black_box(&m)));
                black_box(r.finish().map(|v| v.len()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, commands, data);
criterion_main!(benches);
