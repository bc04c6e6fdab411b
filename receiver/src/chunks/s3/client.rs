//! A small blocking S3 client: requests signed by `rusty-s3` (SigV4, sans-IO), sent by `ureq`
//! (rustls on ring, the provider the whole build uses). Blocking fits the chunk store's
//! interface, whose callers already run on threads of their own.
//!
//! Every request is bounded in time ([`REQUEST_LIMIT`], [`CONNECT_LIMIT`]) and retried with
//! exponential backoff on what may pass (transport errors, 5xx, 429, a conflicting conditional
//! write) up to [`ATTEMPTS`] times; anything else is an error at once. Pack objects are written
//! create-only (`If-None-Match: *`) with a SHA-256 checksum the store verifies and keeps.

use base64::Engine;
use rusty_s3::actions::{GetObject, HeadObject, ListObjectsV2, PutObject};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sha2::Digest;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use url::Url;

/// Takes a GET's body: returns what it made of it and the bytes read. Called again on each
/// try of the request, so it must start over (a file it writes is created anew).
pub(super) type BodyReader<'a, T> = &'a dyn Fn(&mut dyn std::io::Read) -> std::io::Result<(T, u64)>;

/// A body read into memory.
pub(super) fn to_vec(body: &mut dyn std::io::Read) -> std::io::Result<(Vec<u8>, u64)> {
    let mut v = Vec::new();
    let n = body.read_to_end(&mut v)?;
    Ok((v, n as u64))
}

/// Where a GET's body is written: a file, and the same file opened with O_DIRECT (where the
/// file system takes it) for the whole pages.
#[derive(Clone, Copy)]
pub(super) struct Sink<'a> {
    pub file: &'a std::fs::File,
    pub direct: Option<&'a std::fs::File>,
    /// Where in the file the body's first byte goes (page-aligned for O_DIRECT).
    pub at: u64,
}

/// Bytes of each write of [`to_file`] (all but the last of a body).
pub(super) const WRITE_BYTES: usize = 1 << 20;

/// Alignment O_DIRECT needs of offsets, lengths and memory.
const DIRECT_ALIGN: usize = 4096;

/// A body written into `to` from its offset, [`WRITE_BYTES`] at a time (a pack never sits in
/// memory whole), `written` called after each write with the bytes written so far and those
/// just written; the file is not
/// synced. Whole pages go through the O_DIRECT handle: a download copied into the page cache
/// costs more CPU than the decompression of what it holds, where fresh memory is slow to
/// come by, and fills the page cache with packs. A later try of the same request (the
/// connection broke part way) writes only what the earlier ones did not: the bytes already
/// written stay as they are, so a reader of them never sees them change. Returns the body's
/// size (twice: what it made, and the bytes this try read).
pub(super) fn to_file<'a>(
    to: Sink<'a>,
    written: &'a (dyn Fn(u64, &[u8]) + Sync),
) -> impl Fn(&mut dyn std::io::Read) -> std::io::Result<(u64, u64)> + 'a {
    let done = AtomicU64::new(0);
    let direct_ok = std::sync::atomic::AtomicBool::new(to.direct.is_some());
    move |body| {
        use std::os::unix::fs::FileExt;
        let mut space = vec![0u8; WRITE_BYTES + DIRECT_ALIGN];
        let at = space.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        let buf = &mut space[at..at + WRITE_BYTES];
        let kept = done.load(Ordering::Relaxed);
        // Skips what an earlier try wrote.
        let skipped = std::io::copy(
            &mut std::io::Read::take(&mut *body, kept),
            &mut std::io::sink(),
        )?;
        if skipped < kept {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the body ended after {skipped} bytes, before the {kept} read before"),
            ));
        }
        let mut n = kept;
        loop {
            // A full buffer per write: the body comes in much smaller reads.
            let mut filled = 0;
            while filled < buf.len() {
                match body.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(got) => filled += got,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                return Ok((n, n));
            }
            // Whole pages at a page-aligned offset (every write but the last starts on one).
            let pages = match to.direct {
                Some(_) if (to.at + n).is_multiple_of(DIRECT_ALIGN as u64) => {
                    filled / DIRECT_ALIGN * DIRECT_ALIGN
                }
                _ => 0,
            };
            let mut sent = 0;
            if let Some(d) = to
                .direct
                .filter(|_| pages > 0 && direct_ok.load(Ordering::Relaxed))
            {
                match d.write_all_at(&buf[..pages], to.at + n) {
                    Ok(()) => sent = pages,
                    // A file system that opens with O_DIRECT but refuses such writes.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
            // The rest (the last partial page, or all where O_DIRECT is refused) is cached.
            to.file
                .write_all_at(&buf[sent..filled], to.at + n + sent as u64)?;
            n += filled as u64;
            done.store(n, Ordering::Relaxed);
            written(n, &buf[..filled]);
        }
    }
}

