//! Configuration: one TOML file, every key documented in the README's config reference.
//!
//! `postrider serve` without `--config` runs on [`DEFAULT_CONFIG`], which is also what
//! `postrider config default` prints, so the documented default and the running one cannot drift.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded default: loopback only, local domain `localhost`.
pub const DEFAULT_CONFIG: &str = r#"# postrider configuration (the embedded default; `postrider config default` prints it).

[server]
hostname = "localhost"
data_dir = "./postrider-data"
# worker_threads = 0        # async workers; 0 = one per core but one (at least one)

# Port 25 role: mail for local domains from anyone, relay only for relay.networks or AUTH.
[[listener]]
name = "smtp"
kind = "smtp"
bind = "127.0.0.1:2525"

# Port 587 role: AUTH required before MAIL. Plaintext AUTH is allowed here only because the
# listener is on loopback; on a public address use STARTTLS (always offered) instead.
[[listener]]
name = "submission"
kind = "submission"
bind = "127.0.0.1:2587"
allow_plaintext_auth = true

# POP3 for mail clients (USER/PASS allowed here because the listener is on loopback).
[[listener]]
name = "pop3"
kind = "pop3"
bind = "127.0.0.1:2110"
allow_plaintext_auth = true

# [[listener]]
# name = "submissions"
# kind = "submissions"    # port 465 role: implicit TLS
# bind = "127.0.0.1:2465"

# [tls]
# cert = "/etc/postrider/cert.pem"   # PEM chain; without [tls] a self-signed certificate
# key = "/etc/postrider/key.pem"     # is generated into data_dir (with a warning).

[domains]
local = ["localhost"]
# postmaster = "admin@localhost"    # where postmaster@<every local domain> goes

[relay]
networks = ["127.0.0.1/32", "::1/128"]

[limits]
max_message_size = 26214400
max_recipients = 1000
max_connections = 1000
max_connections_per_ip = 100
max_bad_commands = 20
max_received_headers = 50
command_timeout = "5m"
data_timeout = "10m"
auth_failure_delay = "1s"
auth_failures_per_minute = 10

[queue]
retry_initial = "5m"
retry_max = "1h"
lifetime = "5d"
delay_warning = "off"

# Outbound delivery (mail for domains that are not local).
[delivery]
port = 25                          # SMTP port of MX hosts; change only for tests
# helo_name = "mail.example.com"   # default: server.hostname
connect_timeout = "30s"
greeting_timeout = "5m"            # RFC 5321 4.5.3.2.1
command_timeout = "5m"             # MAIL, RCPT (4.5.3.2.2-3)
data_timeout = "10m"               # 354 wait 2m, blocks 3m, final reply 10m (4.5.3.2.4-6)
concurrency_per_destination = 20
max_connections = 200
connection_reuse = "2s"            # keep an idle connection this long for the next message
# ca_file = "/etc/postrider/extra-ca.pem"   # trusted in addition to the Mozilla roots (tls = "verify")

# [dns]
# nameservers = ["127.0.0.1:5353"]  # default: the system resolver (/etc/resolv.conf)
# timeout = "5s"

# Static routes. The first route whose domains match the recipient's domain wins; "*" matches
# every non-local domain (a smarthost). Without a matching route, DNS (MX) decides.
# [[route]]
# domains = ["*"]
# next_hop = "smtp.provider.example:587"
# tls = "required"                 # "none" | "opportunistic" (default) | "required" | "verify"
# auth_username = "user@example.com"
# auth_password = "secret"

[http]
bind = "127.0.0.1:9025"
# admin_token = "..."   # default: generated into data_dir/admin.token (mode 0600)

