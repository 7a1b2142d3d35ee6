//! Durable enqueue throughput with 1, 8 and 64 concurrent writers: shows group commit at work
//! (every enqueue returns only after its data is fsynced; writers share flushes).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postrider_queue::{Envelope, Queue, Recipient};
use std::time::{Duration, Instant};

fn enqueue(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = Queue::open(dir.path()).expect("open queue");
    let body = vec![b'x'; 2048];
    let mut g = c.benchmark_group("queue_enqueue_2KiB");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    for writers in [1usize, 8, 64] {
        g.bench_function(format!("{writers} writers"), |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(writers as u64);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..writers {
                        let (q, body) = (q.clone(), &body);
                        s.spawn(move || {
                            for _ in 0..per {
                                let id = q.new_id().expect("id");
                                let env = Envelope::new(
                                    "a@example.org",
                                    vec![Recipient::new("b@local.test")],
                                    2048,
                                );
                                q.enqueue(id, &env, body).expect("enqueue");
                            }
                        });
                    }
                });
                // Normalise to `iters` operations.
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per * writers as u64) as f64)
            })
        });
    }
    g.finish();
    let st = q.flush_stats();
    eprintln!(
        "group commit: {} enqueues acknowledged by {} flushes ({:.1} per flush)",
        st.waiters,
        st.flushes,
        st.waiters as f64 / st.flushes.max(1) as f64
    );
}

criterion_group!(benches, enqueue);
criterion_main!(benches);
