//! A second receiver copying a primary's points (`[copy]` in its configuration), for tests.

use crate::{bin, Deployment};
use std::process::Command;
use std::time::{Duration, Instant};

/// A replica identity `copy1` issued by `primary`'s PKI, and a copy deployment with its
/// configuration file (`copy.toml`): the primary reached at `addr`, a run every second, four
/// reads in flight.
pub fn replica(
    primary: &Deployment,
    addr: std::net::SocketAddr,
) -> (Deployment, std::path::PathBuf) {
    let o = crate::run(
        Command::new(bin("rewind-receiver"))
            .args(["pki", "issue", "--replica", "--agent", "copy1", "--dir"])
            .arg(primary.pki()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let copy = Deployment::new();
    let pki = primary.pki();
    let config = copy.path("copy.toml");
    std::fs::write(
        &config,
        format!(
            "[copy]\nfrom = \"https://{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nevery = 1\nparallel = 4\n",
            addr,
            pki.join("ca.pem").display(),
            pki.join("copy1.pem").display(),
            pki.join("copy1.key").display()
        ),
    )
    .expect("write copy.toml");
    (copy, config)
}

/// Waits until `d` holds `n` points of `vm` (a copy run made them).
pub fn wait_points(d: &Deployment, vm: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(p) = d.try_points(vm) {
            if p.len() >= n {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the copy never reached {n} points"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
