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

use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use wire::{parse_reply, parse_status, request, sync_reply_id, Inbox, SENTINEL};

#[cfg(test)]
pub(crate) mod fake;
mod wire;

/// Longest reply line taken from the guest. A health check prints lines, not megabytes; 4 MiB of
/// base64 still carries 3 MiB of output, and it bounds what a hostile guest makes us hold.
pub const MAX_REPLY: usize = 4 << 20;
/// Longest single wait on the socket: the cancel flag is looked at this often, and an
/// unanswered sync is sent again after it (qemu-ga answers in milliseconds once it runs).
const STEP: Duration = Duration::from_secs(1);
/// How long qemu-ga may take to answer one request once it is in sync (it answers at once;
/// the command runs in the background).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two attempts to connect to the socket QEMU creates.
const CONNECT_RETRY: Duration = Duration::from_millis(200);

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
