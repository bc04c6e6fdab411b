//! The deployment under test: its PKI, the receiver process (SIGKILLed and started again on the
//! same address), one FaultLink per VM in front of it, and the command lines of the agent and of
//! the receiver's offline commands.

use crate::Violation;
use anyhow::{bail, Context, Result};
use rewind_tests::disk;
use rewind_tests::faultlink::FaultLink;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The agent identity every VM replicates as (all VMs share its state folder).
const AGENT: &str = "host1";

pub struct Cluster {
    bins: PathBuf,
    work: PathBuf,
    /// Where `serve` listens: fixed for the run, so the links' upstream stays valid.
    addr: SocketAddr,
    serve: Option<Child>,
    /// One link per VM, so that each agent's bytes are counted on their own.
    pub links: Vec<FaultLink>,
}

impl Cluster {
    /// Issues the PKI in `work`, starts `serve` on a free port and a link per VM in front of it.
    pub fn start(bins: &Path, work: &Path, vms: usize) -> Result<Cluster> {
        let pki = work.join("pki");
        let rx = bins.join("rewind-receiver");
        check(
            Command::new(&rx)
                .args(["pki", "init", "--dir"])
                .arg(&pki)
                .output()?,
            "pki init",
        )?;
        check(
            Command::new(&rx)
                .args(["pki", "issue", "--dir"])
                .arg(&pki)
                .args(["--agent", AGENT])
                .output()?,
            "pki issue",
        )?;
        let mut c = Cluster {
            bins: bins.to_owned(),
            work: work.to_owned(),
            addr: "127.0.0.1:0".parse()?,
            serve: None,
            links: Vec::new(),
        };
        let (child, addr) = c.spawn_serve("127.0.0.1:0")?;
        c.serve = Some(child);
        c.addr = addr;
        for _ in 0..vms {
            c.links.push(FaultLink::start(addr)?);
        }
        Ok(c)
    }

    pub fn data(&self) -> PathBuf {
        self.work.join("data")
    }

    fn spawn_serve(&self, listen: &str) -> Result<(Child, SocketAddr)> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join("receiver.log"))?;
        let mut child = Command::new(self.bins.join("rewind-receiver"))
            .args(["serve", "--listen", listen, "--data"])
            .arg(self.data())
            .arg("--pki")
            .arg(self.work.join("pki"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning rewind-receiver serve")?;
        let mut out = BufReader::new(child.stdout.take().context("serve's stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        match line.trim().rsplit(' ').next().and_then(|a| a.parse().ok()) {
            Some(addr) => {
                // Whatever else serve prints must not fill a pipe nobody reads.
                std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
                Ok((child, addr))
            }
            None => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("serve did not start ({status}): printed {line:?}; see receiver.log")
            }
        }
    }

    /// SIGKILL of `serve`. An error if it had already exited by itself.
    pub fn kill_serve(&mut self) -> Result<()> {
        self.check_serve()?;
        if let Some(mut child) = self.serve.take() {
            child.kill()?;
            let status = child.wait()?;
            if status.signal() != Some(9) {
                return Err(Violation::new(format!(
                    "serve exited by itself ({status}) just before its kill; see receiver.log"
                ))
                .into());
            }
        }
        Ok(())
    }

    /// Starts `serve` again on its address (retrying while the port is still being released).
    pub fn restart_serve(&mut self) -> Result<()> {
        let listen = self.addr.to_string();
        let mut last = None;
        for _ in 0..100 {
            match self.spawn_serve(&listen) {
                Ok((child, _)) => {
                    self.serve = Some(child);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("serve did not start")))
    }

    /// A `serve` that exited although nobody killed it is a failure of the run.
    pub fn check_serve(&mut self) -> Result<()> {
        if let Some(child) = self.serve.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.serve = None;
                return Err(Violation::new(format!(
                    "serve exited by itself: {status}; see receiver.log"
                ))
                .into());
            }
        }
        Ok(())
    }

    /// `rewind-agent sync --once --json` of `vm` through link `link`, `target` being its
    /// `--disk`/`--qmp` arguments.
    pub fn sync(
        &self,
        link: usize,
        vm: &str,
        target: &[OsString],
        bwlimit: Option<u32>,
    ) -> Command {
        let pki = self.work.join("pki");
        let mut cmd = Command::new(self.bins.join("rewind-agent"));
        cmd.arg("sync")
            .arg("--receiver")
            .arg(format!("https://{}", self.links[link].addr))
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join(format!("{AGENT}.pem")))
            .arg("--key")
            .arg(pki.join(format!("{AGENT}.key")))
            .arg("--state")
            .arg(self.work.join("state"))
            .args(["--vm", vm, "--once", "--json"])
            .args(target)
            .stdin(Stdio::null());
        if let Some(mb) = bwlimit {
            cmd.args(["--bwlimit", &mb.to_string()]);
        }
        cmd
    }

    /// `rewind-receiver ARGS --data D`.
    pub fn offline(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bins.join("rewind-receiver"));
        cmd.args(args)
            .arg("--data")
            .arg(self.data())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs an offline command that must succeed and print JSON.
    pub fn offline_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.offline(args).output()?;
        check(out, &args.join(" ")).and_then(|o| {
            serde_json::from_slice(&o.stdout)
                .with_context(|| format!("{}: not JSON", args.join(" ")))
        })
    }

    /// Per VM name, the compressed chunk bytes its uploads have added to the store so far (the
    /// catalog's `vm_stats`: bytes a killed upload wrote to a pack but never indexed are not
    /// in it).
    pub fn stored_bytes(&self) -> Result<BTreeMap<String, u64>> {
        let path = self.data().join("catalog.sqlite");
        if !path.exists() {
            return Ok(BTreeMap::new());
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mut stmt = conn.prepare(
            "SELECT v.name, s.bytes_stored FROM vm_stats s JOIN vms v ON v.id = s.vm_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (vm, bytes) = row?;
            out.insert(vm, bytes as u64);
        }
        Ok(out)
    }

    /// `points --vm VM --json`, oldest first.
    pub fn points(&self, vm: &str) -> Result<Vec<Value>> {
        let out = self.offline(&["points", "--vm", vm, "--json"]).output()?;
        if !out.status.success() {
            // A VM whose first point never committed is unknown to the receiver.
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("no VM") || err.contains("unknown VM") || err.contains("not found") {
                return Ok(Vec::new());
            }
            return Err(Violation::new(format!("points --vm {vm} failed: {}", err.trim())).into());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Restores one disk of a point to a scratch file and returns its content digest.
    pub fn restored(&self, vm: &str, disk: &str, point: u64) -> Result<disk::Digest> {
        let out = self.work.join(format!("restore-{vm}-{disk}-{point}.raw"));
        let o = self
            .offline(&["restore", "--vm", vm, "--disk", disk, "--force"])
            .args(["--point", &point.to_string(), "--out"])
            .arg(&out)
            .output()?;
        if !o.status.success() {
            return Err(Violation::new(format!(
                "point {point} of {vm} is listed but its disk {disk} does not restore: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
            .into());
        }
        let d = disk::digest(&out);
        std::fs::remove_file(&out)?;
        Ok(d)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The output of a command that must succeed.
pub fn check(out: Output, what: &str) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
