//! A small QMP client over a unix socket: greeting, `qmp_capabilities`, then one command at a
//! time; asynchronous events are skipped. Also speaks the guest agent's protocol (`qga`).

use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest line we accept from QEMU (query-named-block-nodes on a big VM is large).
const MAX_LINE: usize = 16 * 1024 * 1024;
/// How long a guest agent may take to answer `guest-sync`.
const GUEST_SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU may take to greet: a monitor socket accepts connections (into its backlog)
/// while another client holds the monitor, and then never greets.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// What the guest agent sends before its reply to `guest-sync-delimited` (a byte that is never
/// part of JSON): a reply left over from an earlier client may start with it.
const QGA_DELIMITER: u8 = 0xff;
/// A command that takes longer than this is treated as a hung monitor.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// QEMU closed the connection.
    #[error("QMP socket {0}: QEMU closed the connection")]
    Closed(String),
    /// QEMU sent something that is not QMP.
    #[error("QMP socket {path}: unexpected message: {message}")]
    Protocol { path: String, message: String },
    /// A command failed in QEMU.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// QEMU did not answer in time.
    #[error("QMP {0} timed out")]
    Timeout(String),
}

/// A connected monitor (QMP) or guest agent (QGA) socket.
pub struct Qmp {
    path: String,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects to a QMP socket and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let mut q = Qmp::open(path).await?;
        let greeting = tokio::time::timeout(GREETING_TIMEOUT, q.read_message())
            .await
            .map_err(|_| {
                QmpError::Timeout("greeting (is another client connected to the monitor?)".into())
            })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: q.path.clone(),
                message: greeting.to_string(),
            });
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    /// Connects to a QEMU guest agent socket and synchronises the stream (`guest-sync`), so
    /// that a reply left over from an earlier client is not taken for ours.
    pub async fn connect_guest_agent(path: &Path) -> Result<Qmp, QmpError> {
        let mut q = Qmp::open(path).await?;
        let id: u32 = rand::random::<u32>() & 0x7fff_ffff;
        q.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))
            .await?;
        // The socket accepts even when no agent runs in the guest: bound the wait.
        tokio::time::timeout(GUEST_SYNC_TIMEOUT, async {
            loop {
                let m = q.read_message().await?;
                if m.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout("guest-sync (is the guest agent running?)".into()))??;
        Ok(q)
    }

    async fn open(path: &Path) -> Result<Qmp, QmpError> {
        let p = path.display().to_string();
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Io {
                path: p.clone(),
                source,
            })?;
        let (r, w) = sock.into_split();
        Ok(Qmp {
            path: p,
            reader: BufReader::new(r),
            writer: w,
        })
    }

    async fn send(&mut self, msg: &Value) -> Result<(), QmpError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The next message, skipping blank lines. Lines are read as bytes: a guest agent's
    /// delimiter byte is not UTF-8, and JSON parsing checks the text.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = tokio::io::AsyncReadExt::take(&mut self.reader, MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(QmpError::Closed(self.path.clone()));
            }
            let skip = |b: &u8| b.is_ascii_whitespace() || *b == QGA_DELIMITER;
            let start = line.iter().position(|b| !skip(b)).unwrap_or(line.len());
            let end = line.iter().rposition(|b| !skip(b)).map_or(start, |i| i + 1);
            let t = &line[start..end];
            if t.is_empty() {
                continue;
            }
            return serde_json::from_slice(t).map_err(|_| QmpError::Protocol {
                path: self.path.clone(),
                message: String::from_utf8_lossy(&t[..t.len().min(200)]).into_owned(),
            });
        }
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            json!({"execute": command, "arguments": arguments})
        } else {
            json!({"execute": command})
        };
        tracing::debug!(%command, args = %arguments, "qmp");
        self.send(&msg).await?;
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    continue;
                }
                return Ok::<Value, QmpError>(m);
            }
        })
        .await
        .map_err(|_| QmpError::Timeout(command.to_owned()))??;
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = reply.get("error") {
            return Err(QmpError::Command {
                command: command.to_owned(),
                class: e["class"].as_str().unwrap_or("?").to_owned(),
                desc: e["desc"].as_str().unwrap_or("?").to_owned(),
            });
        }
        Err(QmpError::Protocol {
            path: self.path.clone(),
            message: reply.to_string(),
        })
    }

    /// Runs a human monitor command (e.g. `qemu-io drive0 "write -P 1 0 64k"`).
    pub async fn hmp(&mut self, line: &str) -> Result<String, QmpError> {
        let r = self
            .execute("human-monitor-command", json!({"command-line": line}))
            .await?;
        Ok(r.as_str().unwrap_or_default().to_owned())
    }
}
