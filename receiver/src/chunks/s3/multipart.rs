//! Objects larger than one request should carry: uploaded in parts read from a file one at a
//! time, and fetched into a file as they stream, so memory stays at one part whatever the
//! object's size (a large store's catalog snapshot runs to gigabytes).

use super::client::{answer, refusal, small_text, Attempt, S3Client, S3Error, SIGNED_FOR};
use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, UploadPart,
};
use rusty_s3::S3Action;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

/// Objects up to this size go up in one PUT; larger ones in parts of this size.
pub const PART_BYTES: u64 = 64 << 20;

fn io_failed(op: &'static str, key: &str, e: std::io::Error) -> S3Error {
    S3Error::Answer {
        op,
        key: key.to_owned(),
        detail: format!("local file: {e}"),
    }
}

impl S3Client {
    /// Stores the file at `path` as object `name`: in one create-only PUT up to
    /// [`PART_BYTES`], in parts beyond (an upload that fails part-way is aborted, so no
    /// parts are left billed). Returns false when a one-PUT object's name was taken.
    pub fn put_file(&self, name: &str, path: &Path) -> Result<bool, S3Error> {
        self.put_file_in(name, path, PART_BYTES)
    }

    /// [`S3Client::put_file`] with parts of `part` bytes (at least 5 MiB, as S3 wants of
    /// every part but the last).
    pub fn put_file_in(&self, name: &str, path: &Path, part: u64) -> Result<bool, S3Error> {
        let part = part.max(5 << 20);
        let key = self.key(name);
        let file = File::open(path).map_err(|e| io_failed("PUT", &key, e))?;
        let size = file
            .metadata()
            .map_err(|e| io_failed("PUT", &key, e))?
            .len();
        if size <= part {
            let bytes = std::fs::read(path).map_err(|e| io_failed("PUT", &key, e))?;
            return Ok(self.put_new(name, &bytes)? != super::Put::Taken);
        }
        let upload = self.create_upload(&key)?;
        let done = self.upload_parts(&key, &upload, &file, (size, part));
        match done {
            Ok(etags) => match self.complete(&key, &upload, &etags) {
                Ok(()) => Ok(true),
                Err(e) => {
                    self.abort(&key, &upload);
                    Err(e)
                }
            },
            Err(e) => {
                self.abort(&key, &upload);
                Err(e)
            }
        }
    }

    fn create_upload(&self, key: &str) -> Result<String, S3Error> {
        let url =
            CreateMultipartUpload::new(&self.bucket, Some(&self.credentials), key).sign(SIGNED_FOR);
        let text = self.retry("POST uploads", key, || {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
            match answer(self.agent.post(url.as_str()).send_empty()) {
                Ok(mut r) if r.status().as_u16() == 200 => match small_text(&mut r) {
                    Ok(t) => Attempt::Done(t),
                    Err(e) => Attempt::Again(e),
                },
                Ok(mut r) => refusal(&mut r, "POST uploads", key),
                Err(m) => Attempt::Again(m),
            }
        })?;
        CreateMultipartUpload::parse_response(&text)
            .map(|r| r.upload_id().to_owned())
            .map_err(|e| S3Error::Answer {
                op: "POST uploads",
                key: key.to_owned(),
                detail: e.to_string(),
            })
    }

    /// Uploads `file` in parts; returns their ETags in order.
    fn upload_parts(
        &self,
        key: &str,
        upload: &str,
        file: &File,
        (size, part): (u64, u64),
    ) -> Result<Vec<String>, S3Error> {
        let parts = size.div_ceil(part);
        if parts > 10_000 {
            return Err(S3Error::Config(format!(
                "{key}: {size} bytes need more than 10000 parts"
            )));
        }
        let mut etags = Vec::with_capacity(parts as usize);
        let mut buf = Vec::new();
        for n in 0..parts {
            let off = n * part;
            let len = (size - off).min(part) as usize;
            buf.resize(len, 0);
            file.read_exact_at(&mut buf, off)
                .map_err(|e| io_failed("PUT part", key, e))?;
            let url = UploadPart::new(
                &self.bucket,
                Some(&self.credentials),
                key,
                (n + 1) as u16,
                upload,
            )
            .sign(SIGNED_FOR);
            let etag = self.retry("PUT part", key, || {
                self.counters.puts.fetch_add(1, Ordering::Relaxed);
                match answer(self.agent.put(url.as_str()).send(&buf[..])) {
                    Ok(r) if r.status().as_u16() == 200 => {
                        match r.headers().get("etag").and_then(|v| v.to_str().ok()) {
                            Some(e) => {
                                self.counters
                                    .bytes_up
                                    .fetch_add(len as u64, Ordering::Relaxed);
                                Attempt::Done(e.to_owned())
                            }
                            None => Attempt::Again("a part's answer without an ETag".into()),
                        }
                    }
                    Ok(mut r) => refusal(&mut r, "PUT part", key),
                    Err(m) => Attempt::Again(m),
                }
            })?;
            etags.push(etag);
        }
        Ok(etags)
    }

    fn complete(&self, key: &str, upload: &str, etags: &[String]) -> Result<(), S3Error> {
        let action = CompleteMultipartUpload::new(
            &self.bucket,
            Some(&self.credentials),
            key,
            upload,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let body = action.body();
        self.retry("POST complete", key, || {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
            match answer(self.agent.post(url.as_str()).send(body.as_bytes())) {
                // A 200 may still carry an error in its body (the store failed part-way).
                // Only a result naming the object's ETag says it is done.
                Ok(mut r) if r.status().as_u16() == 200 => match small_text(&mut r) {
                    Ok(t) if t.contains("<ETag>") && !t.contains("<Error>") => Attempt::Done(()),
                    Ok(t) => Attempt::Again(format!("completing the upload: {t}")),
                    Err(e) => Attempt::Again(e),
                },
                Ok(mut r) => refusal(&mut r, "POST complete", key),
                Err(m) => Attempt::Again(m),
            }
        })
    }

    /// Best effort: a part-way upload's parts are dropped (a lifecycle rule catches the rest).
    fn abort(&self, key: &str, upload: &str) {
        let url = AbortMultipartUpload::new(&self.bucket, Some(&self.credentials), key, upload)
            .sign(SIGNED_FOR);
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.agent.delete(url.as_str()).call() {
            tracing::warn!(key, error = %e, "aborting a multipart upload failed");
        }
    }

    /// Writes object `name` into the file at `path` as it streams (at most `limit` bytes),
    /// synced; returns its size.
    pub fn get_file(&self, name: &str, path: &Path, limit: u64) -> Result<u64, S3Error> {
        self.get_at(&self.key(name), None, None, limit, &|body| {
            // Each try starts over in a new file.
            let file = File::create(path)?;
            let to = super::client::Sink {
                file: &file,
                direct: None,
                at: 0,
            };
            let got = super::client::to_file(to, &|_, _| {})(body)?;
            file.sync_all()?;
            Ok(got)
        })
    }
}