/// How long a signed request stays valid (it is sent at once; this only covers clock skew
/// and retries).
pub(super) const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);
/// Longest one request may take, body included (a 64 MiB pack at ~2 MB/s).
const REQUEST_LIMIT: Duration = Duration::from_secs(60);
/// Longest a connection may take to open.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Tries per request.
const ATTEMPTS: u32 = 5;
/// Backoff before the second try; doubled before each next one, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest answer to a listing or an error (bytes).
pub(super) const SMALL_BODY: u64 = 8 << 20;

#[derive(Debug, Clone, Error)]
pub enum S3Error {
    /// The store could not be reached, or did not answer in time, after every retry.
    #[error("object store unreachable for {op} {key} after {ATTEMPTS} tries: {message}")]
    Unreachable {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The store refused the request.
    #[error("object store refused {op} {key}: HTTP {status} {code}: {message}")]
    Refused {
        op: &'static str,
        key: String,
        status: u16,
        code: String,
        message: String,
    },
    /// The store's answer could not be read.
    #[error("object store {op} {key}: unreadable answer: {detail}")]
    Answer {
        op: &'static str,
        key: String,
        detail: String,
    },
    /// The store's location or credentials are not usable.
    #[error("object store configuration: {0}")]
    Config(String),
}

/// Requests and bytes, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// Where the store is and who we are to it.
#[derive(Debug, Clone)]
pub struct S3Target {
    pub endpoint: Url,
    pub bucket: String,
    /// Key prefix, empty or ending in `/`.
    pub prefix: String,
    pub region: String,
    pub path_style: bool,
    pub credentials: Credentials,
}

/// What a HEAD tells of an object.
#[derive(Debug, Clone)]
pub struct ObjectStat {
    pub size: u64,
    pub modified_us: Option<i64>,
    /// Without quotes; the MD5 of the bytes (hex) for an object written in one PUT.
    pub etag: Option<String>,
    /// The SHA-256 the store keeps (base64), when it keeps one and says so.
    pub sha256: Option<String>,
    /// The version the store answered for (a versioned bucket), as `x-amz-version-id` said.
    pub version: Option<String>,
}

/// What a create-only write came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// The object was created; a versioned bucket names the version that holds these bytes.
    Created { version: Option<String> },
    /// An object of that name was there already (the store refused with 412).
    Taken,
}

/// One bucket (under a prefix) of an S3-compatible store.
pub struct S3Client {
    pub(super) bucket: Bucket,
    pub(super) credentials: Credentials,
    prefix: String,
    pub(super) agent: ureq::Agent,
    pub counters: Counters,
    /// The store answered a version listing with 501 (Garage keeps no versions): no listing
    /// is asked for again.
    pub(super) no_versions: std::sync::atomic::AtomicBool,
}

/// What a single attempt came to.
pub(super) enum Attempt<T> {
    Done(T),
    /// Worth another try (the message says what went wrong).
    Again(String),
    Fail(S3Error),
}

