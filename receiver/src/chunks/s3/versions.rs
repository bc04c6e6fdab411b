//! Versions of objects, on buckets that keep them (Object Lock needs them): reads and checks
//! of the very version a pack was uploaded as, reads of an object a delete marker hides, and
//! deletes that remove every version (a plain DELETE there only hides an object, whose bytes
//! stay billed). A store without versions (Garage answers a version listing with 501) is
//! asked once, then treated as keeping none.

use super::client::{
    answer, refusal, small_text, tag_text, Attempt, BodyReader, ObjectStat, S3Client, S3Error,
    SIGNED_FOR,
};
use rusty_s3::actions::{DeleteObject, GetObject};
use rusty_s3::S3Action;
use std::sync::atomic::Ordering;

/// One entry of an object's version listing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    version: String,
    /// A delete marker, not bytes.
    marker: bool,
}

impl S3Client {
    /// Version `version` of object `name` (the current one when None), or its bytes `range`
    /// (offset, length), at most `limit` bytes, taken by `read`. A version the store no longer has, or does not know (a bucket copied
    /// elsewhere has versions of its own), falls back to a plain read, with a warning: what is
    /// read is checked by its reader either way.
    pub fn get_version<T>(
        &self,
        name: &str,
        version: Option<&str>,
        (range, limit): (Option<(u64, u64)>, u64),
        read: BodyReader<'_, T>,
    ) -> Result<T, S3Error> {
        let Some(v) = version else {
            return self.get_inner(name, range, limit, read);
        };
        let key = self.key(name);
        match self.get_at(&key, Some(v), range, limit, read) {
            Err(S3Error::Refused {
                status: 400 | 404,
                code,
                ..
            }) => {
                tracing::warn!(
                    key,
                    version = v,
                    code,
                    "the recorded version is not there: reading the object as it is now"
                );
                self.get_inner(name, range, limit, read)
            }
            done => done,
        }
    }

    /// [`S3Client::stat`] of version `version` (the current one when None); a version not
    /// there falls back as [`S3Client::get_version`] does.
    pub fn stat_version(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<ObjectStat>, S3Error> {
        let Some(v) = version else {
            return self.stat(name);
        };
        match self.stat_at(&self.key(name), Some(v)) {
            Ok(None) | Err(S3Error::Refused { status: 400, .. }) => {
                tracing::warn!(
                    name,
                    version = v,
                    "the recorded version is not there: looking at the object as it is now"
                );
                self.stat(name)
            }
            done => done,
        }
    }

    /// Deletes object `name`, every version of it on a bucket that keeps versions (a plain
    /// DELETE there only hides the object under a delete marker and its bytes stay billed);
    /// one already gone is not an error. A version the store refuses to delete (still under
    /// Object Lock) stays, with a warning: a later delete takes it.
    pub fn delete(&self, name: &str) -> Result<(), S3Error> {
        let key = self.key(name);
        let Some(versions) = self.versions(&key)? else {
            return self.delete_at(&key, None);
        };
        for l in versions {
            match self.delete_at(&key, Some(&l.version)) {
                Err(S3Error::Refused {
                    status: 403, code, ..
                }) => {
                    tracing::warn!(
                        key,
                        version = l.version,
                        code,
                        "an object version the store keeps (Object Lock) stays until its date"
                    );
                }
                done => done?,
            }
        }
        Ok(())
    }

    fn delete_at(&self, key: &str, version: Option<&str>) -> Result<(), S3Error> {
        let mut action = DeleteObject::new(&self.bucket, Some(&self.credentials), key);
        if let Some(v) = version {
            action.query_mut().insert("versionId", v.to_owned());
        }
        let url = action.sign(SIGNED_FOR);
        self.retry("DELETE", key, || {
            self.counters.deletes.fetch_add(1, Ordering::Relaxed);
            match answer(self.agent.delete(url.as_str()).call()) {
                Ok(mut r) => match r.status().as_u16() {
                    200 | 204 | 404 => Attempt::Done(()),
                    _ => refusal(&mut r, "DELETE", key),
                },
                Err(m) => Attempt::Again(m),
            }
        })
    }

    /// The newest version of object `key` that is not a delete marker, when the object reads
    /// as absent but such a version exists (a versioned bucket). Logged: it means someone
    /// deleted an object this store still needs.
    pub(super) fn hidden_version(&self, key: &str) -> Result<Option<String>, S3Error> {
        let version = self
            .versions(key)?
            .unwrap_or_default()
            .into_iter()
            .find(|l| !l.marker)
            .map(|l| l.version);
        if let Some(v) = &version {
            tracing::warn!(key, version = %v, "object hidden by a delete marker: reading its newest version");
        }
        Ok(version)
    }

    /// The versions and delete markers of object `key`, newest first (one listing page: up
    /// to 1000); None when the store keeps no versions (it answers 501, as Garage does).
    fn versions(&self, key: &str) -> Result<Option<Vec<Listed>>, S3Error> {
        if self.no_versions.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut action = GetObject::new(&self.bucket, Some(&self.credentials), "");
        action.query_mut().insert("versions", "");
        action.query_mut().insert("prefix", key.to_owned());
        let url = action.sign(SIGNED_FOR);
        let text = self.retry("LIST versions", key, || {
            self.counters.lists.fetch_add(1, Ordering::Relaxed);
            match answer(self.agent.get(url.as_str()).call()) {
                Ok(mut r) if r.status().as_u16() == 200 => match small_text(&mut r) {
                    Ok(t) => Attempt::Done(Some(t)),
                    Err(e) => Attempt::Again(e),
                },
                Ok(r) if r.status().as_u16() == 501 => Attempt::Done(None),
                Ok(mut r) => refusal(&mut r, "LIST versions", key),
                Err(m) => Attempt::Again(m),
            }
        })?;
        let Some(text) = text else {
            self.no_versions.store(true, Ordering::Relaxed);
            return Ok(None);
        };
        // Versions and delete markers are elements of their own, each in listing order.
        let mut listed: Vec<(usize, Listed)> = Vec::new();
        for (element, marker) in [("Version", false), ("DeleteMarker", true)] {
            let (open, close) = (format!("<{element}>"), format!("</{element}>"));
            let mut at = 0;
            while let Some(start) = text[at..].find(&open).map(|i| at + i) {
                let body_at = start + open.len();
                let Some(len) = text[body_at..].find(&close) else {
                    break;
                };
                let body = &text[body_at..body_at + len];
                at = body_at + len;
                if tag_text(body, "Key").as_deref() != Some(key) {
                    continue;
                }
                if let Some(version) = tag_text(body, "VersionId") {
                    listed.push((start, Listed { version, marker }));
                }
            }
        }
        listed.sort_by_key(|(at, _)| *at);
        Ok(Some(listed.into_iter().map(|(_, l)| l).collect()))
    }
}
