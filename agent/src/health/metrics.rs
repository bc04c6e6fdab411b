//! The agent's health as Prometheus metrics (the `/metrics` endpoint of `rewind-agent run`).

use super::*;
use std::fmt::Write as _;

/// The agent's metrics in Prometheus' text format, at `now` (Unix microseconds, wall clock).
pub fn render(conn: &Connection, now: i64) -> rusqlite::Result<String> {
    let all = status(conn, now)?;
    let mut out = String::new();
    type Get = fn(&VmStatus) -> Option<f64>;
    let gauges: [(&str, &str, &str, Get); 13] = [
        (
            "rewind_agent_last_point_age_seconds",
            "gauge",
            "Age of the VM's newest committed point.",
            |s| s.last_point_age_seconds,
        ),
        (
            "rewind_agent_rpo_target_seconds",
            "gauge",
            "The VM's RPO target.",
            |s| Some(s.rpo_seconds as f64),
        ),
        (
            "rewind_agent_lag_ratio",
            "gauge",
            "Newest point's age over the RPO target (alert above 2).",
            |s| s.last_point_age_seconds.map(|a| a / s.rpo_seconds as f64),
        ),
        (
            "rewind_agent_alert",
            "gauge",
            "1 when the VM has no point within 2x its RPO target.",
            |s| Some(f64::from(u8::from(s.alert))),
        ),
        (
            "rewind_agent_behind",
            "gauge",
            "1 when the VM is behind its RPO target (no recent point, or cycles stretched).",
            |s| Some(f64::from(u8::from(s.state == "behind"))),
        ),
        (
            "rewind_agent_achieved_rpo_seconds",
            "gauge",
            "The newest point's achieved RPO: from the previous point's capture to its commit.",
            |s| s.achieved_rpo_seconds,
        ),
        (
            "rewind_agent_achieved_rpo_p50_seconds",
            "gauge",
            "Median achieved RPO over the VM's recent points.",
            |s| s.achieved_rpo_p50_seconds,
        ),
        (
            "rewind_agent_achieved_rpo_p99_seconds",
            "gauge",
            "99th percentile achieved RPO over the VM's recent points.",
            |s| s.achieved_rpo_p99_seconds,
        ),
        (
            "rewind_agent_last_cycle_seconds",
            "gauge",
            "Duration of the VM's last cycle.",
            |s| s.last_cycle_seconds,
        ),
        (
            "rewind_agent_bytes_read_total",
            "counter",
            "Disk bytes read by cycles that committed.",
            |s| Some(s.bytes_read as f64),
        ),
        (
            "rewind_agent_bytes_sent_total",
            "counter",
            "Compressed chunk bytes sent by cycles that committed.",
            |s| Some(s.bytes_sent as f64),
        ),
        (
            "rewind_agent_cycles_total",
            "counter",
            "Cycles that committed a point.",
            |s| Some(s.cycles_ok as f64),
        ),
        (
            "rewind_agent_consecutive_failures",
            "gauge",
            "Cycles failed in a row.",
            |s| Some(s.consecutive_failures as f64),
        ),
    ];
    for (name, kind, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in &all {
            if let Some(v) = get(s) {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {v}", s.vm);
            }
        }
    }
    let name = "rewind_agent_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed cycles by kind.\n# TYPE {name} counter"
    );
    for s in &all {
        for (kind, n) in &s.failures_by_kind {
            let _ = writeln!(out, "{name}{{vm=\"{}\",kind=\"{kind}\"}} {n}", s.vm);
        }
    }
    Ok(out)
}