impl S3Client {
    pub fn new(t: &S3Target) -> Result<S3Client, S3Error> {
        let style = if t.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            t.endpoint.clone(),
            style,
            t.bucket.clone(),
            t.region.clone(),
        )
        .map_err(|e| S3Error::Config(format!("bucket {}: {e}", t.bucket)))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_LIMIT))
            .timeout_connect(Some(CONNECT_LIMIT))
            .max_idle_connections_per_host(16)
            .build()
            .new_agent();
        Ok(S3Client {
            bucket,
            credentials: t.credentials.clone(),
            prefix: t.prefix.clone(),
            agent,
            counters: Counters::default(),
            no_versions: Default::default(),
        })
    }

    /// The full key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs `once` up to [`ATTEMPTS`] times with backoff between tries.
    pub(super) fn retry<T>(
        &self,
        op: &'static str,
        key: &str,
        mut once: impl FnMut() -> Attempt<T>,
    ) -> Result<T, S3Error> {
        let mut wait = FIRST_BACKOFF;
        let mut last = String::new();
        for n in 0..ATTEMPTS {
            if n > 0 {
                tracing::debug!(op, key, error = %last, "object store: retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            match once() {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fail(e) => return Err(e),
                Attempt::Again(m) => last = m,
            }
        }
        Err(S3Error::Unreachable {
            op,
            key: key.to_owned(),
            message: last,
        })
    }

    /// Stores `body` as object `name` unless one is there already (the store refuses with
    /// 412): what the write came to, with the version a versioned bucket made.
    pub fn put_new(&self, name: &str, body: &[u8]) -> Result<Put, S3Error> {
        self.put_new_summed(name, body, &sha2::Sha256::digest(body).into())
    }

    /// [`S3Client::put_new`] of a body whose SHA-256 the caller took already.
    pub fn put_new_summed(
        &self,
        name: &str,
        body: &[u8],
        sha256: &[u8; 32],
    ) -> Result<Put, S3Error> {
        let key = self.key(name);
        let sum = base64::engine::general_purpose::STANDARD.encode(sha256);
        let mut action = PutObject::new(&self.bucket, Some(&self.credentials), &key);
        action.headers_mut().insert("if-none-match", "*");
        action
            .headers_mut()
            .insert("x-amz-checksum-sha256", sum.clone());
        let url = action.sign(SIGNED_FOR);
        self.retry("PUT", &key, || {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .agent
                .put(url.as_str())
                .header("if-none-match", "*")
                .header("x-amz-checksum-sha256", &sum)
                .send(body);
            match answer(sent) {
                Ok(mut r) => match r.status().as_u16() {
                    200 | 201 => {
                        self.counters
                            .bytes_up
                            .fetch_add(body.len() as u64, Ordering::Relaxed);
                        Attempt::Done(Put::Created {
                            version: version_of(&r),
                        })
                    }
                    412 => Attempt::Done(Put::Taken),
                    _ => refusal(&mut r, "PUT", &key),
                },
                Err(m) => Attempt::Again(m),
            }
        })
    }

    /// Puts object `name` under Object Lock in COMPLIANCE mode until `until_us` (microseconds
    /// since the epoch). The bucket must have Object Lock enabled. A date earlier than the
    /// one in force is refused by the store (COMPLIANCE only extends). With `version`, that
    /// version is the one locked (not whatever was written over it since).
    pub fn retain(&self, name: &str, version: Option<&str>, until_us: i64) -> Result<(), S3Error> {
        let key = self.key(name);
        let until = time::OffsetDateTime::from_unix_timestamp(until_us.div_euclid(1_000_000))
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .ok_or_else(|| S3Error::Config(format!("lock date {until_us} out of range")))?;
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Mode>COMPLIANCE</Mode><RetainUntilDate>{until}</RetainUntilDate></Retention>"
        );
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
        let mut action = PutObject::new(&self.bucket, Some(&self.credentials), &key);
        action.query_mut().insert("retention", "");
        if let Some(v) = version {
            action.query_mut().insert("versionId", v.to_owned());
        }
        action.headers_mut().insert("content-md5", md5.clone());
        let url = action.sign(SIGNED_FOR);
        self.retry("PUT retention", &key, || {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .agent
                .put(url.as_str())
                .header("content-md5", &md5)
                .send(body.as_bytes());
            match answer(sent) {
                Ok(mut r) => match r.status().as_u16() {
                    200 | 204 => Attempt::Done(()),
                    _ => refusal(&mut r, "PUT retention", &key),
                },
                Err(m) => Attempt::Again(m),
            }
        })
    }

    /// Object `name` whole, at most `limit` bytes.
    pub fn get(&self, name: &str, limit: u64) -> Result<Vec<u8>, S3Error> {
        self.get_inner(name, None, limit, &to_vec)
    }

    /// `len` bytes of object `name` from `offset`.
    pub fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, S3Error> {
        self.get_inner(name, Some((offset, len)), len, &to_vec)
    }

    /// A GET of object `name`, its body taken by `read`. When a delete marker hides the
    /// object (someone holding the store's keys deleted it: under Object Lock its versions
    /// stay), its newest version is read instead, so a thief's plain DELETE cannot make
    /// locked history unreadable.
    pub(super) fn get_inner<T>(
        &self,
        name: &str,
        range: Option<(u64, u64)>,
        limit: u64,
        read: BodyReader<'_, T>,
    ) -> Result<T, S3Error> {
        let key = self.key(name);
        let first = self.get_at(&key, None, range, limit, read);
        if !matches!(first, Err(S3Error::Refused { status: 404, .. })) {
            return first;
        }
        // A listing that fails leaves the read's own answer standing.
        match self.hidden_version(&key) {
            Ok(Some(v)) => self.get_at(&key, Some(&v), range, limit, read),
            _ => first,
        }
    }

    /// A GET of `key` (of `version`, of `range`), its body (at most `limit` bytes) taken by
    /// `read`, again on each try.
    pub(super) fn get_at<T>(
        &self,
        key: &str,
        version: Option<&str>,
        range: Option<(u64, u64)>,
        limit: u64,
        read: BodyReader<'_, T>,
    ) -> Result<T, S3Error> {
        let key = key.to_owned();
        let mut action = GetObject::new(&self.bucket, Some(&self.credentials), &key);
        if let Some(v) = version {
            action.query_mut().insert("versionId", v.to_owned());
        }
        let url = action.sign(SIGNED_FOR);
        self.retry("GET", &key, || {
            self.counters.gets.fetch_add(1, Ordering::Relaxed);
            let mut req = self.agent.get(url.as_str());
            if let Some((off, len)) = range {
                req = req.header("range", &format!("bytes={off}-{}", off + len.max(1) - 1));
            }
            match answer(req.call()) {
                Ok(mut r) => match r.status().as_u16() {
                    200 | 206 => {
                        let mut body = r.body_mut().with_config().limit(limit).reader();
                        match read(&mut body) {
                            Ok((got, n)) => {
                                self.counters.bytes_down.fetch_add(n, Ordering::Relaxed);
                                Attempt::Done(got)
                            }
                            Err(e) => Attempt::Again(format!("reading the body: {e}")),
                        }
                    }
                    _ => refusal(&mut r, "GET", &key),
                },
                Err(m) => Attempt::Again(m),
            }
        })
    }

    /// Size and last change (microseconds since the epoch) of object `name`, None when it is
    /// not there.
    pub fn head(&self, name: &str) -> Result<Option<(u64, Option<i64>)>, S3Error> {
        Ok(self.stat(name)?.map(|s| (s.size, s.modified_us)))
    }

    /// What the store says of object `name` (checksums included where it keeps them), None
    /// when it is not there.
    /// When a delete marker hides the object, its newest version is the one described (see
    /// [`S3Client::get`]).
    pub fn stat(&self, name: &str) -> Result<Option<ObjectStat>, S3Error> {
        let key = self.key(name);
        match self.stat_at(&key, None)? {
            Some(s) => Ok(Some(s)),
            None => match self.hidden_version(&key) {
                Ok(Some(v)) => self.stat_at(&key, Some(&v)),
                _ => Ok(None),
            },
        }
    }

    pub(super) fn stat_at(
        &self,
        key: &str,
        version: Option<&str>,
    ) -> Result<Option<ObjectStat>, S3Error> {
        let key = key.to_owned();
        let mut action = HeadObject::new(&self.bucket, Some(&self.credentials), &key);
        if let Some(v) = version {
            action.query_mut().insert("versionId", v.to_owned());
        }
        action
            .headers_mut()
            .insert("x-amz-checksum-mode", "ENABLED");
        let url = action.sign(SIGNED_FOR);
        self.retry("HEAD", &key, || {
            self.counters.heads.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .agent
                .head(url.as_str())
                .header("x-amz-checksum-mode", "ENABLED")
                .call();
            match answer(sent) {
                Ok(mut r) => match r.status().as_u16() {
                    200 => {
                        let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok());
                        let stat = h("content-length")
                            .and_then(|v| v.parse().ok())
                            .map(|size| ObjectStat {
                                size,
                                modified_us: h("last-modified").and_then(http_date_us),
                                etag: h("etag").map(|e| e.trim_matches('"').to_owned()),
                                sha256: h("x-amz-checksum-sha256").map(str::to_owned),
                                version: version_of(&r),
                            });
                        match stat {
                            Some(s) => Attempt::Done(Some(s)),
                            None => Attempt::Fail(S3Error::Answer {
                                op: "HEAD",
                                key: key.clone(),
                                detail: "no content-length".into(),
                            }),
                        }
                    }
                    404 => Attempt::Done(None),
                    _ => refusal(&mut r, "HEAD", &key),
                },
                Err(m) => Attempt::Again(m),
            }
        })
    }

    /// Every object whose name starts with `name_prefix` (under the client's prefix): names
    /// without the client's prefix, and sizes.
    pub fn list(&self, name_prefix: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let key = self.key(name_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
            action.with_prefix(key.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGNED_FOR);
            let page = self.retry("LIST", &key, || {
                self.counters.lists.fetch_add(1, Ordering::Relaxed);
                match answer(self.agent.get(url.as_str()).call()) {
                    Ok(mut r) if r.status().as_u16() == 200 => match small_text(&mut r) {
                        Ok(text) => Attempt::Done(text),
                        Err(e) => Attempt::Again(e),
                    },
                    Ok(mut r) => refusal(&mut r, "LIST", &key),
                    Err(m) => Attempt::Again(m),
                }
            })?;
            let parsed = ListObjectsV2::parse_response(&page).map_err(|e| S3Error::Answer {
                op: "LIST",
                key: key.clone(),
                detail: e.to_string(),
            })?;
            for c in parsed.contents {
                if let Some(name) = c.key.strip_prefix(&self.prefix) {
                    out.push((name.to_owned(), c.size.unwrap_or(0)));
                }
            }
            match parsed.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }
}

