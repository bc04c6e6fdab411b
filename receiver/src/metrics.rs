//! Prometheus metrics of the store, read from the catalog at each scrape, so that what the
//! `prune`, `gc` and `verify` commands did (recorded as events) shows up next to what `serve`
//! stores: points and last point age per VM, store size, quarantined chunks, and the totals and
//! last results of prune, gc and verify.

use crate::catalog::{self, drills, events, now_us, status};
use crate::error::StoreError;
use rusqlite::Connection;
use std::fmt::Write as _;
use std::path::Path;

fn sum_detail(conn: &Connection, kind: &str, field: &str) -> Result<f64, StoreError> {
    let mut total = 0.0;
    for d in events::details(conn, kind)? {
        let v: serde_json::Value = serde_json::from_str(&d).unwrap_or_default();
        total += v[field].as_f64().unwrap_or(0.0);
    }
    Ok(total)
}

fn last_detail(conn: &Connection, kind: &str) -> Result<serde_json::Value, StoreError> {
    let d = events::last_detail(conn, kind)?;
    Ok(d.and_then(|d| serde_json::from_str(&d).ok())
        .unwrap_or_default())
}

/// The metrics in Prometheus' text format.
pub fn render(data: &Path) -> Result<String, StoreError> {
    let conn = catalog::open_ro(data)?;
    let mut out = String::new();
    // A forward clock step must not age every point at once (nor a backward one make them
    // younger than zero).
    let now = crate::clock::cautious_now(&conn)?;
    clock_metrics(&conn, &mut out)?;
    point_metrics(&conn, now, &mut out)?;
    drill_metrics(&conn, &mut out)?;
    for (name, help, v) in store_gauges(&conn, data)? {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    Ok(out)
}

/// The wall-clock steps serve has seen, and the newest.
fn clock_metrics(conn: &Connection, out: &mut String) -> Result<(), StoreError> {
    let (steps, last_step) = crate::clock::summary(conn)?;
    let _ = writeln!(
        out,
        "# HELP rewind_clock_steps_total Wall-clock steps serve has seen.\n# TYPE rewind_clock_steps_total counter\nrewind_clock_steps_total {steps}"
    );
    if let Some(s) = last_step {
        let _ = writeln!(
            out,
            "# HELP rewind_clock_last_step_seconds The newest wall-clock step (negative: backwards).\n# TYPE rewind_clock_last_step_seconds gauge\nrewind_clock_last_step_seconds {s:.3}"
        );
    }
    Ok(())
}

/// Per VM: points, the newest point's age at `now` (Unix microseconds), and the bytes its
/// uploads added to the packs.
fn point_metrics(conn: &Connection, now: i64, out: &mut String) -> Result<(), StoreError> {
    let _ = writeln!(
        out,
        "# HELP rewind_points Committed points per VM.\n# TYPE rewind_points gauge"
    );
    let _ = writeln!(out, "# HELP rewind_last_point_age_seconds Age of the newest point per VM.\n# TYPE rewind_last_point_age_seconds gauge");
    for r in status::points_per_vm(conn)? {
        let vm = r.vm;
        let _ = writeln!(out, "rewind_points{{vm=\"{vm}\"}} {}", r.points);
        if let Some(last) = r.newest_created_us {
            let _ = writeln!(
                out,
                "rewind_last_point_age_seconds{{vm=\"{vm}\"}} {:.3}",
                (now - last).max(0) as f64 / 1e6
            );
        }
    }
    copy_metrics(conn, now, out)?;
    let _ = writeln!(out, "# HELP rewind_vm_stored_bytes_total Compressed bytes of new chunks each VM's uploads added to the packs.\n# TYPE rewind_vm_stored_bytes_total counter");
    for (vm, b) in status::stored_bytes_per_vm(conn)? {
        let _ = writeln!(out, "rewind_vm_stored_bytes_total{{vm=\"{vm}\"}} {b}");
    }
    Ok(())
}

/// A copying receiver's lag behind its source, per VM, as its last run saw it.
fn copy_metrics(conn: &Connection, now: i64, out: &mut String) -> Result<(), StoreError> {
    let lags = crate::catalog::copies::lags(conn)?;
    if lags.is_empty() {
        return Ok(());
    }
    type Value = fn(&crate::catalog::copies::Lag, i64) -> i64;
    let gauges: [(&str, &str, Value); 2] = [
        ("rewind_copy_lag_seconds", "How much older the newest copied point is than the newest point the source had, at the last copy run.",
            |l, _| l.newest_us - l.copied_us),
        ("rewind_copy_last_run_age_seconds", "Time since the last copy run looked at the source.",
            |l, now| now - l.checked_us),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for l in &lags {
            let v = value(l, now).max(0) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}{{source=\"{}\",vm=\"{}\"}} {v:.3}",
                l.source, l.vm
            );
        }
    }
    Ok(())
}

/// One gauge: its name, its help text and its value.
type Gauge = (&'static str, &'static str, f64);

/// The store's gauges: its size and chunks, what dedup and compression save, quarantined
/// chunks, and the totals and last results of prune, gc and verify.
fn store_gauges(conn: &Connection, data: &Path) -> Result<[Gauge; 12], StoreError> {
    // An object store's size from the catalog: a scrape never lists the bucket.
    let recorded =
        crate::chunks::location::recorded(data).map_err(crate::chunks::ChunkStoreError::from)?;
    let store_bytes = match recorded {
        Some(_) => crate::catalog::packs::recorded_bytes(conn)?.max(0) as u64,
        None => crate::chunks::open(data)?.stored_bytes(),
    };
    let (chunks, logical) = status::chunk_totals(conn)?;
    let quarantined = status::quarantined(conn)?;
    // Every committed block change at full size: what the points would take without dedup
    // and compression.
    let changed_logical = status::changed_logical_bytes(conn)? as f64;
    let pruned = events::count(conn, "prune")?;
    let gc_last = last_detail(conn, "gc")?;
    let verify_last = last_detail(conn, "verify")?;
    Ok([
        (
            "rewind_store_bytes",
            "Bytes in pack files.",
            store_bytes as f64,
        ),
        ("rewind_chunks", "Distinct chunks stored.", chunks as f64),
        (
            "rewind_chunks_logical_bytes",
            "Uncompressed bytes of the stored chunks.",
            logical.unwrap_or(0) as f64,
        ),
        (
            "rewind_points_changed_logical_bytes",
            "Bytes of every block change committed in the points held, at full size.",
            changed_logical,
        ),
        (
            "rewind_dedup_ratio",
            "Logical changed bytes of the points held per byte in pack files (dedup and compression together).",
            if store_bytes > 0 {
                changed_logical / store_bytes as f64
            } else {
                0.0
            },
        ),
        (
            "rewind_store_reduction_ratio",
            "Uncompressed bytes of the distinct stored chunks per byte in pack files (dedup within the chunk index and compression).",
            if store_bytes > 0 {
                logical.unwrap_or(0) as f64 / store_bytes as f64
            } else {
                0.0
            },
        ),
        (
            "rewind_chunks_quarantined",
            "Chunks found damaged and not yet healed.",
            quarantined as f64,
        ),
        (
            "rewind_prune_points_removed_total",
            "Points removed by prune.",
            pruned as f64,
        ),
        (
            "rewind_gc_chunks_removed_total",
            "Chunks removed by gc.",
            sum_detail(conn, "gc", "chunks_removed")?,
        ),
        (
            "rewind_gc_bytes_freed_last",
            "Bytes the last gc freed.",
            gc_last["bytes_before"].as_f64().unwrap_or(0.0)
                - gc_last["bytes_after"].as_f64().unwrap_or(0.0),
        ),
        (
            "rewind_verify_chunks_checked_last",
            "Chunks the last verify checked.",
            verify_last["chunks_checked"].as_f64().unwrap_or(0.0),
        ),
        (
            "rewind_verify_chunks_bad_last",
            "Bad chunks the last verify found.",
            verify_last["bad"].as_f64().unwrap_or(0.0),
        ),
    ])
}

/// Per VM: drills by result, and the last drill's result, RTO, RPO and time.
fn drill_metrics(conn: &Connection, out: &mut String) -> Result<(), StoreError> {
    let _ = writeln!(
        out,
        "# HELP rewind_drills_total DR drills run, by result.\n# TYPE rewind_drills_total counter"
    );
    for c in drills::counts(conn)? {
        let _ = writeln!(
            out,
            "rewind_drills_total{{vm=\"{}\",result=\"{}\"}} {}",
            c.vm, c.result, c.count
        );
    }
    let rows = drills::last_per_vm(conn)?;
    let series: [(&str, &str); 4] = [
        ("rewind_drill_last_passed", "1 when the VM's last drill passed, 0 when it failed."),
        ("rewind_drill_last_rto_seconds", "Time from the last passing drill's start to its boot marker (or verified data without --boot)."),
        ("rewind_drill_last_point_age_seconds", "Age of the point the last drill used when it started (the RPO then)."),
        ("rewind_drill_last_timestamp_seconds", "When the last drill started (Unix time)."),
    ];
    for (i, (name, help)) in series.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for d in &rows {
            let v = match i {
                0 => Some(f64::from(u8::from(d.result == "passed"))),
                1 => d.rto_s,
                2 => d.point_age_s,
                _ => Some(d.started_us as f64 / 1e6),
            };
            if let Some(v) = v {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {v}", d.vm);
            }
        }
    }
    Ok(())
}

