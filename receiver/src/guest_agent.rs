//! A client of the QEMU guest agent (qemu-ga) that runs a command in a drill's guest and treats
//! every byte from the guest as hostile.
//!
//! The protocol is JSON lines over the drill's private `virtserialport` socket:
//!
//! ```text
//! -> 0xFF {"execute":"guest-sync-delimited","arguments":{"id":ID}}
//! <- (stale replies, garbage) 0xFF {"return":ID}
//! -> {"execute":"guest-exec","arguments":{"path":P,"arg":[..],"capture-output":true}}
//! <- {"return":{"pid":PID}}
//! -> {"execute":"guest-exec-status","arguments":{"pid":PID}}     (until "exited": true)
//! <- {"return":{"exited":true,"exitcode":N,"out-data":BASE64,"err-data":BASE64}}
//! ```
//!
//! The 0xFF we send resets qemu-ga's parser (a request cut by a timeout is dropped); the 0xFF it
//! sends before a sync reply marks where a reply starts, so anything before it and any reply
//! with another id is stale and skipped. Every wait has a deadline (a guest that trickles bytes
//! gets no more time than one that is silent), a reply line is at most [`MAX_REPLY`] bytes, and
//! nothing the guest sends can panic the drill: bad replies are [`AgentError`]s.

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Longest reply line taken from the guest. A health check prints lines, not megabytes; 4 MiB of
/// base64 still carries 3 MiB of output, and it bounds what a hostile guest makes us hold.
pub const MAX_REPLY: usize = 4 << 20;
/// Marks the start of a sync reply (from qemu-ga) and resets qemu-ga's parser (to it).
const SENTINEL: u8 = 0xFF;
/// Longest single wait on the socket: the cancel flag is looked at this often, and an
/// unanswered sync is sent again after it (qemu-ga answers in milliseconds once it runs).
const STEP: Duration = Duration::from_secs(1);
/// How long qemu-ga may take to answer one request once it is in sync (it answers at once;
/// the command runs in the background).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two attempts to connect to the socket QEMU creates.
const CONNECT_RETRY: Duration = Duration::from_millis(200);
/// Most bytes of a guest-supplied text (an error description) kept in a message.
const MAX_QUOTED: usize = 256;

/// What went wrong talking to the guest agent.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The socket of the guest-agent channel could not be opened.
    #[error("connecting to the guest agent's socket {path}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No answer to guest-sync-delimited (qemu-ga is not running, or not yet).
    #[error("the guest agent did not answer within {:.0} s", .waited.as_secs_f64())]
    NoAnswer { waited: Duration },
    /// A request got no (whole) reply in time.
    #[error("the guest agent did not answer {command} within {:.0} s", .waited.as_secs_f64())]
    NoReply {
        command: &'static str,
        waited: Duration,
    },
    /// A reply line longer than [`MAX_REPLY`].
    #[error("a reply from the guest agent is longer than {limit} bytes")]
    ReplyTooLong { limit: usize },
    /// A reply that is not what the protocol says.
    #[error("the guest agent's reply to {command} is malformed: {what}")]
    BadReply { command: &'static str, what: String },
    /// qemu-ga answered with an error (e.g. no such program).
    #[error("the guest agent refused {command}: {desc}")]
    Refused { command: &'static str, desc: String },
    /// The command was still running at the deadline.
    #[error("the command (guest pid {pid}) had not exited after {:.0} s", .waited.as_secs_f64())]
    NotExited { pid: i64, waited: Duration },
    /// The channel closed (QEMU exited, or the guest closed the port).
    #[error("the guest agent's channel closed")]
    Closed,
    /// Reading or writing the channel failed.
    #[error("the guest agent's channel")]
    Io(#[source] std::io::Error),
    /// The drill was cancelled.
    #[error("cancelled (signal)")]
    Cancelled,
}

impl AgentError {
    /// Whether trying again cannot help: the guest broke the protocol (qemu-ga never does), the
    /// channel is gone, or the drill was cancelled.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            AgentError::ReplyTooLong { .. }
                | AgentError::BadReply { .. }
                | AgentError::Closed
                | AgentError::Io(_)
                | AgentError::Cancelled
        )
    }
}

/// A command that exited in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exited {
    /// None when a signal ended it.
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The state of a guest-exec'd process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecStatus {
    Running,
    Exited(Exited),
}

/// Bytes received and not yet taken as lines (the pure framing core: no I/O).
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
    /// Bytes at the start of `buf` known to hold no newline.
    scanned: usize,
}

