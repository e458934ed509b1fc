//! The data API handlers: records, listings, merge patch, atomic batches, and the HTTP
//! conditional-request rules that map onto storage preconditions.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::cache::{CachedRecord, RecordCache, CACHE_STATUS};
use super::AppSettings;
use crate::http::body::{self, Body};
use crate::http::problem::Problem;
use crate::storage::{
    Committed, Key, KeyError, ListPage, ListQuery, Precondition, ReadConsistency, Record, Store,
    StoreError, Write, WriteOp,
};

/// Header carrying a write's LSN: the consistency token read replicas will honour.
pub const LSN_HEADER: &str = "strata-lsn";
/// [`LSN_HEADER`] as a header name.
static LSN_HEADER_NAME: HeaderName = HeaderName::from_static(LSN_HEADER);

/// Storage as the handlers see it: the store, and the app's record cache when it is on.
/// Writes go through [`Data::write`], which drops the written keys from the cache once
/// storage acknowledges them, so this app never serves its own stale copy.
pub struct Data<'a> {
    /// Where records live.
    pub store: &'a Store,
    /// The coherent record cache (`[app.cache]`), if configured.
    pub cache: Option<&'a RecordCache>,
}

impl Data<'_> {
    /// Applies a batch; on success drops its keys from the cache at the batch's LSN.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Committed, StoreError> {
        let Some(cache) = self.cache else {
            return self.store.write(writes).await;
        };
        let keys: Vec<Key> = writes.iter().map(|w| w.key.clone()).collect();
        let committed = self.store.write(writes).await?;
        cache.invalidate_written(&keys, committed.lsn);
        Ok(committed)
    }

    /// Reads the newest state from the primary (read-modify-write paths); never cached.
    pub async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.store.get(key).await
    }

    /// Lists a collection (listings are not cached).
    pub async fn list_with(
        &self,
        collection: &str,
        query: &ListQuery,
        consistency: ReadConsistency,
    ) -> Result<ListPage, StoreError> {
        self.store.list_with(collection, query, consistency).await
    }
}

/// The outcome of a handler: a response, or a problem to send instead.
pub type ApiResult = Result<Response<Body>, Box<Problem>>;

fn problem(status: StatusCode, detail: impl Into<String>) -> Box<Problem> {
    Box::new(Problem::new(status, detail))
}

fn bad_key(e: KeyError) -> Box<Problem> {
    problem(StatusCode::BAD_REQUEST, e.to_string())
}

/// Maps a storage failure to the status a client can act on.
fn storage_problem(e: StoreError) -> Box<Problem> {
    match e {
        StoreError::PreconditionFailed { key, current, .. } => problem(
            StatusCode::PRECONDITION_FAILED,
            match current {
                Some(v) => format!(
                    "{key} is at version \"{v}\", which does not satisfy the request's condition"
                ),
                None => {
                    format!("{key} does not exist, which does not satisfy the request's condition")
                }
            },
        ),
        StoreError::InvalidBatch(m) => problem(StatusCode::BAD_REQUEST, m),
        StoreError::Unavailable(why) => {
            tracing::warn!(reason = %why, "storage unavailable");
            Box::new(
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("storage is unavailable ({why}); nothing was changed, retry shortly"),
                )
                .with_retry_after(1),
            )
        }
        StoreError::OutcomeUnknown(why) => problem(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the write may or may not have been applied: {why}; read the record before retrying"
            ),
        ),
        StoreError::ReadOnly(why) => Box::new(
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("storage takes no writes here: {why}"),
            )
            .with_retry_after(1),
        ),
        StoreError::Internal(why) | StoreError::Behind(why) => {
            tracing::error!(error = %why, "storage failure");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage failed; the error is in the server log",
            )
        }
    }
}