[log]
level = "info"
format = "text"
"#;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub domains: DomainsConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// Outbound SMTP. Timeouts follow RFC 5321 §4.5.3.2 by default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Port used for MX hosts (25; tests point it at their own servers).
    pub port: u16,
    /// Name sent in EHLO/HELO; defaults to `server.hostname`.
    pub helo_name: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub greeting_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Open connections per destination (one MX domain or one route's next hop).
    pub concurrency_per_destination: usize,
    /// Open outbound connections in all.
    pub max_connections: usize,
    /// How long an idle connection waits for the next message to the same destination.
    #[serde(with = "humantime_serde")]
    pub connection_reuse: Duration,
    /// Extra trusted CA certificates (PEM) for routes with `tls = "verify"`.
    pub ca_file: Option<PathBuf>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            helo_name: None,
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            concurrency_per_destination: 20,
            max_connections: 200,
            connection_reuse: Duration::from_secs(2),
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers (`ip:port`) replacing the system resolver's.
    pub nameservers: Vec<SocketAddr>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// How hard to insist on TLS towards a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, any certificate (encryption without authentication, as is usual
    /// between MTAs); plaintext when not offered or when the handshake fails.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed (any certificate); otherwise defer, never send in clear.
    Required,
    /// STARTTLS with a certificate valid for the next hop's name; otherwise defer.
    Verify,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Recipient domains (case-insensitive) or `"*"` for every non-local domain.
    pub domains: Vec<String>,
    /// `host:port` (host a name or an IP address; IPv6 in brackets). No MX lookup is made.
    pub next_hop: String,
    #[serde(default)]
    pub tls: TlsPolicy,
    #[serde(default)]
    pub auth_username: Option<String>,
    #[serde(default)]
    pub auth_password: Option<String>,
}

impl RouteConfig {
    pub fn matches(&self, domain: &str) -> bool {
        self.domains
            .iter()
            .any(|d| d == "*" || d.eq_ignore_ascii_case(domain))
    }

    /// `(host, port)` of the next hop.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let (h, p) = self.next_hop.rsplit_once(':')?;
        let port = p.parse().ok()?;
        let h = h.trim_start_matches('[').trim_end_matches(']');
        (!h.is_empty()).then(|| (h.to_string(), port))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Our name in the greeting, EHLO, Received and the self-signed certificate.
    pub hostname: String,
    pub data_dir: PathBuf,
    /// Async worker threads (protocol handling). `0` = one per core but one: the group-commit
    /// thread, local delivery and sled's I/O threads want a core too (measured on 2 cores: one
    /// worker instead of two accepts more mail for ~10% less CPU per message).
    #[serde(default)]
    pub worker_threads: usize,
}

