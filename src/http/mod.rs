//! Admin HTTP: `GET /metrics` (Prometheus), `GET /healthz`, and the JSON API under `/api/` that
//! the CLI uses (sled allows one process per database, so the CLI never opens it directly).
//!
//! `/metrics` and `/healthz` are open (they listen on loopback by default, and Prometheus scrapes
//! without credentials); everything under `/api/` needs `Authorization: Bearer <token>`.

use crate::metrics::METRICS;
use crate::server::App;
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use postrider_queue::{QueueId, RcptState, now_ms};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

type AppState = Arc<App>;

/// An API error: status code plus a one-line JSON `{"error": ...}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError::*;
        let code = match &e {
            NoAccount(_) | NoMailbox(_) | NoMessage(_) | NoAlias(_) => StatusCode::NOT_FOUND,
            AccountExists(_) | AddressTaken(_) => StatusCode::CONFLICT,
            BadAddress(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<postrider_queue::Error> for ApiError {
    fn from(e: postrider_queue::Error) -> Self {
        let code = match &e {
            postrider_queue::Error::NotFound(_) => StatusCode::NOT_FOUND,
            postrider_queue::Error::BadId(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

/// Runs store calls off the async threads (sled and argon2 block).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

pub fn router(app: AppState) -> Router {
    let api = Router::new()
        .route("/users", get(list_users).post(add_user))
        .route("/users/{address}", delete(del_user))
        .route("/users/{address}/password", put(set_password))
        .route("/aliases", get(list_aliases).post(add_alias))
        .route("/aliases/{alias}", delete(del_alias))
        .route("/queue", get(queue_list))
        .route("/queue/flush", axum::routing::post(queue_flush))
        .route("/queue/{id}", get(queue_show).delete(queue_delete))
        .route("/queue/{id}/hold", axum::routing::post(queue_hold))
        .route("/queue/{id}/release", axum::routing::post(queue_release))
        .route("/mailboxes/{address}", get(mailbox_list))
        .route("/mailboxes/{address}/{uid}", get(mailbox_show))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .nest("/api", api)
        .with_state(app)
}

/// Admin connections idle this long (mid-request or between requests) are closed, so a slow
/// or stuck client cannot hold connections forever.
const HTTP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The admin listener: hands axum streams that give up after `HTTP_IDLE_TIMEOUT` without input.
struct TimeoutListener(tokio::net::TcpListener);

impl axum::serve::Listener for TimeoutListener {
    type Io = IdleTimeout<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (IdleTimeout::new(io, HTTP_IDLE_TIMEOUT), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A stream whose reads fail with `TimedOut` after `timeout` without progress.
pub struct IdleTimeout<S> {
    inner: S,
    timeout: std::time::Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, timeout: std::time::Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let deadline = tokio::time::Instant::now() + me.timeout;
                me.sleep.as_mut().reset(deadline);
                Poll::Ready(r)
            }
            Poll::Pending => match me.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub async fn serve(
    app: AppState,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let r = axum::serve(TimeoutListener(listener), router(app))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|v| *v).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin HTTP server failed");
    }
}

/// Constant-time comparison: the token must not leak through response timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), app.admin_token.as_bytes()));
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response();
    }
    next.run(req).await
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let c = app.queue.counts();
    METRICS.queue_messages.set(c.messages as i64);
    METRICS
        .queue_entries
        .with_label_values(&["leased"])
        .set(c.leased as i64);
    let q = app.queue.clone();
    if let Ok(Ok(sc)) = tokio::task::spawn_blocking(move || q.state_counts(now_ms())).await {
        for (state, n) in [
            ("ready", sc.ready),
            ("deferred", sc.deferred),
            ("held", sc.held),
            ("active", sc.active),
        ] {
            METRICS
                .queue_entries
                .with_label_values(&[state])
                .set(n as i64);
        }
        METRICS.queue_oldest_age_seconds.set(
            sc.oldest_arrival_ms
                .map_or(0.0, |t| now_ms().saturating_sub(t) as f64 / 1000.0),
        );
    }
    let fs = app.queue.flush_stats();
    let seen = METRICS.queue_flushes.get();
    if fs.flushes > seen {
        METRICS.queue_flushes.inc_by(fs.flushes - seen);
    }
    let seen = METRICS.queue_checkpoints.get();
    if fs.checkpoints > seen {
        METRICS.queue_checkpoints.inc_by(fs.checkpoints - seen);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        METRICS.render(),
    )
}

#[derive(Serialize, Deserialize)]
pub struct UserInfo {
    pub address: String,
    pub can_login: bool,
    pub created_ms: u64,
}

async fn list_users(State(app): State<AppState>) -> Result<Json<Vec<UserInfo>>, ApiError> {
    let users = blocking(move || Ok(app.store.list_users()?)).await?;
    Ok(Json(
        users
            .into_iter()
            .map(|a| UserInfo {
                can_login: a.password_hash.is_some(),
                address: a.address,
                created_ms: a.created_ms,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
pub struct NewUser {
    pub address: String,
    pub password: Option<String>,
}

async fn add_user(
    State(app): State<AppState>,
    Json(u): Json<NewUser>,
) -> Result<impl IntoResponse, ApiError> {
    let acc = blocking(move || Ok(app.store.add_user(&u.address, u.password.as_deref())?)).await?;
    tracing::info!(address = %acc.address, "account created");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "address": acc.address })),
    ))
}

async fn del_user(
    State(app): State<AppState>,
    Path(address): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || Ok(app.store.del_user(&address)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct NewPassword {
    pub password: String,
}

async fn set_password(
    State(app): State<AppState>,
    Path(address): Path<String>,
    Json(p): Json<NewPassword>,
) -> Result<StatusCode, ApiError> {
    blocking(move || Ok(app.store.set_password(&address, &p.password)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, Deserialize)]
pub struct AliasInfo {
    pub alias: String,
    pub target: String,
}

async fn list_aliases(State(app): State<AppState>) -> Result<Json<Vec<AliasInfo>>, ApiError> {
    let list = blocking(move || Ok(app.store.list_aliases()?)).await?;
    Ok(Json(
        list.into_iter()
            .map(|(alias, target)| AliasInfo { alias, target })
            .collect(),
    ))
}

async fn add_alias(
    State(app): State<AppState>,
    Json(a): Json<AliasInfo>,
) -> Result<StatusCode, ApiError> {
    blocking(move || Ok(app.store.add_alias(&a.alias, &a.target)?)).await?;
    Ok(StatusCode::CREATED)
}

async fn del_alias(
    State(app): State<AppState>,
    Path(alias): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || Ok(app.store.del_alias(&alias)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, Deserialize, Debug)]
pub struct RcptInfo {
    pub address: String,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct QueueEntry {
    pub id: String,
    pub sender: String,
    pub size: u64,
    pub arrival_ms: u64,
    pub next_attempt_ms: u64,
    pub attempts: u32,
    pub held: bool,
    pub leased: bool,
    pub recipients: Vec<RcptInfo>,
    pub info: std::collections::BTreeMap<String, String>,
}

fn entry(app: &App, id: QueueId, e: postrider_queue::Envelope) -> QueueEntry {
    QueueEntry {
        id: id.to_string(),
        sender: e.sender,
        size: e.size,
        arrival_ms: e.arrival_ms,
        next_attempt_ms: e.next_attempt_ms,
        attempts: e.attempts,
        held: e.held,
        leased: app.queue.is_leased(id).unwrap_or(false),
        recipients: e
            .recipients
            .into_iter()
            .map(|r| RcptInfo {
                address: r.address,
                state: match r.state {
                    RcptState::Pending if r.last_error.is_some() => "deferred",
                    RcptState::Pending => "pending",
                    RcptState::Delivered => "delivered",
                    RcptState::Failed => "failed",
                }
                .into(),
                attempts: r.attempts,
                last_error: r.last_error,
            })
            .collect(),
        info: e.info,
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// Only messages with a recipient in this domain.
    pub domain: Option<String>,
    /// Only messages with a recipient in this state (`pending`, `deferred`), or `held`.
    pub state: Option<String>,
    /// Only messages at least this old (humantime, e.g. "1h").
    pub min_age: Option<String>,
}

fn rcpt_domain(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

async fn queue_list(
    State(app): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<QueueEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let min_age_ms = match &q.min_age {
        Some(a) => humantime::parse_duration(a)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("min_age: {e}")))?
            .as_millis() as u64,
        None => 0,
    };
    let a = app.clone();
    let list = blocking(move || Ok(a.queue.list(usize::MAX)?)).await?;
    let now = postrider_queue::now_ms();
    let entries = list
        .into_iter()
        .map(|(id, e)| entry(&app, id, e))
        .filter(|e| now.saturating_sub(e.arrival_ms) >= min_age_ms)
        .filter(|e| {
            q.domain.as_ref().is_none_or(|d| {
                e.recipients
                    .iter()
                    .any(|r| rcpt_domain(&r.address).eq_ignore_ascii_case(d))
            })
        })
        .filter(|e| match q.state.as_deref() {
            None => true,
            Some("held") => e.held,
            Some(st) => e.recipients.iter().any(|r| r.state == st),
        })
        .take(limit)
        .collect();
    Ok(Json(entries))
}

fn parse_id(id: &str) -> Result<QueueId, ApiError> {
    Ok(id.parse()?)
}

async fn queue_hold(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    blocking(move || Ok(app.queue.hold(id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn queue_release(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let a = app.clone();
    blocking(move || Ok(a.queue.release(id)?)).await?;
    app.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct DeleteQuery {
    /// Return a DSN (failed) to the sender for every recipient still pending.
    #[serde(default)]
    pub bounce: bool,
}

async fn queue_delete(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let a = app.clone();
    let (e, body) = blocking(move || {
        // The body first: after the delete it is gone.
        let body = if q.bounce {
            a.queue.body(id).ok()
        } else {
            None
        };
        Ok((a.queue.delete(id)?, body))
    })
    .await?;
    tracing::info!(queue_id = %id, sender = %e.sender, bounce = q.bounce, "deleted from the queue by the operator");
    if let Some(body) = body {
        use crate::delivery::dsn;
        let entries: Vec<dsn::Entry<'_>> = e
            .pending()
            .map(|(_, r)| r)
            .filter(|r| dsn::wanted(&e, r, dsn::Action::Failed))
            .map(|r| dsn::Entry {
                rcpt: r,
                action: dsn::Action::Failed,
                reason: Some(
                    "5.0.0 message deleted from the queue by the mail system administrator".into(),
                ),
            })
            .collect();
        if !entries.is_empty() {
            let dsn_id = dsn::enqueue(
                &app.queue,
                &app.cfg.server.hostname,
                id,
                &e,
                &body,
                &entries,
                None,
            )
            .await
            .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
            tracing::info!(queue_id = %id, %dsn_id, "bounce queued for the deleted message");
            app.wake.notify_one();
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct FlushQuery {
    pub domain: Option<String>,
}

/// `queue flush`: every waiting (not held) message, or those with a pending recipient in
/// `domain`, is due now.
async fn queue_flush(
    State(app): State<AppState>,
    Query(q): Query<FlushQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let a = app.clone();
    let n = blocking(move || {
        let mut n = 0;
        for (id, e) in a.queue.list(usize::MAX)? {
            let wanted = q.domain.as_ref().is_none_or(|d| {
                e.pending()
                    .any(|(_, r)| rcpt_domain(&r.address).eq_ignore_ascii_case(d))
            });
            if wanted && !e.held {
                match a.queue.retry_now(id, false) {
                    Ok(()) => n += 1,
                    Err(postrider_queue::Error::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(n)
    })
    .await?;
    app.wake.notify_one();
    Ok(Json(serde_json::json!({ "flushed": n })))
}

async fn queue_show(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<QueueEntry>, ApiError> {
    let id: QueueId = id.parse()?;
    let e = app.queue.show(id)?;
    Ok(Json(entry(&app, id, e)))
}

#[derive(Deserialize)]
pub struct MailboxQuery {
    pub mailbox: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct MessageInfo {
    pub uid: u32,
    pub size: u64,
    /// RFC 3339.
    pub internal_date: String,
    pub flags: Vec<String>,
    pub subject: Option<String>,
}

async fn mailbox_list(
    State(app): State<AppState>,
    Path(address): Path<String>,
    Query(q): Query<MailboxQuery>,
) -> Result<Json<Vec<MessageInfo>>, ApiError> {
    let mailbox = q.mailbox.unwrap_or_else(|| "INBOX".into());
    let out = blocking(move || {
        let account = crate::store::normalize(&address)?;
        let metas = app.store.list_messages(&account, &mailbox)?;
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            let raw = app.store.message_raw(&account, &mailbox, m.uid)?;
            let subject = mail_parser::MessageParser::default()
                .parse_headers(&raw[..])
                .and_then(|p| p.subject().map(str::to_string));
            let date = chrono::DateTime::from_timestamp_millis(m.internal_date_ms as i64)
                .map(|d| d.to_rfc3339())
                .unwrap_or_default();
            out.push(MessageInfo {
                uid: m.uid,
                size: m.size,
                internal_date: date,
                flags: m.flags,
                subject,
            });
        }
        Ok(out)
    })
    .await?;
    Ok(Json(out))
}

async fn mailbox_show(
    State(app): State<AppState>,
    Path((address, uid)): Path<(String, u32)>,
    Query(q): Query<MailboxQuery>,
) -> Result<Response, ApiError> {
    let mailbox = q.mailbox.unwrap_or_else(|| "INBOX".into());
    let raw = blocking(move || {
        let account = crate::store::normalize(&address)?;
        Ok(app.store.message_raw(&account, &mailbox, uid)?)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "message/rfc822")], raw).into_response())
}

#[cfg(test)]
mod tests {
    use super::IdleTimeout;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn idle_reads_time_out_and_activity_resets_the_clock() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = IdleTimeout::new(server, std::time::Duration::from_millis(200));
        let mut c = client;
        c.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).await.unwrap(), 3);
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