/// Checks that a request body is declared as JSON: `application/json` or any
/// `application/*+json`, and for a merge patch also `application/merge-patch+json`.
fn check_json_type(headers: &HeaderMap, merge_patch: bool) -> Result<(), Box<Problem>> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Media types are case-insensitive; compared as bytes, without a lowercased copy.
    let mime = ct.split(';').next().unwrap_or("").trim().as_bytes();
    let (app, json) = (b"application/", b"+json");
    let json_like = mime.eq_ignore_ascii_case(b"application/json")
        || (mime.len() > app.len() + json.len()
            && mime[..app.len()].eq_ignore_ascii_case(app)
            && mime[mime.len() - json.len()..].eq_ignore_ascii_case(json))
        || (merge_patch && mime.eq_ignore_ascii_case(b"application/merge-patch+json"));
    if json_like {
        return Ok(());
    }
    Err(problem(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "expected Content-Type application/json, got {:?}",
            if ct.is_empty() { "none" } else { ct }
        ),
    ))
}

/// Checks a request body's JSON syntax (storage keeps the bytes as sent).
fn check_json_syntax(bytes: &[u8]) -> Result<(), Box<Problem>> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(|_| ())
        .map_err(|e| problem(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
}

/// Reads a JSON request body: content type checked, size limited, syntax validated.
async fn read_json(
    headers: &HeaderMap,
    body: Incoming,
    settings: &AppSettings,
    merge_patch: bool,
) -> Result<Bytes, Box<Problem>> {
    check_json_type(headers, merge_patch)?;
    let max = settings.max_body;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    let bytes = match Limited::new(body, max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large(max)),
        Err(e) => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}"),
            ))
        }
    };
    check_json_syntax(&bytes)?;
    Ok(bytes)
}

fn too_large(max: usize) -> Box<Problem> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body exceeds the limit of {max} bytes"),
    )
}

/// Parses one entity tag `"123"` into a version.
fn parse_etag(tag: &str) -> Option<u64> {
    tag.trim()
        .strip_prefix('"')?
        .strip_suffix('"')?
        .parse()
        .ok()
}

/// The write precondition that `If-Match` / `If-None-Match: *` ask for, if any.
fn write_precondition(headers: &HeaderMap) -> Result<Option<Precondition>, Box<Problem>> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let v = v.to_str().unwrap_or("").trim();
        if v == "*" {
            return Ok(Some(Precondition::Exists));
        }
        // Weak tags never match If-Match (strong comparison); an unparsable tag matches nothing.
        return Ok(Some(Precondition::Version(parse_etag(v).unwrap_or(0))));
    }
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        if v.to_str().unwrap_or("").trim() == "*" {
            return Ok(Some(Precondition::Absent));
        }
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "on writes, If-None-Match supports only \"*\" (create only)",
        ));
    }
    Ok(None)
}

/// Whether `If-None-Match` (or, without it, `If-Modified-Since`) says the client's copy is
/// current, so a GET can answer 304.
fn not_modified(headers: &HeaderMap, record: &Record) -> bool {
    if let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        return v.split(',').any(|t| {
            let t = t.trim();
            t == "*" || parse_etag(t.trim_start_matches("W/")) == Some(record.lsn)
        });
    }
    if let Some(since) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        return UNIX_EPOCH + Duration::from_millis(record.updated_ms)
            < since + Duration::from_secs(1);
    }
    false
}

/// `"<lsn>"` as a header value, without going through `fmt` (every record read sends one).
pub(crate) fn etag_header(lsn: u64) -> HeaderValue {
    let mut buf = [0u8; ETAG_MAX];
    let n = etag_bytes(lsn, &mut buf);
    HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// Longest `"<lsn>"`: 20 digits and two quotes.
const ETAG_MAX: usize = 22;

/// Writes `"<lsn>"` into `buf`; returns its length.
fn etag_bytes(lsn: u64, buf: &mut [u8; ETAG_MAX]) -> usize {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(lsn).as_bytes();
    buf[0] = b'"';
    buf[1..=digits.len()].copy_from_slice(digits);
    buf[digits.len() + 1] = b'"';
    digits.len() + 2
}

/// Parses a consistency token: `epoch.lsn` or a bare `lsn` (any epoch).
fn parse_token(s: &str) -> Option<(u64, u64)> {
    let s = s.trim();
    match s.split_once('.') {
        Some((e, l)) => Some((e.parse().ok()?, l.parse().ok()?)),
        None => Some((0, s.parse().ok()?)),
    }
}

/// What a read needs from storage: `?consistency=strong` reads the primary; a token in
/// the `Strata-LSN` header or the `strata-lsn` cookie needs a node at or past it
/// (the newer of the two when both are present); otherwise any healthy replica.
pub fn read_consistency(headers: &HeaderMap, query: Option<&str>) -> ReadConsistency {
    let strong = query
        .unwrap_or("")
        .split('&')
        .any(|p| p == "consistency=strong");
    if strong {
        return ReadConsistency::Strong;
    }
    let mut best: Option<(u64, u64)> = headers
        .get(LSN_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_token);
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for c in v.split(';') {
            if let Some(t) = c
                .trim()
                .strip_prefix(LSN_HEADER)
                .and_then(|r| r.strip_prefix('='))
                .and_then(parse_token)
            {
                best = Some(best.map_or(t, |b| b.max(t)));
            }
        }
    }
    match best {
        Some((epoch, lsn)) => ReadConsistency::AtLeast { epoch, lsn },
        None => ReadConsistency::Any,
    }
}