impl ServerConfig {
    /// The number of async workers to start (see `worker_threads`).
    pub fn workers(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Port 25 role (RFC 5321).
    Smtp,
    /// Port 587 role (RFC 6409): AUTH before MAIL.
    Submission,
    /// Port 465 role (RFC 8314): implicit TLS, AUTH before MAIL.
    Submissions,
    /// POP3 (port 110 role, RFC 1939) with STLS.
    Pop3,
    /// POP3 over implicit TLS (port 995 role, RFC 8314).
    Pop3s,
}

impl ListenerKind {
    pub fn is_pop3(self) -> bool {
        matches!(self, ListenerKind::Pop3 | ListenerKind::Pop3s)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    /// Allow AUTH without TLS; honoured only when the client is on loopback.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DomainsConfig {
    #[serde(default = "default_local")]
    pub local: Vec<String>,
    /// Account that receives `postmaster@` every local domain. When unset, postmaster mail goes
    /// to the account `postmaster@<first local domain>`, created without a password (it cannot
    /// log in until `postrider user passwd` sets one) so that such mail is never refused or lost.
    #[serde(default)]
    pub postmaster: Option<String>,
}

fn default_local() -> Vec<String> {
    vec!["localhost".into()]
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig {
            local: default_local(),
            postmaster: None,
        }
    }
}

impl DomainsConfig {
    pub fn is_local(&self, domain: &str) -> bool {
        self.local.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The account postmaster mail is delivered to.
    pub fn postmaster_account(&self) -> String {
        match &self.postmaster {
            Some(p) => p.to_lowercase(),
            None => format!(
                "postmaster@{}",
                self.local
                    .first()
                    .map(|s| s.as_str())
                    .unwrap_or("localhost")
            )
            .to_lowercase(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Clients in these networks may relay to any domain without AUTH (Postfix's mynetworks).
    #[serde(default = "default_networks")]
    pub networks: Vec<IpNet>,
}

fn default_networks() -> Vec<IpNet> {
    ["127.0.0.1/32", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            networks: default_networks(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Octets; announced in EHLO SIZE and enforced while reading.
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Protocol errors in one session before it is closed with 421.
    pub max_bad_commands: u32,
    /// Loop protection: messages with more Received headers are refused (Postfix: 50).
    pub max_received_headers: usize,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Delay before answering a failed AUTH (slows password guessing).
    #[serde(with = "humantime_serde")]
    pub auth_failure_delay: Duration,
    /// Failed AUTH attempts allowed per client IP and minute; past that the session is closed
    /// with 421 (brute-force protection across connections).
    pub auth_failures_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_bad_commands: 20,
            max_received_headers: 50,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            auth_failure_delay: Duration::from_secs(1),
            auth_failures_per_minute: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// "off" or a duration after which a delay warning DSN is sent.
    pub delay_warning: String,
}

impl QueueConfig {
    /// `delay_warning` as a duration; `None` when "off".
    pub fn delay_warning_after(&self) -> Option<Duration> {
        if self.delay_warning == "off" {
            None
        } else {
            humantime::parse_duration(&self.delay_warning).ok()
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_initial: Duration::from_secs(300),
            retry_max: Duration::from_secs(3600),
            lifetime: Duration::from_secs(5 * 86400),
            delay_warning: "off".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: SocketAddr,
    #[serde(default)]
    pub admin_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9025)),
            admin_token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing-subscriber filter such as "info" or "postrider=debug". RUST_LOG overrides it.
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Durations as humantime strings ("500ms", "5m", "5d").
mod humantime_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); use e.g. \"30s\", \"5m\""
            ))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl Config {
    /// The embedded default.
    pub fn default_config() -> Config {
        // The embedded text is covered by a unit test; failing here is a build defect.
        Config::parse(DEFAULT_CONFIG).expect("embedded default config is valid")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None => Ok(Config::default_config()),
        }
    }

    /// Parses and validates, collecting every error found (each with its key path).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        // Unknown keys first, all of them, so a typo list comes out in one go.
        let value: toml::Value = match toml::from_str(text) {
            Ok(v) => v,
            Err(e) => return Err(ConfigError::Invalid(vec![e.to_string().trim().to_string()])),
        };
        errors.extend(unknown_keys(&value));
        let cfg: Option<Config> = match value.try_into::<Config>() {
            Ok(c) => Some(c),
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains("unknown field") || errors.is_empty() {
                    errors.push(msg.trim().to_string());
                }
                None
            }
        };
        if let Some(c) = &cfg {
            errors.extend(c.validate());
        }
        match (cfg, errors.is_empty()) {
            (Some(c), true) => Ok(c),
            _ => Err(ConfigError::Invalid(errors)),
        }
    }

    /// Semantic checks that types alone cannot express.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.server.hostname.trim().is_empty() {
            e.push("server.hostname: must not be empty".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if !names.insert(l.name.clone()) {
                e.push(format!("listener[{i}].name: duplicate name {:?}", l.name));
            }
        }
        if self.domains.local.is_empty() {
            e.push("domains.local: at least one local domain is required".into());
        }
        for (i, d) in self.domains.local.iter().enumerate() {
            if !crate::smtp::proto::valid_domain(d) {
                e.push(format!("domains.local[{i}]: not a valid domain: {d:?}"));
            }
        }
        if let Some(p) = &self.domains.postmaster {
            match crate::smtp::proto::parse_address(p) {
                Err(_) => e.push(format!("domains.postmaster: not an address: {p:?}")),
                Ok(a) if !self.domains.is_local(&a.domain) => e.push(format!(
                    "domains.postmaster: {p:?} is not in a local domain (it must be a local account)"
                )),
                Ok(_) => {}
            }
        }
        if self.limits.max_message_size < 1024 {
            e.push("limits.max_message_size: must be at least 1024".into());
        }
        if self.limits.max_recipients < 100 {
            e.push("limits.max_recipients: RFC 5321 4.5.3.1.8 requires at least 100".into());
        }
        if self.limits.max_connections == 0 {
            e.push("limits.max_connections: must be at least 1".into());
        }
        if self.limits.max_connections_per_ip == 0 {
            e.push("limits.max_connections_per_ip: must be at least 1".into());
        }
        if self.limits.auth_failures_per_minute == 0 {
            e.push("limits.auth_failures_per_minute: must be at least 1".into());
        }
        if self.limits.command_timeout.is_zero() {
            e.push("limits.command_timeout: must be positive".into());
        }
        if self.limits.data_timeout.is_zero() {
            e.push("limits.data_timeout: must be positive".into());
        }
        if self.queue.retry_initial.is_zero() {
            e.push("queue.retry_initial: must be positive".into());
        }
        if self.queue.retry_max < self.queue.retry_initial {
            e.push("queue.retry_max: must be at least queue.retry_initial".into());
        }
        if self.queue.delay_warning != "off"
            && humantime::parse_duration(&self.queue.delay_warning).is_err()
        {
            e.push(format!(
                "queue.delay_warning: \"off\" or a duration, not {:?}",
                self.queue.delay_warning
            ));
        }
        if self.delivery.concurrency_per_destination == 0 {
            e.push("delivery.concurrency_per_destination: must be at least 1".into());
        }
        if self.delivery.max_connections == 0 {
            e.push("delivery.max_connections: must be at least 1".into());
        }
        for (k, d) in [
            ("delivery.connect_timeout", self.delivery.connect_timeout),
            ("delivery.greeting_timeout", self.delivery.greeting_timeout),
            ("delivery.command_timeout", self.delivery.command_timeout),
            ("delivery.data_timeout", self.delivery.data_timeout),
            ("dns.timeout", self.dns.timeout),
        ] {
            if d.is_zero() {
                e.push(format!("{k}: must be positive"));
            }
        }
        if let Some(p) = &self.delivery.ca_file
            && !p.exists()
        {
            e.push(format!("delivery.ca_file: file not found: {}", p.display()));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.domains.is_empty() {
                e.push(format!("route[{i}].domains: at least one domain or \"*\""));
            }
            if r.host_port().is_none() {
                e.push(format!(
                    "route[{i}].next_hop: expected host:port, not {:?}",
                    r.next_hop
                ));
            }
            if r.auth_username.is_some() != r.auth_password.is_some() {
                e.push(format!(
                    "route[{i}]: auth_username and auth_password go together"
                ));
            }
            if r.auth_username.is_some()
                && !matches!(r.tls, TlsPolicy::Required | TlsPolicy::Verify)
            {
                e.push(format!(
                    "route[{i}].tls: a route with AUTH credentials needs tls = \"required\" or \"verify\" (credentials never go in clear)"
                ));
            }
        }
        if let Some(t) = &self.http.admin_token
            && t.len() < 16
        {
            e.push("http.admin_token: use at least 16 characters".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            e.push(format!(
                "log.format: \"text\" or \"json\", not {:?}",
                self.log.format
            ));
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            e.push(format!("log.level: {err}"));
        }
        if let Some(tls) = &self.tls {
            for (k, p) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if !p.exists() {
                    e.push(format!("{k}: file not found: {}", p.display()));
                }
            }
        }
        e
    }

    /// Where the CLI finds the admin API: the configured address, or the one the running
    /// server wrote to `data_dir/admin.addr` when the config binds port 0.
    pub fn admin_addr(&self) -> SocketAddr {
        if self.http.bind.port() == 0
            && let Ok(s) = std::fs::read_to_string(self.server.data_dir.join("admin.addr"))
            && let Ok(a) = s.trim().parse()
        {
            return a;
        }
        self.http.bind
    }
}

/// Every key the config knows, per section: used to report all unknown keys at once (serde's
/// `deny_unknown_fields` stops at the first).
const KNOWN_KEYS: &[(&str, &[&str])] = &[
    ("server", &["hostname", "data_dir", "worker_threads"]),
    (
        "listener",
        &["name", "kind", "bind", "allow_plaintext_auth"],
    ),
    ("tls", &["cert", "key"]),
    ("domains", &["local", "postmaster"]),
    ("relay", &["networks"]),
    (
        "limits",
        &[
            "max_message_size",
            "max_recipients",
            "max_connections",
            "max_connections_per_ip",
            "max_bad_commands",
            "max_received_headers",
            "command_timeout",
            "data_timeout",
            "auth_failure_delay",
            "auth_failures_per_minute",
        ],
    ),
    (
        "queue",
        &["retry_initial", "retry_max", "lifetime", "delay_warning"],
    ),
    (
        "delivery",
        &[
            "port",
            "helo_name",
            "connect_timeout",
            "greeting_timeout",
            "command_timeout",
            "data_timeout",
            "concurrency_per_destination",
            "max_connections",
            "connection_reuse",
            "ca_file",
        ],
    ),
    ("dns", &["nameservers", "timeout"]),
    (
        "route",
        &[
            "domains",
            "next_hop",
            "tls",
            "auth_username",
            "auth_password",
        ],
    ),
    ("http", &["bind", "admin_token"]),
    ("log", &["level", "format"]),
];

fn unknown_keys(value: &toml::Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(top) = value.as_table() else {
        return out;
    };
    for (section, v) in top {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(s, _)| s == section) else {
            out.push(format!("{section}: unknown key"));
            continue;
        };
        let tables: Vec<(String, &toml::Table)> = match v {
            toml::Value::Table(t) => vec![(section.clone(), t)],
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .filter_map(|(i, x)| x.as_table().map(|t| (format!("{section}[{i}]"), t)))
                .collect(),
            _ => vec![],
        };
        for (path, t) in tables {
            for k in t.keys() {
                if !keys.contains(&k.as_str()) {
                    out.push(format!("{path}.{k}: unknown key"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::default_config();
        assert_eq!(c.listeners.len(), 3);
        assert!(c.domains.is_local("LOCALHOST"));
        assert_eq!(c.domains.postmaster_account(), "postmaster@localhost");
        assert_eq!(c.limits.command_timeout, Duration::from_secs(300));
    }

    #[test]
    fn errors_name_their_keys() {
        let text = DEFAULT_CONFIG
            .replace("max_recipients = 1000", "max_recipients = 10")
            .replace("format = \"text\"", "format = \"xml\"");
        let Err(ConfigError::Invalid(errs)) = Config::parse(&text) else {
            panic!()
        };
        assert!(
            errs.iter().any(|e| e.starts_with("limits.max_recipients")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.starts_with("log.format")), "{errs:?}");
    }

    #[test]
    fn unknown_keys_are_all_reported() {
        let text = format!("{DEFAULT_CONFIG}\n[extra]\nx = 1\n")
            .replace("[limits]\n", "[limits]\nbogus = 1\n");
        let Err(ConfigError::Invalid(errs)) = Config::parse(&text) else {
            panic!()
        };
        assert!(errs.iter().any(|e| e.contains("limits.bogus")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("extra")), "{errs:?}");
    }

    #[test]
    fn bad_duration() {
        let text = DEFAULT_CONFIG.replace("command_timeout = \"5m\"", "command_timeout = \"soon\"");
        let Err(ConfigError::Invalid(errs)) = Config::parse(&text) else {
            panic!()
        };
        assert!(
            errs.iter().any(|e| e.contains("command_timeout")),
            "{errs:?}"
        );
    }
}
