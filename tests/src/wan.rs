//! A long fat link on one machine: a network namespace joined to this one by a veth pair whose
//! both ends are rate-limited with `tbf`, and a TCP proxy that delays every byte by half the
//! round-trip time in each direction (this kernel has no `netem`).
//!
//! ```text
//!  agent -> 127.0.0.1:P (DelayProxy, +rtt/2 each way) -> 10.R.0.1 =veth/tbf= 10.R.0.2 (netns) -> receiver
//! ```

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace with one veth link to this namespace, both directions capped by `tbf`.
/// Removed on drop.
pub struct Netns {
    pub name: String,
    /// This side's address on the link.
    pub host_addr: String,
    /// The namespace's address on the link.
    pub ns_addr: String,
    host_if: String,
}

impl Netns {
    /// Creates namespace `name` (any stale one of that name is removed first) linked at
    /// `rate_mbit` megabits per second each way. `subnet` picks 10.`subnet`.0.0/24.
    pub fn create(name: &str, subnet: u8, rate_mbit: u64) -> Result<Netns> {
        let host_if = format!("{}h", &name[..name.len().min(12)]);
        let ns_if = format!("{}n", &name[..name.len().min(12)]);
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let host_addr = format!("10.{subnet}.0.1");
        let ns_addr = format!("10.{subnet}.0.2");
        let me = Netns {
            name: name.to_owned(),
            host_addr: host_addr.clone(),
            ns_addr: ns_addr.clone(),
            host_if: host_if.clone(),
        };
        run(&["ip", "netns", "add", name])?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_addr}/24"),
            "dev",
            &host_if,
        ])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        let ns = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", name];
            v.extend_from_slice(args);
            run(&v)
        };
        ns(&["ip", "addr", "add", &format!("{ns_addr}/24"), "dev", &ns_if])?;
        ns(&["ip", "link", "set", &ns_if, "up"])?;
        ns(&["ip", "link", "set", "lo", "up"])?;
        // Burst of a few milliseconds at the rate; queue of ~20 ms before drops.
        let rate = format!("{rate_mbit}mbit");
        let burst = format!("{}", (rate_mbit * 1_000_000 / 8 / 250).max(64 * 1024));
        let tbf = ["tbf", "rate", &rate, "burst", &burst, "latency", "20ms"];
        let mut host = vec!["tc", "qdisc", "add", "dev", &host_if, "root"];
        host.extend_from_slice(&tbf);
        run(&host)?;
        let mut inner = vec![
            "ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", &ns_if, "root",
        ];
        inner.extend_from_slice(&tbf);
        run(&inner)?;
        Ok(me)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Whether this process may create namespaces and qdiscs (root with `ip` and `tc`).
pub fn available() -> bool {
    rustix::process::geteuid().is_root()
        && ["ip", "tc"].iter().all(|t| {
            Command::new(t)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// A TCP proxy on 127.0.0.1 that forwards each connection to `upstream`, holding every byte
/// for `one_way` in each direction. Memory is bounded by what the endpoints keep in flight
/// (their own flow-control windows). Runs on its own thread until dropped.
pub struct DelayProxy {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    pub fn start(upstream: SocketAddr, one_way: Duration) -> Result<DelayProxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        acc = listener.accept() => {
                            let Ok((down, _)) = acc else { continue };
                            tokio::spawn(async move {
                                if let Ok(up) = TcpStream::connect(upstream).await {
                                    let _ = down.set_nodelay(true);
                                    let _ = up.set_nodelay(true);
                                    let (dr, dw) = down.into_split();
                                    let (ur, uw) = up.into_split();
                                    let a = tokio::spawn(delay_copy(dr, uw, one_way));
                                    let b = tokio::spawn(delay_copy(ur, dw, one_way));
                                    let _ = tokio::join!(a, b);
                                }
                            });
                        }
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        Ok(DelayProxy {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to`, releasing each piece `delay` after it was read. Pieces move through
/// the queue without being copied again.
async fn delay_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(p) => queue.push_back(p),
                    None => break,
                }
            }
            while let Ok(p) = rx.try_recv() {
                queue.push_back(p);
            }
            let Some((due, _)) = queue.front() else {
                continue;
            };
            tokio::time::sleep_until((*due).into()).await;
            let now = Instant::now();
            let mut out: Vec<Vec<u8>> = Vec::new();
            while queue.front().is_some_and(|(d, _)| *d <= now) {
                if let Some((_, b)) = queue.pop_front() {
                    out.push(b);
                }
            }
            for b in out {
                if to.write_all(&b).await.is_err() {
                    return;
                }
            }
        }
        let _ = to.shutdown().await;
    });
    loop {
        let mut buf = vec![0u8; 256 * 1024];
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.send((Instant::now() + delay, buf)).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