/// The request fields a record read looks at: the token ([`crate::http::auth::Tokens`]),
/// consistency ([`read_consistency`]) and conditions ([`not_modified`]). The app's fast path
/// copies only these from a request head, so a read that starts using another field must
/// be listed here.
pub static RECORD_READ_FIELDS: [HeaderName; 5] = [
    header::AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static(LSN_HEADER),
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

/// What a record read found, decided once and rendered by the hyper path
/// ([`RecordRead::into_response`]) or by the app's fast path.
pub struct RecordRead {
    /// The record, if it exists.
    pub found: Option<Arc<CachedRecord>>,
    /// The request's validators match it: the answer is 304.
    pub not_modified: bool,
    /// `Cache-Status`, when the record cache is on.
    pub cache_status: Option<HeaderValue>,
    key: Key,
}

/// Reads one record for a GET/HEAD: from the app cache when it is on and may answer (see
/// [`super::cache`]), else from storage.
pub async fn read_record(
    data: &Data<'_>,
    headers: &HeaderMap,
    query: Option<&str>,
    collection: &str,
    id: &str,
) -> Result<RecordRead, Box<Problem>> {
    let key = Key::new(collection, id).map_err(bad_key)?;
    let consistency = read_consistency(headers, query);
    let (found, cache_status) = match data.cache {
        Some(cache) => {
            let (found, status) = cache
                .read(data.store, key.clone(), consistency)
                .await
                .map_err(storage_problem)?;
            (found, Some(status))
        }
        None => (
            data.store
                .read(&key, consistency)
                .await
                .map_err(storage_problem)?
                .map(CachedRecord::new),
            None,
        ),
    };
    let not_modified = found
        .as_ref()
        .is_some_and(|c| not_modified(headers, &c.record));
    Ok(RecordRead {
        found,
        not_modified,
        cache_status,
        key,
    })
}

/// GET/HEAD of one record. With the cache on, every answer (404 included) carries
/// `Cache-Status`.
pub async fn get_record(
    data: &Data<'_>,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    collection: &str,
    id: &str,
) -> ApiResult {
    Ok(read_record(data, headers, query, collection, id)
        .await?
        .into_response(method))
}

impl RecordRead {
    /// A found record, as [`read_record`] would return it (for tests of renderings).
    #[cfg(test)]
    pub(crate) fn found(cached: Arc<CachedRecord>, cache_status: Option<HeaderValue>) -> Self {
        RecordRead {
            found: Some(cached),
            not_modified: false,
            cache_status,
            key: Key::new("c", "id").expect("a valid key"),
        }
    }

    /// The 200, 304 or 404 answer.
    pub fn into_response(self, method: &Method) -> Response<Body> {
        let mut resp = match &self.found {
            Some(cached) if self.not_modified => {
                let mut resp = Response::new(body::empty());
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                let h = resp.headers_mut();
                h.insert(header::ETAG, cached.etag.clone());
                h.insert(header::LAST_MODIFIED, cached.last_modified.clone());
                resp
            }
            Some(cached) => {
                let record = &cached.record;
                let mut resp = Response::new(if method == Method::HEAD {
                    body::empty()
                } else {
                    body::full(record.body.clone())
                });
                // The same fields, in the same order, as `CachedRecord::head`.
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                h.insert(header::ETAG, cached.etag.clone());
                h.insert(header::LAST_MODIFIED, cached.last_modified.clone());
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(record.body.len()));
                resp
            }
            None => {
                problem(StatusCode::NOT_FOUND, format!("no record {}", self.key)).into_response()
            }
        };
        if let Some(status) = self.cache_status {
            resp.headers_mut().insert(CACHE_STATUS, status);
        }
        resp
    }
}

