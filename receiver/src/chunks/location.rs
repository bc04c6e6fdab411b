//! Where a data folder's packs live. Nothing recorded: local pack files (the default). An
//! object store is recorded in `DATA/store.toml` by the first `serve --store s3://...`, so
//! every later command on the folder (restore, verify, gc, prune, export, drill) reads the
//! same bucket; a `--store` given to them must name it. Secrets are never recorded: the keys
//! come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`) or from a credentials file the record names.

use super::s3::{S3Packs, S3Target, DEFAULT_CACHE_BYTES};
use super::ChunkStoreError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The record's file name in the data folder.
pub const RECORD: &str = "store.toml";

#[derive(Debug, Error)]
pub enum LocationError {
    #[error("store {0:?}: expected s3://BUCKET[/PREFIX]")]
    BadUrl(String),
    #[error("no endpoint for the object store: set AWS_ENDPOINT_URL or endpoint in [store]")]
    NoEndpoint,
    #[error("object store endpoint {0:?} is not an http(s) URL")]
    BadEndpoint(String),
    #[error(
        "no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         or credentials_file in [store]"
    )]
    NoCredentials,
    #[error("credentials file {}: {message}", path.display())]
    CredentialsFile { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Record { path: PathBuf, message: String },
    #[error("data folder {} keeps its packs in {recorded}, not {wanted}", data.display())]
    Mismatch {
        data: PathBuf,
        recorded: String,
        wanted: String,
    },
    #[error("data folder {} already holds local packs: it cannot move to an object store", .0.display())]
    HasLocalPacks(PathBuf),
}

/// The `[store]` table of the receiver's configuration (every key optional; the environment
/// fills endpoint and region).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTable {
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub cache_mib: Option<u64>,
    pub credentials_file: Option<PathBuf>,
}

/// An object store location, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    pub endpoint: String,
    pub region: String,
    /// Path-style requests (`ENDPOINT/BUCKET/KEY`), as most self-hosted stores need.
    pub path_style: bool,
    pub cache_mib: Option<u64>,
    pub credentials_file: Option<PathBuf>,
}