/// The days left on the receiver's certificate and on each agent's seen since `serve` started.
pub fn render_certificates(receiver: Option<i64>, agents: &[(String, i64)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP rewind_certificate_days_left Days until a certificate expires (the receiver's; each agent's as last presented).\n# TYPE rewind_certificate_days_left gauge");
    let now = now_us() / 1_000_000;
    let days = |t: i64| (t - now) as f64 / 86_400.0;
    if let Some(t) = receiver {
        let _ = writeln!(
            out,
            "rewind_certificate_days_left{{subject=\"receiver\"}} {:.2}",
            days(t)
        );
    }
    for (agent, t) in agents {
        let _ = writeln!(
            out,
            "rewind_certificate_days_left{{subject=\"agent\",agent=\"{agent}\"}} {:.2}",
            days(*t)
        );
    }
    out
}

/// Serves `/metrics` over plain HTTP (bind it to loopback or a monitoring network): the store's
/// metrics and whatever `extra` renders (the live server's).
pub async fn serve(
    listener: tokio::net::TcpListener,
    data: std::path::PathBuf,
    extra: impl Fn() -> String + Send + Sync + 'static,
) {
    let extra = std::sync::Arc::new(extra);
    rewind_daemon::metrics::serve(listener, move || {
        render(&data).ok().map(|mut m| {
            m.push_str(&extra());
            m
        })
    })
    .await;
}