/// The answer to a write of one record, decided once and rendered by the hyper path
/// ([`Written::into_response`]) or written directly by the app's fast path
/// ([`Written::fields`]), so both send the same fields.
pub struct Written<'a> {
    /// 200, 204 (a delete) or the status for a record the write created.
    pub status: StatusCode,
    /// The record as stored, sent back as the body; `None` after a delete.
    pub record: Option<&'a Record>,
    committed: &'a Committed,
    key: &'a Key,
    created: bool,
}

impl<'a> Written<'a> {
    /// The answer to `committed`, a one-write batch on `key`.
    pub fn new(committed: &'a Committed, key: &'a Key, status_if_created: StatusCode) -> Self {
        let result = committed.results.first();
        let record = result.and_then(|r| r.record.as_ref());
        let created = result.is_some_and(|r| r.created);
        let status = match record {
            None => StatusCode::NO_CONTENT,
            Some(_) if created => status_if_created,
            Some(_) => StatusCode::OK,
        };
        Written {
            status,
            record,
            committed,
            key,
            created,
        }
    }

    /// Calls `field` with each field of the answer, in order (the framing fields,
    /// `Content-Length` and `Date`, are the writer's): the record's type, `ETag` and
    /// `Last-Modified`; `Location` when created; the consistency token
    /// ([`token_fields`]). Built without `fmt`: every write answers with all of them.
    pub fn fields(&self, mut field: impl FnMut(&HeaderName, &[u8])) {
        if let Some(record) = self.record {
            // The fields of `CachedRecord::head` (bar its length), made without `fmt`.
            field(&header::CONTENT_TYPE, b"application/json");
            let mut etag = [0u8; ETAG_MAX];
            let n = etag_bytes(record.lsn, &mut etag);
            field(&header::ETAG, &etag[..n]);
            field(
                &header::LAST_MODIFIED,
                &crate::http::date::imf_fixdate(record.updated_ms / 1000),
            );
        }
        if self.created {
            let (c, id) = (self.key.collection(), self.key.id());
            let mut location = Vec::with_capacity(9 + c.len() + id.len());
            location.extend_from_slice(b"/api/v1/");
            location.extend_from_slice(c.as_bytes());
            location.push(b'/');
            location.extend_from_slice(id.as_bytes());
            field(&header::LOCATION, &location);
        }
        token_fields(self.committed, field);
    }

    /// The answer as a response for the hyper path.
    pub fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(match self.record {
            Some(record) => body::full(record.body.clone()),
            None => body::empty(),
        });
        *resp.status_mut() = self.status;
        self.fields(append_to(resp.headers_mut()));
        resp
    }
}

/// Calls `field` with a write's consistency token: the LSN as `Strata-LSN`, and
/// `epoch.lsn` as the `strata-lsn` cookie, which browsers send back on later reads so
/// those never see data older than the write.
fn token_fields(committed: &Committed, mut field: impl FnMut(&HeaderName, &[u8])) {
    let (mut epoch, mut lsn) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (epoch, lsn) = (epoch.format(committed.epoch), lsn.format(committed.lsn));
    field(&LSN_HEADER_NAME, lsn.as_bytes());
    const ATTRIBUTES: &[u8] = b"; Path=/; Max-Age=300; SameSite=Lax; HttpOnly";
    let mut cookie = Vec::with_capacity(LSN_HEADER.len() + epoch.len() + lsn.len() + 50);
    cookie.extend_from_slice(LSN_HEADER.as_bytes());
    cookie.push(b'=');
    cookie.extend_from_slice(epoch.as_bytes());
    cookie.push(b'.');
    cookie.extend_from_slice(lsn.as_bytes());
    cookie.extend_from_slice(ATTRIBUTES);
    field(&header::SET_COOKIE, &cookie);
}

