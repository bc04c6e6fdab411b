//! The store alone: how fast the bucket itself takes and gives back the pack objects a seed
//! stored, sent by the receiver's own S3 client with a few requests in flight. It bounds what
//! the receiver can reach against this store on this machine, so the seed and cold-restore
//! times read against it as well as against local packs.

use anyhow::{Context, Result};
use rewind_receiver::chunks::location::{Location, StoreTable};
use rewind_receiver::chunks::s3::S3Client;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Requests in flight: more than a receiver's upload stream keeps (two uploads while the
/// next pack fills) and as many as a restore's reads (a pack and two ahead, plus one).
pub const IN_FLIGHT: usize = 4;

/// What the store alone did with the pack objects of one seed.
pub struct Ceiling {
    pub objects: usize,
    pub bytes: u64,
    pub put_secs: f64,
    pub get_secs: f64,
}

/// Puts every file of `packs` into the bucket under `ceiling/`, then gets each back, with
/// [`IN_FLIGHT`] requests at a time; removes them after.
pub fn measure(env: &[(&'static str, String)], w: &Path, packs: &Path) -> Result<Ceiling> {
    let client = client(env, w)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(packs)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    let name = |i: usize| format!("ceiling/{i:06}.pack");
    let t = Instant::now();
    each(files.len(), |i| {
        let body = std::fs::read(&files[i])?;
        client.put_new(&name(i), &body)?;
        Ok(())
    })?;
    let put_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    each(files.len(), |i| {
        client.get(&name(i), u64::MAX)?;
        Ok(())
    })?;
    let get_secs = t.elapsed().as_secs_f64();
    each(files.len(), |i| Ok(client.delete(&name(i))?))?;
    Ok(Ceiling {
        objects: files.len(),
        bytes,
        put_secs,
        get_secs,
    })
}

/// Runs `job` for 0..n on [`IN_FLIGHT`] threads; the first error wins.
fn each(n: usize, job: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        job(i)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?)
    })
}

/// The receiver's S3 client for bucket `bench`, from the bucket's environment.
fn client(env: &[(&'static str, String)], w: &Path) -> Result<S3Client> {
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("{k} is not in the bucket's environment"))
    };
    let creds = w.join("ceiling-creds.toml");
    std::fs::write(
        &creds,
        format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            var("AWS_ACCESS_KEY_ID")?,
            var("AWS_SECRET_ACCESS_KEY")?
        ),
    )?;
    let table = StoreTable {
        endpoint: Some(var("AWS_ENDPOINT_URL")?),
        region: Some(var("AWS_REGION")?),
        credentials_file: Some(creds),
        ..StoreTable::default()
    };
    let loc = Location::new("s3://bench", &table)?;
    Ok(S3Client::new(&loc.target()?)?)
}