/// A small answer's body (a listing, an error, a multipart result), at most [`SMALL_BODY`]
/// bytes; the reason when it cannot be read (worth another try).
pub(super) fn small_text(r: &mut ureq::http::Response<ureq::Body>) -> Result<String, String> {
    r.body_mut()
        .with_config()
        .limit(SMALL_BODY)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))
}

/// A transport error's message (worth another try).
pub(super) fn answer(
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<ureq::http::Response<ureq::Body>, String> {
    sent.map_err(|e| e.to_string())
}

/// A non-success answer: retried when it may pass (5xx, 429, a conflicting conditional
/// write), an error otherwise, with the store's code and message.
pub(super) fn refusal<T>(
    r: &mut ureq::http::Response<ureq::Body>,
    op: &'static str,
    key: &str,
) -> Attempt<T> {
    let status = r.status().as_u16();
    let body = small_text(r).unwrap_or_default();
    let tag = |t: &str| tag_text(&body, t).unwrap_or_default();
    let (code, message) = (tag("Code"), tag("Message"));
    if status >= 500 || status == 429 || (status == 409 && code == "ConditionalRequestConflict") {
        return Attempt::Again(format!("HTTP {status} {code}: {message}"));
    }
    Attempt::Fail(S3Error::Refused {
        op,
        key: key.to_owned(),
        status,
        code,
        message,
    })
}

/// The version an answer names (`x-amz-version-id`), unless it names none (`null`: a bucket
/// without versioning).
fn version_of(r: &ureq::http::Response<ureq::Body>) -> Option<String> {
    let v = r.headers().get("x-amz-version-id")?.to_str().ok()?;
    (!v.is_empty() && v != "null").then(|| v.to_owned())
}

/// The text of the first `<tag>` element in `xml`.
pub(super) fn tag_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let rest = &xml[xml.find(&open)? + open.len()..];
    Some(rest[..rest.find(&format!("</{tag}>"))?].to_owned())
}