impl Inbox {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Drops everything up to and including the first sentinel; whether there was one (without
    /// one, everything is dropped: it is stale).
    fn skip_to_sentinel(&mut self) -> bool {
        let found = self.buf.iter().position(|&b| b == SENTINEL);
        match found {
            Some(i) => self.buf.drain(..=i),
            None => self.buf.drain(..),
        };
        self.scanned = 0;
        found.is_some()
    }

    /// The first whole line, without its line ending, once it has arrived.
    fn take_line(&mut self, limit: usize) -> Result<Option<Vec<u8>>, AgentError> {
        let from = self.scanned;
        match self.buf[from..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = from + i;
                if end > limit {
                    return Err(AgentError::ReplyTooLong { limit });
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.scanned = 0;
                Ok(Some(line))
            }
            None if self.buf.len() > limit => Err(AgentError::ReplyTooLong { limit }),
            None => {
                self.scanned = self.buf.len();
                Ok(None)
            }
        }
    }
}

/// A request line.
fn request(command: &str, arguments: Value) -> Vec<u8> {
    let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
    line.push('\n');
    line.into_bytes()
}

/// At most [`MAX_QUOTED`] bytes of a guest-supplied text, quoted and escaped.
fn quoted(text: &str) -> String {
    let mut end = text.len().min(MAX_QUOTED);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < text.len() { "..." } else { "" };
    format!("{:?}{more}", &text[..end])
}

/// The `return` value of a reply line, or why there is none.
fn parse_reply(command: &'static str, line: &[u8]) -> Result<Value, AgentError> {
    let bad = |what: String| AgentError::BadReply { command, what };
    let mut v: Value = serde_json::from_slice(line).map_err(|e| bad(quoted(&e.to_string())))?;
    if let Some(ret) = v.get_mut("return") {
        return Ok(ret.take());
    }
    if let Some(err) = v.get("error") {
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .or_else(|| err.get("class").and_then(Value::as_str))
            .unwrap_or("no description");
        return Err(AgentError::Refused {
            command,
            desc: quoted(desc),
        });
    }
    Err(bad("neither \"return\" nor \"error\"".into()))
}

/// The id a sync reply line echoes (after the last sentinel in it, if any).
fn sync_reply_id(line: &[u8]) -> Option<u64> {
    let start = line
        .iter()
        .rposition(|&b| b == SENTINEL)
        .map_or(0, |i| i + 1);
    let v: Value = serde_json::from_slice(&line[start..]).ok()?;
    v.get("return")?.as_u64()
}

/// guest-exec-status's return value; unknown members (newer qemu-ga) are ignored.
#[derive(Debug, Deserialize)]
struct StatusReply {
    exited: bool,
    exitcode: Option<i64>,
    signal: Option<i64>,
    #[serde(rename = "out-data")]
    out_data: Option<String>,
    #[serde(rename = "err-data")]
    err_data: Option<String>,
}

fn parse_status(ret: Value) -> Result<ExecStatus, AgentError> {
    const COMMAND: &str = "guest-exec-status";
    let bad = |what: String| AgentError::BadReply {
        command: COMMAND,
        what,
    };
    let s: StatusReply = serde_json::from_value(ret).map_err(|e| bad(quoted(&e.to_string())))?;
    if !s.exited {
        return Ok(ExecStatus::Running);
    }
    let decode = |data: Option<String>, what: &str| -> Result<Vec<u8>, AgentError> {
        data.map_or(Ok(Vec::new()), |d| {
            base64::engine::general_purpose::STANDARD
                .decode(d.as_bytes())
                .map_err(|e| bad(format!("{what} is not base64: {e}")))
        })
    };
    Ok(ExecStatus::Exited(Exited {
        exit_code: s.exitcode,
        signal: s.signal,
        stdout: decode(s.out_data, "out-data")?,
        stderr: decode(s.err_data, "err-data")?,
    }))
}

/// A connection to qemu-ga.
pub struct GuestAgent {
    stream: UnixStream,
    inbox: Inbox,
    /// The stream is in step: the next line is the reply to the next request.
    synced: bool,
    cancel: Option<Arc<AtomicBool>>,
}

impl GuestAgent {
    /// Connects to the channel's socket, retrying until `deadline` (QEMU creates it as it starts).
    pub fn connect(
        path: &Path,
        deadline: Instant,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<GuestAgent, AgentError> {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(GuestAgent::new(s, cancel)),
                Err(source) if Instant::now() + CONNECT_RETRY >= deadline => {
                    return Err(AgentError::Connect {
                        path: path.to_owned(),
                        source,
                    })
                }
                Err(_) => {}
            }
            if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(AgentError::Cancelled);
            }
            std::thread::sleep(CONNECT_RETRY);
        }
    }

    /// A client on a connected stream; `cancel` stops any wait within a second.
    pub fn new(stream: UnixStream, cancel: Option<Arc<AtomicBool>>) -> GuestAgent {
        GuestAgent {
            stream,
            inbox: Inbox::default(),
            synced: false,
            cancel,
        }
    }

    fn cancelled(&self) -> Result<(), AgentError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(AgentError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Reads what has arrived, waiting until `until` at most; false when nothing came by then.
    fn fill(&mut self, until: Instant) -> Result<bool, AgentError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.cancelled()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.stream
                .set_read_timeout(Some(left.min(STEP)))
                .map_err(AgentError::Io)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(AgentError::Closed),
                Ok(n) => {
                    self.inbox.push(&chunk[..n]);
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(AgentError::Io(e)),
            }
        }
    }

    /// Writes `bytes` whole by `until`; false when the channel took them too slowly (QEMU reads
    /// the socket only while the guest has the port open).
    fn send(&mut self, bytes: &[u8], until: Instant) -> Result<bool, AgentError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            self.cancelled()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.stream
                .set_write_timeout(Some(left.min(STEP)))
                .map_err(AgentError::Io)?;
            match self.stream.write(rest) {
                Ok(0) => return Err(AgentError::Closed),
                Ok(n) => rest = &rest[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Err(AgentError::Closed),
                Err(e) => return Err(AgentError::Io(e)),
            }
        }
        Ok(true)
    }

    /// Brings the stream in step: sends a sentinel and guest-sync-delimited with a fresh random
    /// id, again every second, until qemu-ga echoes the latest id (it starts some seconds after
    /// the kernel) or `deadline` passes. Bytes before a sentinel and replies with another id are
    /// dropped.
    pub fn sync(&mut self, deadline: Instant) -> Result<(), AgentError> {
        let began = Instant::now();
        self.synced = false;
        loop {
            let id = u64::from(rand::random::<u32>());
            let mut msg = vec![SENTINEL];
            msg.extend(request("guest-sync-delimited", json!({ "id": id })));
            let resend = (Instant::now() + STEP).min(deadline);
            if self.send(&msg, deadline)? {
                let mut after_sentinel = false;
                loop {
                    if !after_sentinel {
                        after_sentinel = self.inbox.skip_to_sentinel();
                    }
                    if after_sentinel {
                        if let Some(line) = self.inbox.take_line(MAX_REPLY)? {
                            if sync_reply_id(&line) == Some(id) {
                                self.synced = true;
                                return Ok(());
                            }
                            after_sentinel = false;
                            continue;
                        }
                    }
                    if !self.fill(resend)? {
                        break;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(AgentError::NoAnswer {
                    waited: deadline.saturating_duration_since(began),
                });
            }
        }
    }

    /// Sends one request and returns its reply's `return` value, syncing first if needed.
    fn call(
        &mut self,
        command: &'static str,
        arguments: Value,
        deadline: Instant,
    ) -> Result<Value, AgentError> {
        if !self.synced {
            self.sync(deadline)?;
        }
        let began = Instant::now();
        let until = (began + REPLY_TIMEOUT).min(deadline);
        let no_reply = || AgentError::NoReply {
            command,
            waited: until.saturating_duration_since(began),
        };
        // Out of step until the reply is taken whole: a late reply must not be read as the
        // next request's.
        self.synced = false;
        if !self.send(&request(command, arguments), until)? {
            return Err(no_reply());
        }
        let line = loop {
            if let Some(line) = self.inbox.take_line(MAX_REPLY)? {
                break line;
            }
            if !self.fill(until)? {
                return Err(no_reply());
            }
        };
        self.synced = true;
        parse_reply(command, &line)
    }

    /// Starts `path` with `args` in the guest, capturing its output; returns its guest pid.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[String],
        deadline: Instant,
    ) -> Result<i64, AgentError> {
        const COMMAND: &str = "guest-exec";
        let ret = self.call(
            COMMAND,
            json!({ "path": path, "arg": args, "capture-output": true }),
            deadline,
        )?;
        ret.get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| AgentError::BadReply {
                command: COMMAND,
                what: "no integer \"pid\"".into(),
            })
    }

    /// The state of the process `pid` started by [`GuestAgent::exec`].
    pub fn exec_status(&mut self, pid: i64, deadline: Instant) -> Result<ExecStatus, AgentError> {
        let ret = self.call("guest-exec-status", json!({ "pid": pid }), deadline)?;
        parse_status(ret)
    }

    /// Runs `path` with `args` in the guest and waits for it to exit, asking every `poll`, until
    /// `deadline`.
    pub fn run(
        &mut self,
        path: &str,
        args: &[String],
        poll: Duration,
        deadline: Instant,
    ) -> Result<Exited, AgentError> {
        let pid = self.exec(path, args, deadline)?;
        let began = Instant::now();
        loop {
            if let ExecStatus::Exited(e) = self.exec_status(pid, deadline)? {
                return Ok(e);
            }
            if Instant::now() + poll >= deadline {
                return Err(AgentError::NotExited {
                    pid,
                    waited: began.elapsed(),
                });
            }
            self.cancelled()?;
            std::thread::sleep(poll);
        }
    }
}

