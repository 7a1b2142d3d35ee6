//! The mailbox store: accounts, aliases, mailboxes and messages in one sled database.
//!
//! Local delivery writes here; the POP3 and IMAP gateways read and change the same trees, so
//! every protocol sees every other's changes without copies.
//!
//! Trees (keys are byte strings; `\0` separates parts since addresses cannot contain it):
//! - `accounts`:  address -> [`Account`]
//! - `aliases`:   alias address -> target account address
//! - `mailboxes`: account `\0` mailbox -> [`Mailbox`] (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ)
//! - `messages`:  account `\0` mailbox `\0` uid(BE u32) -> [`MessageMeta`]
//! - `bodies`:    body id(BE u64) ++ chunk(BE u32) -> raw RFC 5322 bytes (chunked, see queue's
//!   `durable` module for why)
//! - `dedupe`:    delivery key -> time; makes local delivery idempotent across crashes.
//!
//! Addresses are stored lower-cased: mailbox names are compared case-insensitively by every
//! mail client users meet, and RFC 5321 §2.4's case-sensitive local parts cause more harm than good.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use postrider_queue::durable::{CHUNK, GroupCommit, chunk_key, read_chunked};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Account {
    pub address: String,
    /// PHC-format argon2id hash; `None` = cannot log in (e.g. auto-created postmaster).
    pub password_hash: Option<String>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mailbox {
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    /// RFC 7162 HIGHESTMODSEQ: bumped on every change in the mailbox.
    pub highest_modseq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageMeta {
    pub uid: u32,
    pub size: u64,
    /// IMAP INTERNALDATE, ms since the epoch.
    pub internal_date_ms: u64,
    pub flags: Vec<String>,
    pub modseq: u64,
    pub body_id: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("store flush failed: {0}")]
    Flush(#[from] std::sync::Arc<std::io::Error>),
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record under {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("no such account: {0}")]
    NoAccount(String),
    #[error("account already exists: {0}")]
    AccountExists(String),
    #[error("no such mailbox: {0}")]
    NoMailbox(String),
    #[error("no such message: uid {0}")]
    NoMessage(u32),
    #[error("no such alias: {0}")]
    NoAlias(String),
    #[error("address already in use: {0}")]
    AddressTaken(String),
    #[error("invalid address: {0}")]
    BadAddress(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn unwrap_tx<T>(r: std::result::Result<T, TransactionError<StoreError>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Storage(e),
    })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our record types contain only strings and integers: serialization cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn mbox_key(account: &str, mailbox: &str) -> Vec<u8> {
    format!("{account}\0{mailbox}").into_bytes()
}

fn msg_prefix(account: &str, mailbox: &str) -> Vec<u8> {
    format!("{account}\0{mailbox}\0").into_bytes()
}

fn msg_key(account: &str, mailbox: &str, uid: u32) -> Vec<u8> {
    let mut k = msg_prefix(account, mailbox);
    k.extend_from_slice(&uid.to_be_bytes());
    k
}

/// Canonical form of an account or alias address.
pub fn normalize(addr: &str) -> Result<String> {
    let a = addr.trim().to_lowercase();
    match crate::smtp::proto::parse_address(&a) {
        Ok(_) if !a.contains('\0') => Ok(a),
        _ => Err(StoreError::BadAddress(addr.to_string())),
    }
}

/// Canonical mailbox name: `INBOX` is case-insensitive (RFC 3501 §5.1).
pub fn mailbox_name(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        name.to_string()
    }
}

/// One message for [`Store::append_many`].
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub raw: &'a [u8],
    pub flags: &'a [String],
    pub internal_date_ms: u64,
    /// Makes the append idempotent: a key seen before means "already delivered".
    pub dedupe_key: Option<&'a [u8]>,
}

/// Handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    accounts: sled::Tree,
    aliases: sled::Tree,
    mailboxes: sled::Tree,
    messages: sled::Tree,
    bodies: sled::Tree,
    dedupe: sled::Tree,
    commit: GroupCommit,
    addresses: Arc<AddressIndex>,
}

/// Which addresses exist, in memory: RCPT checks run on the async SMTP workers, and a sled
/// read there can wait behind another thread's transaction (sled 0.34 holds one process-wide
/// lock for a whole transaction, measured up to 7 ms for a delivery batch) while every other
/// session on that worker waits too. Costs about 100 bytes per account or alias. sled stays the
/// truth: loaded at open, changed only after sled accepted the change.
struct AddressIndex {
    names: RwLock<Names>,
    /// Serialises changes, so the memory copy sees them in sled's order.
    change: Mutex<()>,
}

#[derive(Default)]
struct Names {
    accounts: HashSet<String>,
    /// alias -> target account
    aliases: HashMap<String, String>,
}

impl Names {
    fn resolve_exact(&self, addr: &str) -> Option<String> {
        if self.accounts.contains(addr) {
            return Some(addr.to_string());
        }
        self.aliases.get(addr).cloned()
    }
}

impl AddressIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Names> {
        // A panic while holding the lock cannot leave `Names` half-changed (single inserts
        // and removes), so a poisoned lock is still consistent.
        self.names.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Names> {
        self.names.write().unwrap_or_else(|e| e.into_inner())
    }

    fn changing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store {
    /// Opens a store in its own database (tests, tools).
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let (db, commit) =
            postrider_queue::durable::open_db(path.as_ref()).map_err(|e| match e {
                postrider_queue::Error::Storage(e) => StoreError::Storage(e),
                other => StoreError::Io(std::io::Error::other(other.to_string())),
            })?;
        Store::with_db(db, commit)
    }

