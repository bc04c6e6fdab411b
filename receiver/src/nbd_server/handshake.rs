//! The NBD handshake (fixed newstyle) and option haggling, until the client picks an export:
//! `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`, structured replies and the `base:allocation`
//! metadata context.

use super::{bad, rd_u32, rd_u64, Export, Exports, ALLOCATION_ID};
use rewind_proto::nbd::*;
use std::io::{self, Read, Write};

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// Parses "u32 length + name" at the front of `data`.
fn take_name(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), &data[4 + len..]))
}

/// What the option haggling settled: the export, and how replies are made.
pub(super) struct Session {
    pub(super) export: Export,
    /// Structured replies (and so block status) were agreed.
    pub(super) structured: bool,
    /// `base:allocation` was chosen as the meta context.
    pub(super) allocation: bool,
}

/// The handshake (fixed newstyle) and the options, until the client picks an export (None:
/// it aborted).
pub(super) fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &Exports,
) -> io::Result<Option<Session>> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&3u16.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    w.flush()?;
    let client_flags = rd_u32(r)?;
    let no_zeroes = client_flags & 2 != 0;
    let mut structured = false;
    let mut allocation = false;
    let flags =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN;
    let export = loop {
        if rd_u64(r)? != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let opt = rd_u32(r)?;
        let len = rd_u32(r)?;
        if len > MAX_OPTION {
            return Err(bad("option too long"));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        let find = |name: &str| {
            exports
                .list
                .iter()
                .find(|e| e.name == name || (name.is_empty() && exports.list.len() == 1))
        };
        match opt {
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_LIST => {
                for e in &exports.list {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                if meta_context(w, opt, &data, structured, |n| find(n).is_some())? {
                    allocation = true;
                }
            }
            OPT_GO | OPT_INFO => {
                let Some((name, _)) = take_name(&data) else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed")?;
                    continue;
                };
                let Some(e) = find(&name) else {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_UNKNOWN,
                        format!("no export {name:?}").as_bytes(),
                    )?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&e.disk.size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(w, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(w, opt, REP_INFO, &bs)?;
                option_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break e.clone();
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(e) = find(&name) else {
                    return Err(bad("unknown export"));
                };
                w.write_all(&e.disk.size.to_be_bytes())?;
                w.write_all(&flags.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                break e.clone();
            }
            OPT_ABORT => {
                let _ = option_reply(w, opt, REP_ACK, &[]);
                return Ok(None);
            }
            _ => option_reply(w, opt, REP_ERR_UNSUP, b"unsupported option")?,
        }
    };
    Ok(Some(Session {
        export,
        structured,
        allocation,
    }))
}

/// Answers a `SET_META_CONTEXT` or `LIST_META_CONTEXT` option (only `base:allocation` is
/// offered); returns whether `base:allocation` was chosen.
fn meta_context(
    w: &mut impl Write,
    opt: u32,
    data: &[u8],
    structured: bool,
    known: impl Fn(&str) -> bool,
) -> io::Result<bool> {
    let Some((name, rest)) = take_name(data) else {
        option_reply(w, opt, REP_ERR_INVALID, b"malformed")?;
        return Ok(false);
    };
    if !structured || !known(&name) {
        option_reply(
            w,
            opt,
            REP_ERR_INVALID,
            b"structured replies and a known export first",
        )?;
        return Ok(false);
    }
    let count = rest
        .get(..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut q = &rest[4.min(rest.len())..];
    let mut want = count == 0 && opt == OPT_LIST_META_CONTEXT;
    for _ in 0..count {
        let Some((query, tail)) = take_name(q) else {
            break;
        };
        q = tail;
        if query == "base:allocation" || (opt == OPT_LIST_META_CONTEXT && query == "base:") {
            want = true;
        }
    }
    if want {
        let mut d = ALLOCATION_ID.to_be_bytes().to_vec();
        d.extend_from_slice(b"base:allocation");
        option_reply(w, opt, REP_META_CONTEXT, &d)?;
    }
    option_reply(w, opt, REP_ACK, &[])?;
    Ok(want && opt == OPT_SET_META_CONTEXT)
}