/// A scripted qemu-ga for tests, hostile on demand.
#[cfg(test)]
pub(crate) mod fake {
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
}

#[cfg(test)]
mod tests {
    use super::fake::{self, Fake, Run};
    use super::*;

    fn soon(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    fn agent(f: Fake) -> (GuestAgent, Arc<std::sync::Mutex<Vec<Value>>>) {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let seen = fake::serve(f, theirs);
        (GuestAgent::new(ours, None), seen)
    }

    fn exits(code: i64, stdout: &'static [u8], stderr: &'static [u8]) -> Run {
        Run::Exits {
            code,
            stdout,
            stderr,
        }
    }

    #[test]
    fn inbox_frames_lines_and_skips_to_the_sentinel() {
        let mut inbox = Inbox::default();
        inbox.push(b"stale {\"return\": 1}\n\xff{\"ret");
        assert!(inbox.skip_to_sentinel());
        assert_eq!(inbox.take_line(100).expect("fits"), None);
        inbox.push(b"urn\": 7}\r\nnext");
        assert_eq!(
            inbox.take_line(100).expect("fits").as_deref(),
            Some(&b"{\"return\": 7}"[..])
        );
        assert_eq!(inbox.take_line(100).expect("fits"), None);
        assert!(!inbox.skip_to_sentinel(), "no sentinel: all of it is stale");
        assert!(inbox.buf.is_empty());
    }

    #[test]
    fn inbox_refuses_a_line_over_the_limit_with_or_without_its_newline() {
        let mut inbox = Inbox::default();
        inbox.push(&[b'x'; 11]);
        assert!(matches!(
            inbox.take_line(10),
            Err(AgentError::ReplyTooLong { limit: 10 })
        ));
        let mut inbox = Inbox::default();
        inbox.push(b"0123456789a\n");
        assert!(matches!(
            inbox.take_line(10),
            Err(AgentError::ReplyTooLong { .. })
        ));
        let mut inbox = Inbox::default();
        inbox.push(b"0123456789\n");
        assert!(inbox.take_line(10).expect("at the limit").is_some());
    }

    #[test]
    fn replies_are_parsed_without_trusting_them() {
        assert_eq!(
            parse_reply("x", br#"{"return": {"pid": 5}}"#).expect("ok"),
            json!({ "pid": 5 })
        );
        let long = "d".repeat(10_000);
        let line = json!({ "error": { "class": "GenericError", "desc": long } }).to_string();
        match parse_reply("guest-exec", line.as_bytes()) {
            Err(AgentError::Refused { desc, .. }) => assert!(desc.len() < 300, "{desc}"),
            other => panic!("{other:?}"),
        }
        for garbage in [
            &b"\x00\x01 not json"[..],
            b"[1,2]",
            b"{\"neither\": 1}",
            b"",
        ] {
            assert!(
                matches!(parse_reply("x", garbage), Err(AgentError::BadReply { .. })),
                "{garbage:?}"
            );
        }
        assert!(matches!(
            parse_status(json!({ "exited": true, "out-data": "%%% not base64" })),
            Err(AgentError::BadReply { .. })
        ));
        assert!(matches!(
            parse_status(json!({ "exited": "yes" })),
            Err(AgentError::BadReply { .. })
        ));
        assert_eq!(sync_reply_id(b"junk\xff{\"return\": 42}"), Some(42));
        assert_eq!(sync_reply_id(b"{\"return\": \"42\"}"), None);
    }

    #[test]
    fn runs_a_command_and_decodes_its_output() {
        let (mut a, seen) = agent(Fake {
            runs: vec![exits(3, b"line one\nok\n", b"warn\xe2")],
            polls_running: 2,
            ..Fake::default()
        });
        let out = a
            .run(
                "/bin/true",
                &["-x".to_owned()],
                Duration::from_millis(10),
                soon(10),
            )
            .expect("ran");
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.stdout, b"line one\nok\n");
        assert_eq!(out.stderr, b"warn\xe2");
        let seen = seen.lock().expect("log").clone();
        let exec = seen
            .iter()
            .find(|r| r["execute"] == "guest-exec")
            .expect("a guest-exec");
        assert_eq!(
            exec["arguments"],
            json!({ "path": "/bin/true", "arg": ["-x"], "capture-output": true })
        );
        let polls = seen
            .iter()
            .filter(|r| r["execute"] == "guest-exec-status")
            .count();
        assert_eq!(polls, 3, "polled until exited");
    }

    #[test]
    fn sync_skips_garbage_and_stale_ids_and_waits_for_a_late_agent() {
        let mut stale = b"boot noise \x00\x01{\"return\": 1}\n".to_vec();
        stale.extend(b"\xff{\"return\": 4294967296}\n\xffnot json\n");
        let (mut a, seen) = agent(Fake {
            ignore_syncs: 1,
            before_sync: stale,
            runs: vec![exits(0, b"", b"")],
            ..Fake::default()
        });
        a.sync(soon(10)).expect("synced");
        let syncs = seen
            .lock()
            .expect("log")
            .iter()
            .filter(|r| r["execute"] == "guest-sync-delimited")
            .count();
        assert_eq!(
            syncs, 2,
            "the first sync went unanswered and was sent again"
        );
        let out = a.run("/bin/true", &[], Duration::from_millis(10), soon(10));
        assert_eq!(out.expect("in step after sync").exit_code, Some(0));
    }

    #[test]
    fn a_silent_agent_is_a_timeout_not_a_hang() {
        let (mut a, _seen) = agent(Fake {
            ignore_syncs: usize::MAX,
            ..Fake::default()
        });
        let began = Instant::now();
        let e = a.sync(soon(2)).expect_err("silent");
        assert!(matches!(e, AgentError::NoAnswer { .. }), "{e}");
        assert_eq!(e.to_string(), "the guest agent did not answer within 2 s");
        assert!(began.elapsed() < Duration::from_secs(4));
        assert!(!e.is_final(), "a late agent may still come up");
    }

    #[test]
    fn an_oversized_reply_is_refused() {
        let mut huge = vec![b'{'; MAX_REPLY + 10];
        huge.push(b'\n');
        let (mut a, _seen) = agent(Fake {
            exec_reply: Some(huge),
            ..Fake::default()
        });
        let e = a
            .run("/bin/true", &[], Duration::from_millis(10), soon(10))
            .expect_err("too long");
        assert!(matches!(e, AgentError::ReplyTooLong { .. }), "{e}");
        assert!(e.is_final());
    }

    #[test]
    fn a_reply_that_is_not_the_protocol_is_refused() {
        let (mut a, _seen) = agent(Fake {
            exec_reply: Some(b"{\"return\": {\"pid\": \"one\"}}\n".to_vec()),
            ..Fake::default()
        });
        let e = a
            .run("/bin/true", &[], Duration::from_millis(10), soon(10))
            .expect_err("bad pid");
        assert!(matches!(e, AgentError::BadReply { .. }), "{e}");
        let (mut a, _seen) = agent(Fake {
            runs: vec![exits(0, b"", b"")],
            status_reply: Some(json!({ "exited": true, "out-data": "***" })),
            ..Fake::default()
        });
        let e = a
            .run("/bin/true", &[], Duration::from_millis(10), soon(10))
            .expect_err("bad base64");
        assert!(e.to_string().contains("out-data is not base64"), "{e}");
    }

    #[test]
    fn a_command_that_never_exits_times_out() {
        let (mut a, _seen) = agent(Fake {
            runs: vec![Run::Never],
            ..Fake::default()
        });
        let began = Instant::now();
        let e = a
            .run("/bin/sleep", &[], Duration::from_millis(50), soon(1))
            .expect_err("never exits");
        assert!(matches!(e, AgentError::NotExited { pid: 1001, .. }), "{e}");
        assert!(began.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_closed_channel_and_cancel_end_the_wait() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        drop(theirs);
        let mut a = GuestAgent::new(ours, None);
        let e = a.sync(soon(10)).expect_err("closed");
        assert!(e.is_final(), "{e}");

        let (ours, _theirs) = UnixStream::pair().expect("pair");
        let cancel = Arc::new(AtomicBool::new(true));
        let mut a = GuestAgent::new(ours, Some(cancel));
        assert!(matches!(a.sync(soon(10)), Err(AgentError::Cancelled)));
    }
}
