//! The command line. `serve` and `config` run locally; every other command is a client of the
//! running server's admin API (sled allows one process per database), authenticated with the
//! token the server wrote to `DATA_DIR/admin.token` (or `http.admin_token`).

use crate::config::{Config, ConfigError};
use crate::http::{AliasInfo, MessageInfo, QueueEntry, UserInfo};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "postrider", version, about = "SMTP relay and mailbox server")]
pub struct Cli {
    /// Config file (default: the embedded default config; see `postrider config default`).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the server (SMTP listeners, delivery, admin HTTP).
    Serve,
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage aliases.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Inspect the queue.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Look into mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCmd),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the embedded default config.
    Default,
    /// Validate a config file and print every error with its key path.
    Check { file: PathBuf },
}

#[derive(Args, Debug)]
pub struct PasswordArgs {
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password")]
    pub password_stdin: bool,
    /// The password (visible in the process list: prefer --password-stdin).
    #[arg(long)]
    pub password: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create an account (with an INBOX).
    Add {
        address: String,
        #[command(flatten)]
        pw: PasswordArgs,
    },
    /// Delete an account and all its mail.
    Del { address: String },
    /// List accounts.
    List,
    /// Change an account's password.
    Passwd {
        address: String,
        #[command(flatten)]
        pw: PasswordArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum AliasCmd {
    /// Deliver mail for ALIAS to the account TARGET.
    Add {
        alias: String,
        target: String,
    },
    Del {
        alias: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    /// List queued messages.
    List {
        #[arg(long)]
        json: bool,
        /// Only messages with a recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only messages with a recipient in this state (pending, deferred), or "held".
        #[arg(long)]
        state: Option<String>,
        /// Only messages at least this old ("30m", "2h", "1d").
        #[arg(long)]
        older_than: Option<String>,
    },
    /// Stop delivering a message until it is released.
    Hold { id: String },
    /// Release a held message (it is due at once).
    Release { id: String },
    /// Remove a message from the queue for good.
    Delete {
        id: String,
        /// Return a failure DSN to the sender for the recipients still pending.
        #[arg(long)]
        bounce: bool,
    },
    /// Retry waiting messages now (all, or those for one domain).
    Flush {
        #[arg(long)]
        domain: Option<String>,
    },
    /// Show one message's envelope and each recipient's state.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum MailboxCmd {
    /// One line per message: UID, size, internal date, flags, subject.
    List {
        address: String,
        mailbox: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The raw stored message on stdout, byte for byte.
    Show {
        address: String,
        uid: u32,
        mailbox: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("postrider is not running (cannot reach the admin API at {addr}: {why})")]
    NotRunning { addr: String, why: String },
    #[error("no admin token: {0} (is the server running with this config?)")]
    NoToken(String),
    #[error("{0}")]
    Api(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response from server: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Usage(String),
}

struct Client {
    base: String,
    token: String,
}

/// Percent-encodes a path segment (addresses may hold `/`, `%`, `?` or UTF-8).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@+!$&'*,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    fn new(cfg: &Config) -> Result<Client, CliError> {
        let token = match &cfg.http.admin_token {
            Some(t) => t.clone(),
            None => {
                let p = cfg.server.data_dir.join("admin.token");
                std::fs::read_to_string(&p)
                    .map_err(|e| CliError::NoToken(format!("{}: {e}", p.display())))?
                    .trim()
                    .to_string()
            }
        };
        Ok(Client {
            base: format!("http://{}", cfg.admin_addr()),
            token,
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<ureq::Response, CliError> {
        let url = format!("{}/api{}", self.base, path);
        let req = ureq::request(method, &url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .timeout(std::time::Duration::from_secs(60));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(_, r)) => {
                let text = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                    .unwrap_or(text);
                Err(CliError::Api(msg))
            }
            Err(ureq::Error::Transport(t)) => Err(CliError::NotRunning {
                addr: self.base.clone(),
                why: t.to_string(),
            }),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.call("GET", path, None)?
            .into_json()
            .map_err(|e| CliError::BadResponse(e.to_string()))
    }
}

fn read_password(pw: &PasswordArgs) -> Result<String, CliError> {
    if let Some(p) = &pw.password {
        return Ok(p.clone());
    }
    if !pw.password_stdin {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        return Err(CliError::Usage("empty password".into()));
    }
    Ok(p)
}

fn fmt_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// Runs every command except `serve`.
pub fn run(cli: Cli) -> Result<(), CliError> {
    if let Cmd::Config(c) = &cli.cmd {
        return match c {
            ConfigCmd::Default => {
                print!("{}", crate::config::DEFAULT_CONFIG);
                Ok(())
            }
            ConfigCmd::Check { file } => {
                Config::load(file)?;
                println!("{}: OK", file.display());
                Ok(())
            }
        };
    }
    let cfg = Config::load_or_default(cli.config.as_deref())?;
    let c = Client::new(&cfg)?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Serve | Cmd::Config(_) => unreachable!("handled by the caller and above"),
        Cmd::User(u) => match u {
            UserCmd::Add { address, pw } => {
                let password = read_password(&pw)?;
                c.call(
                    "POST",
                    "/users",
                    Some(serde_json::json!({"address": address, "password": password})),
                )?;
                writeln!(out, "created {address}")?;
            }
            UserCmd::Del { address } => {
                c.call("DELETE", &format!("/users/{}", seg(&address)), None)?;
                writeln!(out, "deleted {address}")?;
            }
            UserCmd::List => {
                for u in c.json::<Vec<UserInfo>>("/users")? {
                    if u.can_login {
                        writeln!(out, "{}", u.address)?;
                    } else {
                        writeln!(out, "{} (no password)", u.address)?;
                    }
                }
            }
            UserCmd::Passwd { address, pw } => {
                let password = read_password(&pw)?;
                c.call(
                    "PUT",
                    &format!("/users/{}/password", seg(&address)),
                    Some(serde_json::json!({"password": password})),
                )?;
                writeln!(out, "password changed for {address}")?;
            }
        },
        Cmd::Alias(a) => match a {
            AliasCmd::Add { alias, target } => {
                c.call(
                    "POST",
                    "/aliases",
                    Some(serde_json::json!({"alias": alias, "target": target})),
                )?;
                writeln!(out, "{alias} -> {target}")?;
            }
            AliasCmd::Del { alias } => {
                c.call("DELETE", &format!("/aliases/{}", seg(&alias)), None)?;
                writeln!(out, "deleted {alias}")?;
            }
            AliasCmd::List => {
                for a in c.json::<Vec<AliasInfo>>("/aliases")? {
                    writeln!(out, "{} -> {}", a.alias, a.target)?;
                }
            }
        },
        Cmd::Queue(q) => match q {
            QueueCmd::List {
                json,
                domain,
                state,
                older_than,
            } => {
                let mut path = "/queue?limit=100000".to_string();
                for (k, v) in [
                    ("domain", domain),
                    ("state", state),
                    ("min_age", older_than),
                ] {
                    if let Some(v) = v {
                        path.push_str(&format!("&{k}={}", seg(&v)));
                    }
                }
                let list: Vec<QueueEntry> = c.json(&path)?;
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    )?;
                } else {
                    for e in list {
                        let rcpts: Vec<String> = e
                            .recipients
                            .iter()
                            .map(|r| format!("{}({})", r.address, r.state))
                            .collect();
                        writeln!(
                            out,
                            "{} {:>8} {} <{}>{} -> {}",
                            e.id,
                            e.size,
                            fmt_ms(e.arrival_ms),
                            e.sender,
                            if e.held { " HELD" } else { "" },
                            rcpts.join(" ")
                        )?;
                    }
                }
            }
            QueueCmd::Hold { id } => {
                c.call("POST", &format!("/queue/{}/hold", seg(&id)), None)?;
                writeln!(out, "held {id}")?;
            }
            QueueCmd::Release { id } => {
                c.call("POST", &format!("/queue/{}/release", seg(&id)), None)?;
                writeln!(out, "released {id}")?;
            }
            QueueCmd::Delete { id, bounce } => {
                let q = if bounce { "?bounce=true" } else { "" };
                c.call("DELETE", &format!("/queue/{}{q}", seg(&id)), None)?;
                writeln!(out, "deleted {id}")?;
            }
            QueueCmd::Flush { domain } => {
                let path = match &domain {
                    Some(d) => format!("/queue/flush?domain={}", seg(d)),
                    None => "/queue/flush".to_string(),
                };
                let v: serde_json::Value = c
                    .call("POST", &path, None)?
                    .into_json()
                    .map_err(|e| CliError::BadResponse(e.to_string()))?;
                writeln!(out, "{} messages due now", v["flushed"])?;
            }
            QueueCmd::Show { id, json } => {
                let e: QueueEntry = c.json(&format!("/queue/{}", seg(&id)))?;
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::to_string_pretty(&e).unwrap_or_default()
                    )?;
                } else {
                    writeln!(out, "id:           {}", e.id)?;
                    writeln!(out, "sender:       <{}>", e.sender)?;
                    writeln!(out, "size:         {}", e.size)?;
                    writeln!(out, "arrival:      {}", fmt_ms(e.arrival_ms))?;
                    writeln!(out, "attempts:     {}", e.attempts)?;
                    writeln!(out, "next attempt: {}", fmt_ms(e.next_attempt_ms))?;
                    writeln!(out, "held:         {}", e.held)?;
                    writeln!(out, "in delivery:  {}", e.leased)?;
                    for (k, v) in &e.info {
                        writeln!(out, "{k}: {v}")?;
                    }
                    writeln!(out, "recipients:")?;
                    for r in e.recipients {
                        writeln!(
                            out,
                            "  {} {} attempts={} {}",
                            r.address,
                            r.state,
                            r.attempts,
                            r.last_error.unwrap_or_default()
                        )?;
                    }
                }
            }
        },
        Cmd::Mailbox(m) => match m {
            MailboxCmd::List {
                address,
                mailbox,
                json,
            } => {
                let mb = mailbox.unwrap_or_else(|| "INBOX".into());
                let list: Vec<MessageInfo> = c.json(&format!(
                    "/mailboxes/{}?mailbox={}",
                    seg(&address),
                    seg(&mb)
                ))?;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&list).unwrap_or_default())?;
                } else {
                    for m in list {
                        writeln!(
                            out,
                            "{}\t{}\t{}\t{}\t{}",
                            m.uid,
                            m.size,
                            m.internal_date,
                            m.flags.join(" "),
                            m.subject.unwrap_or_default()
                        )?;
                    }
                }
            }
            MailboxCmd::Show {
                address,
                uid,
                mailbox,
            } => {
                let mb = mailbox.unwrap_or_else(|| "INBOX".into());
                let r = c.call(
                    "GET",
                    &format!("/mailboxes/{}/{}?mailbox={}", seg(&address), uid, seg(&mb)),
                    None,
                )?;
                let mut raw = Vec::new();
                r.into_reader().take(1 << 31).read_to_end(&mut raw)?;
                out.write_all(&raw)?;
            }
        },
    }
    Ok(())
}