/// The `field` sink of [`Written::fields`] and [`token_fields`] for a response built
/// for hyper: appends each field to `headers`. Every value is ASCII made here or a valid
/// key, so none is refused.
fn append_to(headers: &mut HeaderMap) -> impl FnMut(&HeaderName, &[u8]) + '_ {
    move |name, value| {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name.clone(), v);
        }
    }
}

/// The response to a write of one record (see [`Written`]).
fn written(committed: &Committed, key: &Key, status_if_created: StatusCode) -> Response<Body> {
    Written::new(committed, key, status_if_created).into_response()
}

/// PUT: create or replace.
pub async fn put_record(
    store: &Data<'_>,
    settings: &AppSettings,
    headers: &HeaderMap,
    body: Incoming,
    collection: &str,
    id: &str,
) -> ApiResult {
    let key = Key::new(collection, id).map_err(bad_key)?;
    let precondition = write_precondition(headers)?.unwrap_or_default();
    let bytes = read_json(headers, body, settings, false).await?;
    let committed = put(store, &key, precondition, bytes).await?;
    Ok(written(&committed, &key, StatusCode::CREATED))
}

/// The request fields a record PUT looks at besides its body: the token, the content
/// type and the preconditions. The app's fast path copies only these from a request head,
/// so a PUT that starts using another field must be listed here.
pub static RECORD_WRITE_FIELDS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
];

/// PUT whose body the caller has already read whole, within the app's body limit (the
/// fast path): the same checks, in the same order, as [`put_record`]. Returns the
/// committed batch and the key, for the caller to answer with [`Written`].
pub async fn put_record_body(
    store: &Data<'_>,
    headers: &HeaderMap,
    body: Bytes,
    collection: &str,
    id: &str,
) -> Result<(Committed, Key), Box<Problem>> {
    let key = Key::new(collection, id).map_err(bad_key)?;
    let precondition = write_precondition(headers)?.unwrap_or_default();
    check_json_type(headers, false)?;
    check_json_syntax(&body)?;
    Ok((put(store, &key, precondition, body).await?, key))
}

async fn put(
    store: &Data<'_>,
    key: &Key,
    precondition: Precondition,
    body: Bytes,
) -> Result<Committed, Box<Problem>> {
    store
        .write(vec![Write {
            key: key.clone(),
            op: WriteOp::Put(body),
            precondition,
        }])
        .await
        .map_err(storage_problem)
}

/// The next id for a POST: a ULID, strictly increasing within this process. Two ids made
/// in the same millisecond differ in their random part, so plain `Ulid::new` orders them
/// by chance; the monotonic generator increments it instead.
fn next_id() -> ulid::Ulid {
    static IDS: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
    // Overflow needs 2^80 ids in one millisecond; a fresh random one is then still unique.
    ids.generate().unwrap_or_else(|_| ulid::Ulid::new())
}

/// POST to a collection: create with a server-made, time-ordered id (a ULID).
pub async fn create_record(
    store: &Data<'_>,
    settings: &AppSettings,
    headers: &HeaderMap,
    body: Incoming,
    collection: &str,
) -> ApiResult {
    let id = next_id().to_string();
    let key = Key::new(collection, &id).map_err(bad_key)?;
    let bytes = read_json(headers, body, settings, false).await?;
    let committed = store
        .write(vec![Write {
            key: key.clone(),
            op: WriteOp::Put(bytes),
            precondition: Precondition::Absent,
        }])
        .await
        .map_err(storage_problem)?;
    Ok(written(&committed, &key, StatusCode::CREATED))
}

/// How many times PATCH re-reads and retries when a concurrent write beat it. Every round
/// has a winner, so N patches racing on one record need up to N attempts; 32 covers the
/// suite's 10 with room (8 made it flaky).
const PATCH_ATTEMPTS: usize = 32;

