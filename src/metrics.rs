//! Every Prometheus metric postrider exports, in one place (as mox does), with its labels.
//!
//! Names follow Prometheus conventions: `_total` for counters, base units (seconds, bytes).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

pub struct Metrics {
    pub registry: Registry,
    /// SMTP connections accepted, by listener name.
    pub smtp_connections: IntCounterVec,
    /// SMTP sessions currently open, by listener name.
    pub smtp_sessions_active: IntGaugeVec,
    /// Connections refused before the greeting, by listener and reason (`max_connections`,
    /// `per_ip`).
    pub connections_refused: IntCounterVec,
    /// Messages accepted (250 after DATA/BDAT), by listener name.
    pub messages_accepted: IntCounterVec,
    /// Messages or recipients refused, by reason (`unknown_user`, `relay_denied`, `too_big`,
    /// `bare_line_ending`, `line_too_long`, `too_many_hops`, `storage`, `auth_required`).
    pub messages_rejected: IntCounterVec,
    /// AUTH attempts by result (`success`, `failure`, `blocked`: over the per-IP failure rate).
    pub auth_attempts: IntCounterVec,
    /// Seconds from end of data to the durable enqueue (the group-commit wait).
    pub enqueue_seconds: Histogram,
    /// Messages in the queue (set at scrape time).
    pub queue_messages: IntGauge,
    /// Queue entries by state (`leased`: being delivered now), set at scrape time.
    pub queue_entries: IntGaugeVec,
    /// Local deliveries by result (`delivered`, `deferred`, `failed`, `duplicate`).
    pub local_deliveries: IntCounterVec,
    /// Delivery attempts per recipient, by transport (`local`, `remote`) and result
    /// (`delivered`, `deferred`, `failed`).
    pub delivery_attempts: IntCounterVec,
    /// Seconds one delivery attempt took (connection setup included for remote), by transport.
    pub delivery_seconds: HistogramVec,
    /// Seconds from arrival in the queue to final delivery, by transport.
    pub delivery_delay_seconds: HistogramVec,
    /// DNS lookup time, by record type (`MX`, `A/AAAA`).
    pub dns_lookup_seconds: HistogramVec,
    /// Age of the oldest message in the queue, set at scrape time.
    pub queue_oldest_age_seconds: prometheus::Gauge,
    /// DSNs queued, by action (`failed`, `delayed`, `delivered`, `relayed`).
    pub dsn_sent: IntCounterVec,
    /// Flushes performed by the queue's group commit.
    pub queue_flushes: IntCounter,
    pub queue_checkpoints: IntCounter,
    /// POP3 sessions accepted, by listener name.
    pub pop3_sessions: IntCounterVec,
    /// POP3 logins by result (`success`, `failure`, `in_use`, `blocked`).
    pub pop3_logins: IntCounterVec,
    /// Messages sent by RETR (TOP not counted).
    pub pop3_retrieved: IntCounter,
    /// Messages removed in the UPDATE state.
    pub pop3_deleted: IntCounter,
    /// Octets of message data sent (RETR and TOP, after byte-stuffing).
    pub pop3_bytes_sent: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric definition");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    fn new() -> Metrics {
        // Definitions are static; `expect` here can only fire on a programming error, which
        // the metrics unit test catches.
        let r = Registry::new();
        let enqueue_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "postrider_enqueue_seconds",
                "Time from end of data to durable enqueue",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(enqueue_seconds.clone()))
            .expect("registered once");
        let queue_messages =
            IntGauge::new("postrider_queue_messages", "Messages in the queue").expect("valid");
        r.register(Box::new(queue_messages.clone()))
            .expect("registered once");
        let queue_flushes = IntCounter::new(
            "postrider_queue_flushes_total",
            "Group-commit rounds (each one fdatasync or one checkpoint) of the queue and store",
        )
        .expect("valid");
        r.register(Box::new(queue_flushes.clone()))
            .expect("registered once");
        let queue_checkpoints = IntCounter::new(
            "postrider_queue_checkpoints_total",
            "Of the group-commit rounds, those that flushed sled itself rather than the journal",
        )
        .expect("valid");
        r.register(Box::new(queue_checkpoints.clone()))
            .expect("registered once");
        Metrics {
            smtp_connections: counter_vec(
                &r,
                "postrider_smtp_connections_total",
                "SMTP connections accepted",
                &["listener"],
            ),
            smtp_sessions_active: gauge_vec(
                &r,
                "postrider_smtp_sessions_active",
                "SMTP sessions open",
                &["listener"],
            ),
            connections_refused: counter_vec(
                &r,
                "postrider_connections_refused_total",
                "Connections refused at connect",
                &["listener", "reason"],
            ),
            messages_accepted: counter_vec(
                &r,
                "postrider_messages_accepted_total",
                "Messages accepted and queued",
                &["listener"],
            ),
            messages_rejected: counter_vec(
                &r,
                "postrider_messages_rejected_total",
                "Messages or recipients refused",
                &["reason"],
            ),
            auth_attempts: counter_vec(
                &r,
                "postrider_auth_attempts_total",
                "AUTH attempts",
                &["result"],
            ),
            enqueue_seconds,
            queue_messages,
            queue_entries: gauge_vec(
                &r,
                "postrider_queue_entries",
                "Queue index entries by state",
                &["state"],
            ),
            local_deliveries: counter_vec(
                &r,
                "postrider_local_deliveries_total",
                "Local mailbox deliveries",
                &["result"],
            ),
            delivery_attempts: counter_vec(
                &r,
                "postrider_delivery_attempts_total",
                "Delivery attempts per recipient",
                &["transport", "result"],
            ),
            delivery_seconds: histogram_vec(
                &r,
                "postrider_delivery_attempt_seconds",
                "Duration of one delivery attempt",
                &["transport"],
                &[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
                ],
            ),
            delivery_delay_seconds: histogram_vec(
                &r,
                "postrider_delivery_delay_seconds",
                "Time from arrival to final delivery",
                &["transport"],
                &[
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 60.0, 600.0, 3600.0, 86400.0, 432000.0,
                ],
            ),
            dns_lookup_seconds: histogram_vec(
                &r,
                "postrider_dns_lookup_seconds",
                "DNS lookup time",
                &["type"],
                &[0.0001, 0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0],
            ),
            queue_oldest_age_seconds: {
                let g = prometheus::Gauge::new(
                    "postrider_queue_oldest_age_seconds",
                    "Age of the oldest queued message",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            dsn_sent: counter_vec(
                &r,
                "postrider_dsn_sent_total",
                "Delivery status notifications queued",
                &["action"],
            ),
            queue_flushes,
            queue_checkpoints,
            pop3_sessions: counter_vec(
                &r,
                "postrider_pop3_sessions_total",
                "POP3 sessions",
                &["listener"],
            ),
            pop3_logins: counter_vec(
                &r,
                "postrider_pop3_logins_total",
                "POP3 logins",
                &["result"],
            ),
            pop3_retrieved: counter(
                &r,
                "postrider_pop3_retrieved_total",
                "Messages retrieved over POP3",
            ),
            pop3_deleted: counter(
                &r,
                "postrider_pop3_deleted_total",
                "Messages deleted over POP3",
            ),
            pop3_bytes_sent: counter(
                &r,
                "postrider_pop3_bytes_sent_total",
                "Message octets sent over POP3",
            ),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[cfg(test)]
mod tests {
    #[test]
    fn all_metrics_register_and_render() {
        super::METRICS
            .messages_rejected
            .with_label_values(&["relay_denied"])
            .inc();
        let text = super::METRICS.render();
        assert!(text.contains("postrider_messages_rejected_total{reason=\"relay_denied\"}"));
    }
}
