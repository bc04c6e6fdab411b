//! `rewind-receiver status`: one line per VM with its state and why, from the catalog: seeding
//! (a session open, no point yet), replicating (newest point within 2x the RPO target), behind
//! (older), failing (its last drill failed, or a point references a quarantined chunk). Exits
//! non-zero when any VM is behind or failing.

use crate::catalog::{self, rfc3339};
use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Configuration file (its data folder and per-VM RPO targets).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder (overrides the file's).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// RPO target in seconds for VMs without one in the file.
    #[arg(long, default_value_t = 3600)]
    pub rpo: u64,
    /// Print one JSON object per VM, one per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct VmLine {
    vm: String,
    state: &'static str,
    why: String,
    points: i64,
    newest_point: Option<i64>,
    newest_point_created: Option<String>,
    newest_point_age_seconds: Option<f64>,
    rpo_seconds: u64,
    open_sessions: i64,
    last_drill: Option<String>,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let (file, data) = super::config_and_data(a.config.as_deref(), a.data.as_deref())?;
    // Read-write: a catalog from before drills existed is migrated, not refused.
    let conn = catalog::open_existing(&data)
        .with_context(|| format!("opening the catalog in {}", data.display()))?;
    // A forward clock step must not make every VM look behind at once.
    let now = crate::clock::cautious_now(&conn)?;
    let rows = catalog::status::vms(&conn)?;
    let mut alerts = Vec::new();
    for row in rows {
        let catalog::status::VmStatus {
            vm,
            points,
            newest_point: newest,
            newest_created_us: created,
            open_sessions: open,
            last_drill: drill,
            damaging_chunks: bad,
        } = row;
        let rpo = file.rpo(&vm).unwrap_or(a.rpo).max(1);
        let age = created.map(|c| (now - c).max(0) as f64 / 1e6);
        let (state, why) = if bad > 0 {
            (
                "failing",
                format!("{bad} quarantined chunk(s) damage its points: the agent's next cycle heals them"),
            )
        } else if drill.as_deref().is_some_and(|d| d.starts_with("failed")) {
            (
                "failing",
                format!("last drill {}", drill.as_deref().unwrap_or("")),
            )
        } else if points == 0 {
            (
                "seeding",
                if open > 0 {
                    "first point in progress".to_owned()
                } else {
                    "no point yet".to_owned()
                },
            )
        } else if age.is_some_and(|a| a > 2.0 * rpo as f64) {
            (
                "behind",
                format!(
                    "newest point is {:.0} s old, more than 2x the {rpo} s RPO target",
                    age.unwrap_or(0.0)
                ),
            )
        } else {
            (
                "replicating",
                format!(
                    "newest point is {:.0} s old (RPO target {rpo} s)",
                    age.unwrap_or(0.0)
                ),
            )
        };
        if state == "behind" || state == "failing" {
            alerts.push(vm.clone());
        }
        let line = VmLine {
            vm,
            state,
            why,
            points,
            newest_point: newest,
            newest_point_created: created.map(rfc3339),
            newest_point_age_seconds: age,
            rpo_seconds: rpo,
            open_sessions: open,
            last_drill: drill,
        };
        if a.json {
            println!("{}", serde_json::to_string(&line)?);
        } else {
            println!("{:<20} {:<12} {}", line.vm, line.state, line.why);
        }
    }
    if !alerts.is_empty() {
        bail!("behind or failing: {}", alerts.join(", "));
    }
    Ok(())
}