/// The credentials file: `access_key_id = "..."`, `secret_access_key = "..."`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// Bucket and key prefix (empty or ending in `/`) of `s3://BUCKET[/PREFIX]`.
fn split_url(url: &str) -> Result<(String, String), LocationError> {
    let bad = || LocationError::BadUrl(url.to_owned());
    let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let prefix = prefix.trim_matches('/');
    if !valid_bucket || prefix.split('/').any(|p| p == ".." || p == ".") {
        return Err(bad());
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

impl Location {
    /// The location `--store URL` (or the table's `url`) names, with the table's keys and the
    /// environment's `AWS_ENDPOINT_URL` and `AWS_REGION` (the table wins).
    pub fn new(url: &str, table: &StoreTable) -> Result<Location, LocationError> {
        split_url(url)?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = table
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .ok_or(LocationError::NoEndpoint)?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(LocationError::BadEndpoint(endpoint));
        }
        Ok(Location {
            url: url.trim_end_matches('/').to_owned(),
            endpoint,
            region: table
                .region
                .clone()
                .or_else(|| env("AWS_REGION"))
                .unwrap_or_else(|| "us-east-1".to_owned()),
            path_style: table.path_style.unwrap_or(true),
            cache_mib: table.cache_mib,
            credentials_file: table.credentials_file.clone(),
        })
    }

    /// Where requests go, with the keys from the environment or the credentials file.
    pub fn target(&self) -> Result<S3Target, LocationError> {
        let (bucket, prefix) = split_url(&self.url)?;
        let endpoint = self
            .endpoint
            .parse()
            .map_err(|_| LocationError::BadEndpoint(self.endpoint.clone()))?;
        Ok(S3Target {
            endpoint,
            bucket,
            prefix,
            region: self.region.clone(),
            path_style: self.path_style,
            credentials: self.credentials()?,
        })
    }

    fn credentials(&self) -> Result<rusty_s3::Credentials, LocationError> {
        if let Some(path) = &self.credentials_file {
            let bad = |message: String| LocationError::CredentialsFile {
                path: path.clone(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let f: CredentialsFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            return Ok(match f.session_token {
                Some(t) => {
                    rusty_s3::Credentials::new_with_token(f.access_key_id, f.secret_access_key, t)
                }
                None => rusty_s3::Credentials::new(f.access_key_id, f.secret_access_key),
            });
        }
        rusty_s3::Credentials::from_env().ok_or(LocationError::NoCredentials)
    }

    /// The store at this location for data folder `data`.
    pub fn open(&self, data: &Path) -> Result<S3Packs, ChunkStoreError> {
        let limit = self.cache_mib.map_or(DEFAULT_CACHE_BYTES, |m| m << 20);
        S3Packs::open(data, &self.target()?, limit)
    }

    /// What the location is, for messages: `s3://bucket/prefix at endpoint`.
    pub fn shown(&self) -> String {
        format!("{} at {}", self.url, self.endpoint)
    }
}

/// The location data folder `data` recorded, if any.
pub fn recorded(data: &Path) -> Result<Option<Location>, LocationError> {
    let path = data.join(RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LocationError::Record {
                path,
                message: e.to_string(),
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| LocationError::Record {
            path,
            message: e.to_string(),
        })
}

/// Checks a `--store URL` given to a command against what data folder `data` recorded.
pub fn check(data: &Path, url: Option<&str>) -> Result<(), LocationError> {
    let Some(url) = url else { return Ok(()) };
    split_url(url)?;
    let recorded = recorded(data)?;
    let same = recorded
        .as_ref()
        .is_some_and(|r| r.url == url.trim_end_matches('/'));
    if same {
        return Ok(());
    }
    Err(LocationError::Mismatch {
        data: data.to_owned(),
        recorded: recorded.map_or_else(|| "local packs".to_owned(), |r| r.url),
        wanted: url.to_owned(),
    })
}

/// The location `serve` uses for `data`: the recorded one, or `wanted` for a folder without
/// local packs. `wanted` and the record must name the same bucket and prefix (keys, cache size
/// and endpoint may change). The caller [`record`]s the result once the store answered.
pub fn settle(data: &Path, wanted: Option<&Location>) -> Result<Option<Location>, LocationError> {
    let recorded = recorded(data)?;
    let loc = match (recorded, wanted) {
        (None, None) => return Ok(None),
        (Some(r), None) => return Ok(Some(r)),
        (Some(r), Some(w)) if r.url != w.url => {
            return Err(LocationError::Mismatch {
                data: data.to_owned(),
                recorded: r.url,
                wanted: w.url.clone(),
            })
        }
        (None, Some(w)) => {
            let local = data.join(super::local::PACKS_DIR);
            let has_packs = std::fs::read_dir(&local).is_ok_and(|mut d| d.next().is_some());
            if has_packs {
                return Err(LocationError::HasLocalPacks(data.to_owned()));
            }
            w.clone()
        }
        (Some(_), Some(w)) => w.clone(),
    };
    Ok(Some(loc))
}

/// Records `loc` for data folder `data`, atomically (a temporary file renamed over the
/// record, then the folder synced).
pub fn record(data: &Path, loc: &Location) -> Result<(), LocationError> {
    let path = data.join(RECORD);
    let bad = |e: std::io::Error| LocationError::Record {
        path: path.clone(),
        message: e.to_string(),
    };
    let text = toml::to_string(loc).map_err(|e| LocationError::Record {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::create_dir_all(data).map_err(bad)?;
    let tmp = data.join(format!(".{RECORD}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(bad)?;
        f.write_all(text.as_bytes()).map_err(bad)?;
        f.sync_all().map_err(bad)?;
    }
    std::fs::rename(&tmp, &path).map_err(bad)?;
    std::fs::File::open(data)
        .and_then(|d| d.sync_all())
        .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_a_bucket_and_a_prefix() {
        assert_eq!(
            split_url("s3://rewind").unwrap(),
            ("rewind".into(), String::new())
        );
        assert_eq!(
            split_url("s3://rewind/site-a/").unwrap(),
            ("rewind".into(), "site-a/".into())
        );
        for bad in ["rewind", "s3://", "s3://AB", "s3://a/../b", "http://x/y"] {
            assert!(
                matches!(split_url(bad), Err(LocationError::BadUrl(_))),
                "{bad}"
            );
        }
    }
}