/// PATCH: JSON Merge Patch (RFC 7396), applied under optimistic concurrency so concurrent
/// patches never lose each other's changes.
pub async fn patch_record(
    store: &Data<'_>,
    settings: &AppSettings,
    headers: &HeaderMap,
    body: Incoming,
    collection: &str,
    id: &str,
) -> ApiResult {
    let key = Key::new(collection, id).map_err(bad_key)?;
    let wanted = write_precondition(headers)?;
    if wanted == Some(Precondition::Absent) {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "PATCH cannot create; use PUT with If-None-Match: *",
        ));
    }
    let patch_bytes = read_json(headers, body, settings, true).await?;
    let patch: serde_json::Value = serde_json::from_slice(&patch_bytes)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    for _ in 0..PATCH_ATTEMPTS {
        let current = store
            .get(&key)
            .await
            .map_err(storage_problem)?
            .ok_or_else(|| {
                let status = if wanted.is_some() {
                    StatusCode::PRECONDITION_FAILED
                } else {
                    StatusCode::NOT_FOUND
                };
                problem(status, format!("no record {key}"))
            })?;
        if let Some(Precondition::Version(v)) = wanted {
            if v != current.lsn {
                return Err(storage_problem(StoreError::PreconditionFailed {
                    index: 0,
                    key,
                    current: Some(current.lsn),
                }));
            }
        }
        let mut doc: serde_json::Value = serde_json::from_slice(&current.body).map_err(|e| {
            storage_problem(StoreError::Internal(format!(
                "{key}: stored body is not JSON: {e}"
            )))
        })?;
        json_patch::merge(&mut doc, &patch);
        let new_body = serde_json::to_vec(&doc)
            .map_err(|e| problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let outcome = store
            .write(vec![Write {
                key: key.clone(),
                op: WriteOp::Put(Bytes::from(new_body)),
                precondition: Precondition::Version(current.lsn),
            }])
            .await;
        match outcome {
            Ok(committed) => return Ok(written(&committed, &key, StatusCode::OK)),
            Err(StoreError::PreconditionFailed { .. }) if wanted.is_none() => continue,
            Err(e) => return Err(storage_problem(e)),
        }
    }
    Err(problem(
        StatusCode::CONFLICT,
        format!("{key} kept changing during PATCH; retry"),
    ))
}

/// DELETE of one record.
pub async fn delete_record(
    store: &Data<'_>,
    headers: &HeaderMap,
    collection: &str,
    id: &str,
) -> ApiResult {
    let key = Key::new(collection, id).map_err(bad_key)?;
    let explicit = write_precondition(headers)?;
    let outcome = store
        .write(vec![Write {
            key: key.clone(),
            op: WriteOp::Delete,
            precondition: explicit.unwrap_or(Precondition::Exists),
        }])
        .await;
    match outcome {
        Ok(committed) => Ok(written(&committed, &key, StatusCode::OK)),
        Err(StoreError::PreconditionFailed { current: None, .. }) if explicit.is_none() => {
            Err(problem(StatusCode::NOT_FOUND, format!("no record {key}")))
        }
        Err(e) => Err(storage_problem(e)),
    }
}

/// GET of a collection: `?limit=&after=&prefix=`, in id order, with a `next` cursor.
pub async fn list(
    store: &Data<'_>,
    settings: &AppSettings,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    collection: &str,
) -> ApiResult {
    let consistency = read_consistency(headers, query);
    Key::check_collection(collection).map_err(bad_key)?;
    let mut q = ListQuery {
        limit: settings.list_default_limit,
        ..ListQuery::default()
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
            .decode_utf8()
            .map_err(|_| {
                problem(
                    StatusCode::BAD_REQUEST,
                    format!("query parameter {name} is not UTF-8"),
                )
            })?
            .into_owned();
        match name {
            "limit" => {
                let n: usize = value.parse().map_err(|_| {
                    problem(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be a positive integer, got {value:?}"),
                    )
                })?;
                if n == 0 {
                    return Err(problem(StatusCode::BAD_REQUEST, "limit must be at least 1"));
                }
                q.limit = n.min(settings.list_max_limit);
            }
            "after" => q.after = Some(value),
            "prefix" => q.prefix = value,
            "consistency" if value == "strong" || value == "eventual" => {}
            other => {
                return Err(problem(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown query parameter {other:?}; use limit, after, prefix, consistency=strong"
                    ),
                ))
            }
        }
    }
    let page = store
        .list_with(collection, &q, consistency)
        .await
        .map_err(storage_problem)?;
    let mut out = Vec::with_capacity(
        64 + page
            .items
            .iter()
            .map(|(_, r)| r.body.len() + 64)
            .sum::<usize>(),
    );
    out.extend_from_slice(b"{\"items\":[");
    for (i, (id, record)) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        out.extend_from_slice(serde_json::to_string(id).unwrap_or_default().as_bytes());
        out.extend_from_slice(b",\"etag\":");
        out.extend_from_slice(
            serde_json::to_string(&record.etag())
                .unwrap_or_default()
                .as_bytes(),
        );
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(&record.body);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"next\":");
    out.extend_from_slice(
        serde_json::to_string(&page.next)
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"}\n");
    let len = out.len();
    let mut resp = Response::new(if method == Method::HEAD {
        body::empty()
    } else {
        body::full(out)
    });
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

