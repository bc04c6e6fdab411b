//! A scripted qemu-ga for tests, hostile on demand.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// What one guest-exec'd command does.
#[derive(Debug, Clone)]
pub enum Run {
    Exits {
        code: i64,
        stdout: &'static [u8],
        stderr: &'static [u8],
    },
    Signal(i64),
    Never,
}

#[derive(Debug, Clone, Default)]
pub struct Fake {
    /// Syncs left unanswered first (qemu-ga not started yet).
    pub ignore_syncs: usize,
    /// Raw bytes written before each sync reply (garbage, stale replies).
    pub before_sync: Vec<u8>,
    /// A raw reply sent instead of guest-exec's.
    pub exec_reply: Option<Vec<u8>>,
    /// A raw `return` value sent for guest-exec-status instead of the run's.
    pub status_reply: Option<Value>,
    /// What each guest-exec runs, in turn; the last repeats.
    pub runs: Vec<Run>,
    /// guest-exec-status answers "exited": false this many times per process first.
    pub polls_running: usize,
}

fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Answers requests on `stream` until the client goes; returns the requests seen.
pub fn serve(fake: Fake, stream: UnixStream) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let _ = answer(&fake, stream, &log);
    });
    seen
}

fn answer(fake: &Fake, stream: UnixStream, log: &Mutex<Vec<Value>>) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut ignored = 0;
    let mut execs = 0usize;
    let mut polls = 0usize;
    let mut current: Option<Run> = None;
    loop {
        let mut raw = Vec::new();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            return Ok(());
        }
        raw.retain(|&b| b != 0xFF);
        let Ok(req) = serde_json::from_slice::<Value>(&raw) else {
            continue;
        };
        if let Ok(mut l) = log.lock() {
            l.push(req.clone());
        }
        let args = &req["arguments"];
        match req["execute"].as_str().unwrap_or("") {
            "guest-sync-delimited" => {
                if ignored < fake.ignore_syncs {
                    ignored += 1;
                    continue;
                }
                out.write_all(&fake.before_sync)?;
                out.write_all(b"\xff")?;
                writeln!(out, "{}", json!({ "return": args["id"] }))?;
            }
            "guest-exec" => {
                if let Some(r) = &fake.exec_reply {
                    out.write_all(r)?;
                    continue;
                }
                current = fake
                    .runs
                    .get(execs.min(fake.runs.len().saturating_sub(1)))
                    .cloned();
                execs += 1;
                polls = 0;
                writeln!(out, "{}", json!({ "return": { "pid": 1000 + execs } }))?;
            }
            "guest-exec-status" => {
                polls += 1;
                let ret = match (&fake.status_reply, &current) {
                    (Some(v), _) => v.clone(),
                    (None, _) if polls <= fake.polls_running => json!({ "exited": false }),
                    (
                        None,
                        Some(Run::Exits {
                            code,
                            stdout,
                            stderr,
                        }),
                    ) => json!({
                        "exited": true, "exitcode": code,
                        "out-data": b64(stdout), "err-data": b64(stderr),
                    }),
                    (None, Some(Run::Signal(s))) => json!({ "exited": true, "signal": s }),
                    (None, Some(Run::Never) | None) => json!({ "exited": false }),
                };
                writeln!(out, "{}", json!({ "return": ret }))?;
            }
            other => {
                let desc = format!("The command {other} has not been found");
                writeln!(
                    out,
                    "{}",
                    json!({ "error": { "class": "CommandNotFound", "desc": desc } })
                )?;
            }
        }
    }
}