    /// Opens the store's trees in a database shared with the queue: one log, one flush for
    /// both, so a delivery's store write and the next enqueues share an fsync.
    pub fn with_db(db: sled::Db, commit: GroupCommit) -> Result<Store> {
        let accounts = db.open_tree("store.accounts")?;
        let aliases = db.open_tree("store.aliases")?;
        let mut names = Names::default();
        for k in accounts.iter().keys() {
            names
                .accounts
                .insert(String::from_utf8_lossy(&k?).into_owned());
        }
        for kv in aliases.iter() {
            let (k, v) = kv?;
            names.aliases.insert(
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        Ok(Store {
            accounts,
            aliases,
            mailboxes: db.open_tree("store.mailboxes")?,
            messages: db.open_tree("store.messages")?,
            bodies: db.open_tree("store.bodies")?,
            dedupe: db.open_tree("store.dedupe")?,
            db,
            commit,
            addresses: Arc::new(AddressIndex {
                names: RwLock::new(names),
                change: Mutex::new(()),
            }),
        })
    }

    /// Blocks until every write made before the call is durable (group commit).
    pub fn sync(&self) -> Result<()> {
        Ok(self.commit.commit_blocking()?)
    }

    fn hash_password(password: &str) -> Result<String> {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| StoreError::Hash(e.to_string()))
    }

    fn new_uidvalidity() -> u32 {
        // Seconds since the epoch, as Dovecot does: a new mailbox under a reused name gets a
        // different UIDVALIDITY.
        (postrider_queue::now_ms() / 1000) as u32
    }

    /// Creates an account with an INBOX. `password: None` creates one that cannot log in.
    pub fn add_user(&self, address: &str, password: Option<&str>) -> Result<Account> {
        let addr = normalize(address)?;
        let hash = password.map(Self::hash_password).transpose()?;
        let account = Account {
            address: addr.clone(),
            password_hash: hash,
            created_ms: postrider_queue::now_ms(),
        };
        let inbox = Mailbox {
            name: "INBOX".into(),
            uidvalidity: Self::new_uidvalidity(),
            uidnext: 1,
            highest_modseq: 1,
        };
        let _change = self.addresses.changing();
        unwrap_tx(
            (&self.accounts, &self.aliases, &self.mailboxes).transaction(|(acc, ali, mb)| {
                if acc.get(addr.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::AccountExists(addr.clone()),
                    ));
                }
                if ali.get(addr.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::AddressTaken(addr.clone()),
                    ));
                }
                acc.insert(addr.as_bytes(), encode(&account))?;
                mb.insert(mbox_key(&addr, "INBOX"), encode(&inbox))?;
                Ok(())
            }),
        )?;
        self.addresses.write().accounts.insert(addr.clone());
        self.sync()?;
        Ok(account)
    }

    /// Ensures an account exists (without a password if it has to be created).
    pub fn ensure_account(&self, address: &str) -> Result<()> {
        match self.add_user(address, None) {
            Ok(_) | Err(StoreError::AccountExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn get_user(&self, address: &str) -> Result<Option<Account>> {
        let addr = normalize(address)?;
        match self.accounts.get(addr.as_bytes())? {
            Some(v) => Ok(Some(decode(addr.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub fn set_password(&self, address: &str, password: &str) -> Result<()> {
        let addr = normalize(address)?;
        let hash = Self::hash_password(password)?;
        let Some(mut acc) = self.get_user(&addr)? else {
            return Err(StoreError::NoAccount(addr));
        };
        acc.password_hash = Some(hash);
        self.accounts.insert(addr.as_bytes(), encode(&acc))?;
        self.sync()
    }

    /// Checks a password. Runs argon2 (tens of ms): call it off the async threads.
    pub fn verify_password(&self, address: &str, password: &str) -> Result<bool> {
        let Ok(addr) = normalize(address) else {
            return Ok(false);
        };
        let acc = self.get_user(&addr)?;
        let Some(hash) = acc.and_then(|a| a.password_hash) else {
            // Burn comparable time so a missing account is not told apart by timing.
            let _ = Self::hash_password(password);
            return Ok(false);
        };
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return Ok(false);
        };
        Ok(argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    }

    pub fn list_users(&self) -> Result<Vec<Account>> {
        self.accounts
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Removes an account with all its mailboxes, messages and aliases pointing at it.
    pub fn del_user(&self, address: &str) -> Result<()> {
        let addr = normalize(address)?;
        let _change = self.addresses.changing();
        if self.accounts.remove(addr.as_bytes())?.is_none() {
            return Err(StoreError::NoAccount(addr));
        }
        self.addresses.write().accounts.remove(&addr);
        let prefix = format!("{addr}\0").into_bytes();
        for kv in self.messages.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let m: MessageMeta = decode(&k, &v)?;
            self.remove_body(m.body_id, m.size)?;
            self.messages.remove(k)?;
        }
        for k in self.mailboxes.scan_prefix(&prefix).keys() {
            self.mailboxes.remove(k?)?;
        }
        for kv in self.aliases.iter() {
            let (k, v) = kv?;
            if v.as_ref() == addr.as_bytes() {
                self.aliases.remove(&k)?;
                self.addresses
                    .write()
                    .aliases
                    .remove(String::from_utf8_lossy(&k).as_ref());
            }
        }
        self.sync()
    }

    fn remove_body(&self, body_id: u64, size: u64) -> Result<()> {
        let n = (size as usize).div_ceil(CHUNK).max(1) as u32;
        for c in 0..n {
            self.bodies.remove(chunk_key(&body_id.to_be_bytes(), c))?;
        }
        Ok(())
    }

    /// Adds `alias` delivering to the existing account `target`.
    pub fn add_alias(&self, alias: &str, target: &str) -> Result<()> {
        let alias = normalize(alias)?;
        let target = normalize(target)?;
        let _change = self.addresses.changing();
        if !self.accounts.contains_key(target.as_bytes())? {
            return Err(StoreError::NoAccount(target));
        }
        if self.accounts.contains_key(alias.as_bytes())? {
            return Err(StoreError::AddressTaken(alias));
        }
        self.aliases.insert(alias.as_bytes(), target.as_bytes())?;
        self.addresses.write().aliases.insert(alias, target);
        self.sync()
    }

    pub fn del_alias(&self, alias: &str) -> Result<()> {
        let alias = normalize(alias)?;
        let _change = self.addresses.changing();
        if self.aliases.remove(alias.as_bytes())?.is_none() {
            return Err(StoreError::NoAlias(alias));
        }
        self.addresses.write().aliases.remove(&alias);
        self.sync()
    }

    pub fn list_aliases(&self) -> Result<Vec<(String, String)>> {
        self.aliases
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect()
    }

    /// The account mail to `address` is delivered to: the account itself, an alias's target,
    /// or for `user+tag@domain` the same for `user@domain` (sub-addressing, RFC 5233 style).
    pub fn resolve(&self, address: &str) -> Result<Option<String>> {
        let Ok(addr) = normalize(address) else {
            return Ok(None);
        };
        // From memory (see [`AddressIndex`]): never waits for sled.
        let names = self.addresses.read();
        if let Some(a) = names.resolve_exact(&addr) {
            return Ok(Some(a));
        }
        if let Some((local, domain)) = addr.rsplit_once('@')
            && let Some((base, _tag)) = local.split_once('+')
            && !base.is_empty()
        {
            return Ok(names.resolve_exact(&format!("{base}@{domain}")));
        }
        Ok(None)
    }

    pub fn mailbox(&self, account: &str, mailbox: &str) -> Result<Mailbox> {
        let k = mbox_key(account, &mailbox_name(mailbox));
        match self.mailboxes.get(&k)? {
            Some(v) => decode(&k, &v),
            None => Err(StoreError::NoMailbox(mailbox.to_string())),
        }
    }

    /// Appends a message and returns its UID, or `None` when `dedupe_key` was already used
    /// (the delivery happened before a crash and is not repeated). The write is not yet
    /// durable: call [`Store::sync`] (once for a whole batch) before acknowledging it.
    pub fn append(
        &self,
        account: &str,
        mailbox: &str,
        raw: &[u8],
        flags: &[String],
        internal_date_ms: u64,
        dedupe_key: Option<&[u8]>,
    ) -> Result<Option<u32>> {
        let item = Append {
            raw,
            flags,
            internal_date_ms,
            dedupe_key,
        };
        self.append_many(account, mailbox, std::slice::from_ref(&item))?
            .pop()
            .unwrap_or(Ok(None))
    }

    /// Appends several messages to one mailbox in one transaction (local delivery batches
    /// them: one mailbox-record update and one commit instead of one per message).
    pub fn append_many(
        &self,
        account: &str,
        mailbox: &str,
        items: &[Append<'_>],
    ) -> Result<Vec<Result<Option<u32>>>> {
        let mailbox = mailbox_name(mailbox);
        let mk = mbox_key(account, &mailbox);
        let mut body_ids = Vec::with_capacity(items.len());
        for _ in items {
            body_ids.push(self.db.generate_id()?);
        }
        unwrap_tx(
            (&self.mailboxes, &self.messages, &self.bodies, &self.dedupe).transaction(
                |(mb, msgs, bodies, dd)| {
                    let Some(v) = mb.get(&mk)? else {
                        return Err(ConflictableTransactionError::Abort(StoreError::NoMailbox(
                            format!("{account}/{mailbox}"),
                        )));
                    };
                    let mut m: Mailbox =
                        decode(&mk, &v).map_err(ConflictableTransactionError::Abort)?;
                    let mut out = Vec::with_capacity(items.len());
                    let mut seen = std::collections::HashSet::new();
                    for (item, body_id) in items.iter().zip(&body_ids) {
                        if let Some(k) = item.dedupe_key
                            && (dd.get(k)?.is_some() || !seen.insert(k))
                        {
                            out.push(Ok(None));
                            continue;
                        }
                        let uid = m.uidnext;
                        m.uidnext += 1;
                        m.highest_modseq += 1;
                        let meta = MessageMeta {
                            uid,
                            size: item.raw.len() as u64,
                            internal_date_ms: item.internal_date_ms,
                            flags: item.flags.to_vec(),
                            modseq: m.highest_modseq,
                            body_id: *body_id,
                        };
                        let bkey = body_id.to_be_bytes();
                        for (n, c) in item.raw.chunks(CHUNK).enumerate() {
                            bodies.insert(chunk_key(&bkey, n as u32), c)?;
                        }
                        if item.raw.is_empty() {
                            bodies.insert(chunk_key(&bkey, 0), &[])?;
                        }
                        msgs.insert(msg_key(account, &mailbox, uid), encode(&meta))?;
                        if let Some(k) = item.dedupe_key {
                            dd.insert(k, &postrider_queue::now_ms().to_be_bytes())?;
                        }
                        out.push(Ok(Some(uid)));
                    }
                    mb.insert(mk.as_slice(), encode(&m))?;
                    Ok(out)
                },
            ),
        )
    }

    /// Messages of a mailbox in UID order.
    pub fn list_messages(&self, account: &str, mailbox: &str) -> Result<Vec<MessageMeta>> {
        let mailbox = mailbox_name(mailbox);
        self.mailbox(account, &mailbox)?;
        self.messages
            .scan_prefix(msg_prefix(account, &mailbox))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn message_meta(&self, account: &str, mailbox: &str, uid: u32) -> Result<MessageMeta> {
        let k = msg_key(account, &mailbox_name(mailbox), uid);
        match self.messages.get(&k)? {
            Some(v) => decode(&k, &v),
            None => Err(StoreError::NoMessage(uid)),
        }
    }

    /// The raw stored message, byte for byte.
    pub fn message_raw(&self, account: &str, mailbox: &str, uid: u32) -> Result<Vec<u8>> {
        let m = self.message_meta(account, mailbox, uid)?;
        read_chunked(&self.bodies, &m.body_id.to_be_bytes())?.ok_or(StoreError::NoMessage(uid))
    }

    /// Removes messages by UID (POP3 UPDATE state, IMAP EXPUNGE) in one transaction, bumping
    /// HIGHESTMODSEQ so other sessions notice; returns how many messages remain. UIDs that are
    /// already gone are ignored. Durable on return.
    pub fn expunge(&self, account: &str, mailbox: &str, uids: &[u32]) -> Result<usize> {
        let mailbox = mailbox_name(mailbox);
        let mk = mbox_key(account, &mailbox);
        let removed: Vec<MessageMeta> =
            unwrap_tx((&self.mailboxes, &self.messages).transaction(|(mb, msgs)| {
                let Some(v) = mb.get(&mk)? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NoMailbox(
                        mailbox.clone(),
                    )));
                };
                let mut m: Mailbox =
                    decode(&mk, &v).map_err(ConflictableTransactionError::Abort)?;
                let mut gone = Vec::new();
                for uid in uids {
                    if let Some(old) = msgs.remove(msg_key(account, &mailbox, *uid))? {
                        gone.push(
                            decode::<MessageMeta>(&mk, &old)
                                .map_err(ConflictableTransactionError::Abort)?,
                        );
                    }
                }
                if !gone.is_empty() {
                    m.highest_modseq += 1;
                    mb.insert(mk.as_slice(), encode(&m))?;
                }
                Ok(gone)
            }))?;
        // Bodies after the records: a crash in between leaves unreferenced chunks, never a
        // record without its body.
        for m in &removed {
            self.remove_body(m.body_id, m.size)?;
        }
        self.sync()?;
        Ok(self
            .messages
            .scan_prefix(msg_prefix(account, &mailbox))
            .count())
    }

    /// Forgets delivery keys older than `max_age_ms` (they only guard against crash replays).
    pub fn prune_dedupe(&self, max_age_ms: u64) -> Result<usize> {
        let cutoff = postrider_queue::now_ms().saturating_sub(max_age_ms);
        let mut n = 0;
        for kv in self.dedupe.iter() {
            let (k, v) = kv?;
            let t = <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if t < cutoff {
                self.dedupe.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_aliases_and_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.add_user("Alice@Example.org", Some("pw")).unwrap();
        assert!(matches!(
            s.add_user("alice@example.org", None),
            Err(StoreError::AccountExists(_))
        ));
        assert!(s.verify_password("alice@EXAMPLE.org", "pw").unwrap());
        assert!(!s.verify_password("alice@example.org", "nope").unwrap());
        assert!(!s.verify_password("bob@example.org", "pw").unwrap());
        s.add_alias("info@example.org", "alice@example.org")
            .unwrap();
        assert!(s.add_alias("x@example.org", "nobody@example.org").is_err());
        assert_eq!(
            s.resolve("INFO@example.org").unwrap().as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(
            s.resolve("alice+lists@example.org").unwrap().as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(s.resolve("carol@example.org").unwrap(), None);
        s.set_password("alice@example.org", "new").unwrap();
        assert!(s.verify_password("alice@example.org", "new").unwrap());
        s.del_user("alice@example.org").unwrap();
        assert_eq!(s.resolve("info@example.org").unwrap(), None);
        assert!(s.list_aliases().unwrap().is_empty());
    }

    /// `resolve` answers from memory: every clone sees a change at once, and a reopened store
    /// rebuilds the same answers from sled.
    #[test]
    fn resolution_follows_changes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let other = s.clone();
            s.add_user("bob@example.org", None).unwrap();
            s.add_user("carol@example.org", None).unwrap();
            s.add_alias("sales@example.org", "bob@example.org").unwrap();
            s.add_alias("help@example.org", "carol@example.org")
                .unwrap();
            assert_eq!(
                other.resolve("Sales@example.org").unwrap().as_deref(),
                Some("bob@example.org")
            );
            s.del_alias("help@example.org").unwrap();
            assert_eq!(other.resolve("help@example.org").unwrap(), None);
            s.del_user("carol@example.org").unwrap();
            assert_eq!(other.resolve("carol+x@example.org").unwrap(), None);
            s.commit.stop();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.resolve("bob+tag@example.org").unwrap().as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(
            s.resolve("sales@example.org").unwrap().as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(s.resolve("carol@example.org").unwrap(), None);
        assert_eq!(s.resolve("help@example.org").unwrap(), None);
    }

    #[test]
    fn append_assigns_increasing_uids_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.add_user("a@l", None).unwrap();
        let big = vec![b'x'; 200_000];
        assert_eq!(
            s.append("a@l", "inbox", b"one", &[], 1, Some(b"q1:a@l"))
                .unwrap(),
            Some(1)
        );
        assert_eq!(
            s.append("a@l", "INBOX", b"dup", &[], 1, Some(b"q1:a@l"))
                .unwrap(),
            None
        );
        assert_eq!(
            s.append("a@l", "INBOX", &big, &[], 2, None).unwrap(),
            Some(2)
        );
        s.sync().unwrap();
        let list = s.list_messages("a@l", "INBOX").unwrap();
        assert_eq!(list.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![1, 2]);
        assert!(list[1].modseq > list[0].modseq);
        assert_eq!(s.message_raw("a@l", "INBOX", 2).unwrap(), big);
        let mb = s.mailbox("a@l", "INBOX").unwrap();
        assert_eq!(mb.uidnext, 3);
        assert!(matches!(
            s.append("a@l", "Nope", b"x", &[], 1, None),
            Err(StoreError::NoMailbox(_))
        ));
    }
}