/// An HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`) in microseconds since the epoch.
fn http_date_us(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc2822).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_read_as_microseconds() {
        assert_eq!(
            http_date_us("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1_445_412_480_000_000)
        );
        assert_eq!(http_date_us("yesterday"), None);
    }

    /// A body that breaks (connection reset) after its first `cut` bytes.
    struct Cut<'a>(&'a [u8], usize);

    impl std::io::Read for Cut<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.1 == 0 {
                return Err(std::io::ErrorKind::ConnectionReset.into());
            }
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            self.1 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_body_cut_part_way_is_resumed_and_what_was_written_is_not_written_again() {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part");
        let open = |flags: i32| {
            std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(flags)
                .open(&path)
        };
        let file = open(0).unwrap();
        // O_DIRECT where the file system takes it (the whole pages go that way).
        let direct = open(rustix::fs::OFlags::DIRECT.bits() as i32).ok();
        let body: Vec<u8> = (0..(3 << 20) + 12_345u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let seen = std::sync::Mutex::new(Vec::new());
        let written = |n: u64, bytes: &[u8]| {
            // The bytes just written are the body's, ending at `n`.
            assert_eq!(bytes, &body[n as usize - bytes.len()..n as usize]);
            seen.lock().unwrap().push(n);
        };
        let sink = Sink {
            file: &file,
            direct: direct.as_ref(),
            at: 8192,
        };
        let read = to_file(sink, &written);
        // The first try breaks after 1.5 MiB: the whole first megabyte is written.
        let err = read(&mut Cut(&body, 3 << 19)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(*seen.lock().unwrap(), vec![1 << 20]);
        // Bytes a reader was told of are not written again: marked here, they stay marked.
        file.write_all_at(b"MARK", 8192 + 100).unwrap();
        // A try whose body ends before what was written is refused.
        let err = read(&mut &body[..1000]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // The next try writes the rest only.
        let (size, got) = read(&mut &body[..]).unwrap();
        assert_eq!((size, got), (body.len() as u64, body.len() as u64));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![1 << 20, 2 << 20, 3 << 20, body.len() as u64]
        );
        let mut want = vec![0u8; 8192];
        want.extend_from_slice(&body);
        want[8192 + 100..8192 + 104].copy_from_slice(b"MARK");
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
