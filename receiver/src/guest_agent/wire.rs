//! The guest agent's wire format as a pure core (no I/O): framing received bytes into lines,
//! request lines, and replies parsed without trusting them.

use super::{AgentError, ExecStatus, Exited};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

/// Marks the start of a sync reply (from qemu-ga) and resets qemu-ga's parser (to it).
pub(super) const SENTINEL: u8 = 0xFF;
/// Most bytes of a guest-supplied text (an error description) kept in a message.
const MAX_QUOTED: usize = 256;

/// Bytes received and not yet taken as lines (the pure framing core: no I/O).
#[derive(Debug, Default)]
pub(super) struct Inbox {
    buf: Vec<u8>,
    /// Bytes at the start of `buf` known to hold no newline.
    scanned: usize,
}

impl Inbox {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Drops everything up to and including the first sentinel; whether there was one (without
    /// one, everything is dropped: it is stale).
    pub(super) fn skip_to_sentinel(&mut self) -> bool {
        let found = self.buf.iter().position(|&b| b == SENTINEL);
        match found {
            Some(i) => self.buf.drain(..=i),
            None => self.buf.drain(..),
        };
        self.scanned = 0;
        found.is_some()
    }

    /// The first whole line, without its line ending, once it has arrived.
    pub(super) fn take_line(&mut self, limit: usize) -> Result<Option<Vec<u8>>, AgentError> {
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
pub(super) fn request(command: &str, arguments: Value) -> Vec<u8> {
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
pub(super) fn parse_reply(command: &'static str, line: &[u8]) -> Result<Value, AgentError> {
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
pub(super) fn sync_reply_id(line: &[u8]) -> Option<u64> {
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

/// The state guest-exec-status reports, its output decoded.
pub(super) fn parse_status(ret: Value) -> Result<ExecStatus, AgentError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
