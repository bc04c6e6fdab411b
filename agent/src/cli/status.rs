//! `rewind-agent status`: one line per VM with its state and why; exits non-zero when any VM
//! has no point within 2x its RPO target (an alert-worthy state).

use crate::config::AgentFile;
use crate::health::{self, VmStatus};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Configuration file: its state folder, and its VMs (listed even before their first cycle).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State folder (overrides the file's).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Print one JSON object per VM, one per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let file = match &a.config {
        Some(p) => AgentFile::load(p)?,
        None => AgentFile::default(),
    };
    let state = a
        .state
        .clone()
        .or(file.state.clone())
        .context("give --state or a --config with a state folder")?;
    let conn = crate::state::open(&state)
        .with_context(|| format!("opening the agent state in {}", state.display()))?;
    let mut all = health::status(&conn, health::now_us())?;
    // With a file, its VMs are the ones protected.
    if !file.vm.is_empty() {
        all.retain(|s| file.vm.iter().any(|v| v.name == s.vm));
    }
    for v in &file.vm {
        if !all.iter().any(|s| s.vm == v.name) {
            let (_, rpo) = file.timing(v);
            all.push(VmStatus {
                vm: v.name.clone(),
                state: "seeding".into(),
                why: "configured; no cycle has run yet".into(),
                rpo_seconds: rpo,
                ..VmStatus::default()
            });
        }
    }
    all.sort_by(|x, y| x.vm.cmp(&y.vm));
    if let Some(cert) = &file.receiver.cert {
        let days = std::fs::read(cert)
            .ok()
            .and_then(|pem| crate::client::cert_days_left(&pem));
        if let Some(days) = days.filter(|d| *d < crate::client::EXPIRY_WARNING_DAYS) {
            eprintln!(
                "warning: the agent's certificate {} expires in {days} days: renew it (rewind-receiver pki renew --agent NAME)",
                cert.display()
            );
        }
    }
    for s in &all {
        if a.json {
            println!("{}", serde_json::to_string(s)?);
        } else {
            let achieved = match (s.achieved_rpo_p50_seconds, s.achieved_rpo_p99_seconds) {
                (Some(p50), Some(p99)) => {
                    format!("; achieved RPO p50 {p50:.0} s, p99 {p99:.0} s")
                }
                _ => String::new(),
            };
            println!(
                "{:<20} {:<12} {}{achieved}{}",
                s.vm,
                s.state,
                s.why,
                if s.alert { "  [ALERT]" } else { "" }
            );
        }
    }
    let alerts: Vec<&str> = all
        .iter()
        .filter(|s| s.alert)
        .map(|s| s.vm.as_str())
        .collect();
    if !alerts.is_empty() {
        bail!(
            "no point within 2x the RPO target for: {}",
            alerts.join(", ")
        );
    }
    Ok(())
}
