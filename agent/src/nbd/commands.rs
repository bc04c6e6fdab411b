//! The transmission phase: reads (one or many ranges in flight), writes, zeroes, flushes and
//! block-status queries, each reply checked against the request it answers.

use super::*;

impl<S: Read + Write> NbdClient<S> {
    /// Reads exactly `buf.len()` bytes at `offset` (split into requests of at most
    /// [`MAX_READ`]). Holes the server reports are zero-filled.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(MAX_READ as usize);
            self.read_one(&mut buf[done..done + len], offset + done as u64)?;
            done += len;
        }
        Ok(())
    }

    fn read_one(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let cookie = self.next_cookie();
        let len = buf.len() as u32;
        self.send(&request(CMD_READ, 0, cookie, offset, len))?;
        let end = offset + u64::from(len);
        let mut covered = 0u64;
        loop {
            let h = self.reply_header(cookie, "read", offset)?;
            match h.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    if h.len < 8 {
                        return proto("short OFFSET_DATA chunk");
                    }
                    let at = read_u64(&mut self.sock)?;
                    let n = u64::from(h.len - 8);
                    if at < offset || at + n > end {
                        return proto(format!("data chunk {at}+{n} outside {offset}+{len}"));
                    }
                    let s = (at - offset) as usize;
                    self.sock.read_exact(&mut buf[s..s + n as usize])?;
                    covered += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if h.len != 12 {
                        return proto("bad OFFSET_HOLE chunk");
                    }
                    let at = read_u64(&mut self.sock)?;
                    let n = u64::from(read_u32(&mut self.sock)?);
                    if at < offset || at + n > end {
                        return proto(format!("hole chunk {at}+{n} outside {offset}+{len}"));
                    }
                    let s = (at - offset) as usize;
                    buf[s..s + n as usize].fill(0);
                    covered += n;
                }
                REPLY_TYPE_NONE => {
                    if h.len != 0 {
                        return proto("NONE chunk with payload");
                    }
                }
                SIMPLE => {
                    self.sock.read_exact(buf)?;
                    return Ok(());
                }
                other => return proto(format!("unexpected chunk type {other} in a read reply")),
            }
            if h.done {
                break;
            }
        }
        if covered != u64::from(len) {
            return proto(format!("read reply covered {covered} of {len} bytes"));
        }
        Ok(())
    }

    /// The extents of metadata context `context` over `[offset, offset + length)`, merged
    /// across requests, covering the whole range.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let id = *self
            .contexts
            .get(context)
            .ok_or_else(|| NbdError::NoContext(context.to_owned()))?;
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let len = (end - pos).min(STATUS_PIECE) as u32;
            let cookie = self.next_cookie();
            self.send(&request(CMD_BLOCK_STATUS, 0, cookie, pos, len))?;
            let mut got = Vec::new();
            loop {
                let h = self.reply_header(cookie, "block status", pos)?;
                match h.kind {
                    REPLY_TYPE_BLOCK_STATUS => {
                        if h.len < 4 || (h.len - 4) % 8 != 0 || h.len > MAX_OPTION_REPLY * 16 {
                            return proto("bad BLOCK_STATUS chunk length");
                        }
                        let ctx = read_u32(&mut self.sock)?;
                        let mut at = pos;
                        let mut descs = Vec::new();
                        for _ in 0..(h.len - 4) / 8 {
                            let l = u64::from(read_u32(&mut self.sock)?);
                            let f = read_u32(&mut self.sock)?;
                            descs.push(Extent {
                                offset: at,
                                length: l,
                                flags: f,
                            });
                            at += l;
                        }
                        if ctx == id {
                            got = descs;
                        }
                    }
                    REPLY_TYPE_NONE => {}
                    other => {
                        return proto(format!(
                            "unexpected chunk type {other} in a block status reply"
                        ))
                    }
                }
                if h.done {
                    break;
                }
            }
            let advanced: u64 = got.iter().map(|e| e.length).sum();
            if advanced == 0 {
                return proto("block status made no progress");
            }
            for e in got {
                // A reply may run past the range asked for (the spec lets the last extent do
                // so); what lies past it is not ours to report.
                if e.offset >= end {
                    break;
                }
                let length = e.length.min(end - e.offset);
                if length == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(last)
                        if last.flags == e.flags && last.offset + last.length == e.offset =>
                    {
                        last.length += length
                    }
                    _ => out.push(Extent { length, ..e }),
                }
            }
            pos = (pos + advanced).min(end);
        }
        Ok(out)
    }

    /// Reads many ranges (each at most [`MAX_READ`] bytes) keeping up to [`PIPELINE`] requests
    /// in flight; `deliver(i, bytes)` gets range `i` as soon as its reply is complete (replies
    /// may come in any order). Holes are zero-filled. After an error the connection is not
    /// reusable.
    pub fn read_many(
        &mut self,
        ranges: &[(u64, usize)],
        deliver: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), NbdError> {
        // cookie -> (range index, buffer, bytes covered)
        let mut inflight: HashMap<u64, (usize, Vec<u8>, u64)> = HashMap::new();
        // Buffers of delivered ranges, reused (cleared) for the next ones.
        let mut spare: Vec<Vec<u8>> = Vec::new();
        // New requests go out together, in one write.
        let mut requests = Vec::new();
        let mut next = 0;
        while next < ranges.len() || !inflight.is_empty() {
            while next < ranges.len() && inflight.len() < PIPELINE {
                let (offset, len) = ranges[next];
                if len > MAX_READ as usize {
                    return proto(format!("read of {len} bytes is over the {MAX_READ} limit"));
                }
                let cookie = self.next_cookie();
                requests.extend_from_slice(&request(CMD_READ, 0, cookie, offset, len as u32));
                let mut buf = spare.pop().unwrap_or_default();
                buf.clear();
                buf.resize(len, 0);
                inflight.insert(cookie, (next, buf, 0));
                next += 1;
            }
            if !requests.is_empty() {
                self.send(&requests)?;
                requests.clear();
            }
            let (cookie, h) =
                self.any_reply("read", |c| inflight.get(&c).map(|(i, _, _)| ranges[*i].0))?;
            let Some((i, buf, covered)) = inflight.get_mut(&cookie) else {
                return proto(format!("reply for unknown cookie {cookie}"));
            };
            let (offset, len) = ranges[*i];
            let end = offset + len as u64;
            match h.kind {
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let data = h.kind == REPLY_TYPE_OFFSET_DATA;
                    if (data && h.len < 8) || (!data && h.len != 12) {
                        return proto("bad read reply chunk");
                    }
                    let at = read_u64(&mut self.sock)?;
                    let n = if data {
                        u64::from(h.len - 8)
                    } else {
                        u64::from(read_u32(&mut self.sock)?)
                    };
                    if at < offset || at + n > end {
                        return proto(format!("chunk {at}+{n} outside {offset}+{len}"));
                    }
                    let s = (at - offset) as usize;
                    let piece = &mut buf[s..s + n as usize];
                    if data {
                        self.sock.read_exact(piece)?;
                    } else {
                        piece.fill(0);
                    }
                    *covered += n;
                }
                REPLY_TYPE_NONE if h.len == 0 => {}
                SIMPLE => {
                    self.sock.read_exact(buf)?;
                    *covered = len as u64;
                }
                other => return proto(format!("unexpected chunk type {other} in a read reply")),
            }
            if h.done {
                if let Some((i, buf, covered)) = inflight.remove(&cookie) {
                    if covered != len as u64 {
                        return proto(format!("read reply covered {covered} of {len} bytes"));
                    }
                    deliver(i, &buf);
                    spare.push(buf);
                }
            }
        }
        Ok(())
    }

    /// Writes many (offset, bytes) pieces, each at most [`MAX_READ`] bytes, keeping up to
    /// [`PIPELINE`] requests in flight. After an error the connection is not reusable.
    pub fn write_many(&mut self, writes: &[(u64, &[u8])]) -> Result<(), NbdError> {
        let mut inflight: HashMap<u64, u64> = HashMap::new();
        let mut next = 0;
        while next < writes.len() || !inflight.is_empty() {
            while next < writes.len() && inflight.len() < PIPELINE {
                let (offset, data) = writes[next];
                if data.len() > MAX_READ as usize {
                    return proto(format!(
                        "write of {} bytes is over the {MAX_READ} limit",
                        data.len()
                    ));
                }
                let cookie = self.next_cookie();
                self.send(&request(CMD_WRITE, 0, cookie, offset, data.len() as u32))?;
                self.send(data)?;
                inflight.insert(cookie, offset);
                next += 1;
            }
            let (cookie, h) = self.any_reply("write", |c| inflight.get(&c).copied())?;
            if !inflight.contains_key(&cookie) {
                return proto(format!("reply for unknown cookie {cookie}"));
            }
            if h.len != 0 {
                return proto("write reply with payload");
            }
            if h.done {
                inflight.remove(&cookie);
            }
        }
        Ok(())
    }

    /// Reads one reply header for any request in flight; `offset_of(cookie)` names the
    /// request's offset for error messages. An error chunk becomes an error (not drained).
    fn any_reply(
        &mut self,
        command: &'static str,
        offset_of: impl Fn(u64) -> Option<u64>,
    ) -> Result<(u64, ReplyHeader), NbdError> {
        let magic = read_u32(&mut self.sock)?;
        let (cookie, header, failure) = match magic {
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.sock)?;
                let kind = read_u16(&mut self.sock)?;
                let cookie = read_u64(&mut self.sock)?;
                let len = read_u32(&mut self.sock)?;
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    let (errno, message) =
                        error_payload(&read_vec(&mut self.sock, len, MAX_OPTION_REPLY)?)?;
                    (cookie, None, Some((errno, message)))
                } else {
                    let done = flags & REPLY_FLAG_DONE != 0;
                    (cookie, Some(ReplyHeader { done, kind, len }), None)
                }
            }
            SIMPLE_REPLY_MAGIC => {
                let errno = read_u32(&mut self.sock)?;
                let cookie = read_u64(&mut self.sock)?;
                if errno != 0 {
                    (cookie, None, Some((errno, String::new())))
                } else {
                    let h = ReplyHeader {
                        done: true,
                        kind: SIMPLE,
                        len: 0,
                    };
                    (cookie, Some(h), None)
                }
            }
            other => return Err(NbdError::BadMagic(u64::from(other))),
        };
        match (header, failure) {
            (Some(h), _) => Ok((cookie, h)),
            (None, Some((errno, message))) => Err(NbdError::Command {
                command,
                offset: offset_of(cookie).unwrap_or(0),
                errno,
                message,
            }),
            (None, None) => proto("empty reply"),
        }
    }

    /// Reads one reply header for `cookie`; error chunks become errors (after draining them).
    pub(super) fn reply_header(
        &mut self,
        cookie: u64,
        command: &'static str,
        offset: u64,
    ) -> Result<ReplyHeader, NbdError> {
        let magic = read_u32(&mut self.sock)?;
        match magic {
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.sock)?;
                let kind = read_u16(&mut self.sock)?;
                let got = read_u64(&mut self.sock)?;
                let len = read_u32(&mut self.sock)?;
                if got != cookie {
                    return proto(format!("reply for cookie {got}, expected {cookie}"));
                }
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    let (errno, message) =
                        error_payload(&read_vec(&mut self.sock, len, MAX_OPTION_REPLY)?)?;
                    // Drain the rest of the reply so the connection stays usable.
                    let mut done = flags & REPLY_FLAG_DONE != 0;
                    while !done {
                        let h = self.reply_header(cookie, command, offset);
                        match h {
                            Ok(h) => {
                                read_vec(&mut self.sock, h.len, MAX_READ + 8)?;
                                done = h.done;
                            }
                            Err(_) => break,
                        }
                    }
                    return Err(NbdError::Command {
                        command,
                        offset,
                        errno,
                        message,
                    });
                }
                Ok(ReplyHeader {
                    done: flags & REPLY_FLAG_DONE != 0,
                    kind,
                    len,
                })
            }
            SIMPLE_REPLY_MAGIC => {
                let errno = read_u32(&mut self.sock)?;
                let got = read_u64(&mut self.sock)?;
                if got != cookie {
                    return proto(format!("reply for cookie {got}, expected {cookie}"));
                }
                if errno != 0 {
                    return Err(NbdError::Command {
                        command,
                        offset,
                        errno,
                        message: String::new(),
                    });
                }
                Ok(ReplyHeader {
                    done: true,
                    kind: SIMPLE,
                    len: 0,
                })
            }
            other => Err(NbdError::BadMagic(u64::from(other))),
        }
    }

    /// Writes `data` at `offset` (the export must be writable).
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        let mut done = 0usize;
        while done < data.len() {
            let len = (data.len() - done).min(MAX_READ as usize);
            let cookie = self.next_cookie();
            let at = offset + done as u64;
            self.send(&request(CMD_WRITE, 0, cookie, at, len as u32))?;
            self.send(&data[done..done + len])?;
            self.finish_simple(cookie, "write", at)?;
            done += len;
        }
        Ok(())
    }

    /// Writes zeros over `len` bytes at `offset`, letting the server punch holes.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        let cookie = self.next_cookie();
        self.send(&request(CMD_WRITE_ZEROES, 0, cookie, offset, len))?;
        self.finish_simple(cookie, "write zeroes", offset)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let cookie = self.next_cookie();
        self.send(&request(CMD_FLUSH, 0, cookie, 0, 0))?;
        self.finish_simple(cookie, "flush", 0)
    }
}