/// One write of a batch request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
// Strings are `Cow`: borrowed when plain, owned when the JSON escapes something (an ETag
// such as "\"12\"" always does), which a bare `&str` cannot represent.
struct BatchWrite<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    collection: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(borrow, default)]
    if_match: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    if_none_match: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    writes: Vec<BatchWrite<'a>>,
}

/// POST /api/v1/batch: all writes apply atomically, or none does.
pub async fn batch(
    store: &Data<'_>,
    settings: &AppSettings,
    headers: &HeaderMap,
    body: Incoming,
) -> ApiResult {
    let bytes = read_json(headers, body, settings, false).await?;
    let request: BatchRequest = serde_json::from_slice(&bytes)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, format!("invalid batch: {e}")))?;
    if request.writes.is_empty() {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "a batch needs at least one write",
        ));
    }
    if request.writes.len() > settings.max_batch_writes {
        return Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a batch may carry at most {} writes",
                settings.max_batch_writes
            ),
        ));
    }
    let mut writes = Vec::with_capacity(request.writes.len());
    for (i, w) in request.writes.iter().enumerate() {
        let at = |m: String| problem(StatusCode::BAD_REQUEST, format!("write {i}: {m}"));
        let key = Key::new(&w.collection, &w.id).map_err(|e| at(e.to_string()))?;
        let op = match (w.op.as_ref(), w.value) {
            ("put", Some(v)) => WriteOp::Put(Bytes::copy_from_slice(v.get().as_bytes())),
            ("put", None) => return Err(at("put needs a value".into())),
            ("delete", None) => WriteOp::Delete,
            ("delete", Some(_)) => return Err(at("delete takes no value".into())),
            (other, _) => return Err(at(format!("unknown op {other:?}; use put or delete"))),
        };
        let precondition = match (w.if_match.as_deref(), w.if_none_match.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(at("give if_match or if_none_match, not both".into()))
            }
            (Some("*"), None) => Precondition::Exists,
            (Some(tag), None) => Precondition::Version(
                parse_etag(tag)
                    .ok_or_else(|| at(format!("if_match {tag:?} is not an ETag like \"12\"")))?,
            ),
            (None, Some("*")) => Precondition::Absent,
            (None, Some(_)) => return Err(at("if_none_match supports only \"*\"".into())),
            (None, None) => Precondition::None,
        };
        writes.push(Write {
            key,
            op,
            precondition,
        });
    }
    let keys: Vec<Key> = writes.iter().map(|w| w.key.clone()).collect();
    let committed = store.write(writes).await.map_err(|e| match e {
        StoreError::PreconditionFailed { index, key, current } => problem(
            StatusCode::PRECONDITION_FAILED,
            format!(
                "write {index} ({key}): condition not met (current version {}); nothing was applied",
                current.map_or_else(|| "none".to_owned(), |v| format!("\"{v}\""))
            ),
        ),
        other => storage_problem(other),
    })?;
    let results: Vec<serde_json::Value> = keys
        .iter()
        .zip(&committed.results)
        .map(|(key, r)| {
            serde_json::json!({
                "collection": key.collection(),
                "id": key.id(),
                "etag": r.record.as_ref().map(Record::etag),
                "created": r.created,
            })
        })
        .collect();
    let out = serde_json::to_vec(&serde_json::json!({ "lsn": committed.lsn, "results": results }))
        .map_err(|e| problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut resp = Response::new(body::full(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    token_fields(&committed, append_to(resp.headers_mut()));
    Ok(resp)
}
