//! `rewind-receiver export`: serve a point's disks over NBD (read-only, one export per disk)
//! until SIGTERM or Ctrl-C, straight from the store.

use crate::catalog;
use crate::nbd_server::{self, Exports};
use crate::points::{self, PointSelector};
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder's object store, s3://BUCKET[/PREFIX]: checked against the one it recorded
    /// (its packs are read from there in any case).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// Point id (default: the newest point).
    #[arg(long)]
    pub point: Option<i64>,
    /// TCP address to serve on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: SocketAddr,
    /// Serve on this unix socket instead of TCP.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    #[command(flatten)]
    pub encryption: super::EncryptionArgs,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    crate::chunks::location::check(&a.data, a.store.as_deref())?;
    let conn = catalog::open_ro(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let which = a.point.map_or(PointSelector::Newest, PointSelector::Id);
    let point = points::resolve(&conn, &a.vm, &which)?;
    let key = a.encryption.key()?;
    let codec = crate::keys::codec_for(&conn, &point, &key, crate::keys::Need::Plaintext)?;
    for disk in &point.disks {
        crate::restore::check_leaves(&conn, point.id, disk)?;
    }
    let exports = Exports::of_point(&a.data, &point, codec);
    let names: Vec<&str> = point.disks.iter().map(|d| d.name.as_str()).collect();
    match &a.unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            println!(
                "exporting {} of {} point {} on unix:{}",
                names.join(", "),
                a.vm,
                point.id,
                path.display()
            );
            nbd_server::serve_unix(l, exports);
        }
        None => {
            let l = std::net::TcpListener::bind(a.listen)
                .with_context(|| format!("binding {}", a.listen))?;
            let addr = l.local_addr()?;
            println!(
                "exporting {} of {} point {} on nbd://{addr}/",
                names.join(", "),
                a.vm,
                point.id
            );
            nbd_server::serve_tcp(l, exports);
        }
    }
    Ok(())
}
