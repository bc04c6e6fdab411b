//! `rewind-receiver serve`: accept points from agents until SIGTERM or SIGINT.

use crate::store::Store;
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data folder holding the catalog and the packs.
    #[arg(long)]
    pub data: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// PKI folder with ca.pem, receiver.pem and receiver.key.
    #[arg(long)]
    pub pki: PathBuf,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let pki = crate::pki::load_server(&a.pki).context("loading the receiver's certificates")?;
    let store = Arc::new(
        Store::open(&a.data)
            .with_context(|| format!("opening data folder {}", a.data.display()))?,
    );
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!("rewind-receiver listening on {addr}");
        tracing::info!(%addr, data = %a.data.display(), "serving");
        crate::server::run(listener, &pki, store, shutdown_signal())
            .await
            .context("serving")?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
