//! Scan and upload: the disks are scanned on a blocking thread; each window of changes asks the
//! receiver which chunks it lacks, only those are compressed (off the async runtime), and the
//! batches go out on one upload stream in messages of about 1 MiB.

use super::limiter::RateLimiter;
use super::*;
use crate::clock::SystemClock;
/// Most block entries in one upload batch: keeps metadata-only batches (blocks that became
/// zero, or chunks the receiver already holds) well under the message limit.
const MAX_WINDOW_ENTRIES: usize = 16_384;
/// Most chunk hashes remembered per session to skip repeated questions.
const MAX_SEEN: usize = 1 << 20;
/// Windows queued between the scanner and the compressor, and upload messages between the
/// compressor and the network.
const QUEUE_DEPTH: usize = 4;
/// Most compressed chunk bytes in one upload message. The receiver keeps only whole messages,
/// so a link that breaks or slows to a trickle mid-message loses what it carried: a quarter of
/// a 4 MiB window loses a quarter as much. (Windows stay 4 MiB: one MissingChunks question
/// each.)
const MESSAGE_TARGET_BYTES: usize = 1024 * 1024;
/// MissingChunks questions in flight at once (each covers one window of up to 4 MiB).
const QUESTIONS_IN_FLIGHT: usize = 8;
/// Longest an upload stream goes without a batch: the receiver ends streams idle for longer
/// than its stream_idle_timeout (300 s by default), and a scan of a large unchanged disk may
/// find nothing to send for minutes, so an empty batch says the stream is alive.
const HEARTBEAT: Duration = Duration::from_secs(60);

struct Item {
    pos: u32,
    change: Change,
}

/// The receiver's MissingChunks answer for the hashes `asked`: refused whole if any hash is
/// malformed or was not asked (a receiver that answers what it was not asked is broken or
/// hostile, and guessing around it could drop a chunk the point needs).
fn missing_answer(
    asked: &[BlockHash],
    answer: &[Vec<u8>],
) -> Result<HashSet<BlockHash>, SyncError> {
    let asked: HashSet<&BlockHash> = asked.iter().collect();
    answer
        .iter()
        .map(|h| match BlockHash::from_slice(h) {
            Ok(l) if asked.contains(&l) => Ok(l),
            Ok(_) => Err(SyncError::Protocol(
                "MissingChunks answered a hash that was not asked",
            )),
            Err(_) => Err(SyncError::Protocol(
                "a malformed hash in the MissingChunks answer",
            )),
        })
        .collect()
}

/// One disk after its scan.
pub(super) struct ScannedDisk {
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) source: String,
    pub(super) scan: DiskScan,
}

type ScanResults = Vec<ScannedDisk>;

/// The batches of an upload stream, with an empty batch (a heartbeat) whenever none came for
/// [`HEARTBEAT`].
fn with_heartbeat(
    session: String,
    batches: mpsc::Receiver<pb::Batch>,
) -> impl futures::Stream<Item = pb::Batch> {
    futures::stream::unfold(batches, move |mut rx| {
        let session = session.clone();
        async move {
            match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                Ok(Some(b)) => Some((b, rx)),
                Ok(None) => None,
                Err(_) => Some((
                    pb::Batch {
                        session,
                        entries: Vec::new(),
                        chunks: Vec::new(),
                    },
                    rx,
                )),
            }
        }
    })
}

/// Scans all disks on a blocking thread while uploading what they yield; returns each disk's
/// scan and (bytes, chunks) sent for it.
pub(super) async fn transfer(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    session: &str,
    disks: Arc<Vec<OpenDisk>>,
    full: &[bool],
    heal: Arc<HashSet<BlockHash>>,
    progress: Progress,
) -> Result<(ScanResults, Vec<(u64, u64)>), SyncError> {
    let (wtx, wrx) = mpsc::channel::<Vec<Item>>(QUEUE_DEPTH);
    let scanner = {
        let disks = disks.clone();
        let full = full.to_vec();
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || scan_all(&disks, &full, &heal, &cfg, wtx, progress))
    };

    let (btx, brx) = mpsc::channel::<pb::Batch>(QUEUE_DEPTH);
    let upload = {
        let mut c = client.clone();
        let session = session.to_owned();
        tokio::spawn(async move { c.upload(with_heartbeat(session, brx)).await })
    };
    // Compression runs on its own thread (fanning out over the cores) so the next window's
    // MissingChunks round trip overlaps with this window's compression.
    let (ctx, crx) = mpsc::channel::<(Vec<Item>, HashSet<BlockHash>)>(1);
    let compressor = {
        let session = session.to_owned();
        let limiter = RateLimiter::new(cfg.bwlimit.clone(), Arc::new(SystemClock));
        let n = disks.len();
        let codec = cfg.codec.clone();
        tokio::task::spawn_blocking(move || compress_all(&session, &codec, n, crx, btx, limiter))
    };

    // Several MissingChunks questions in flight: on a long link each costs a round trip, and
    // one at a time would cap a seed at one window per round trip.
    let mut seen: HashSet<BlockHash> = HashSet::new();
    let mut compressor_gone = false;
    let mut answers = ReceiverStream::new(wrx)
        .map(|window| {
            let mut ask: Vec<BlockHash> = Vec::new();
            for it in &window {
                let leaf = it.change.leaf;
                if !leaf.is_zero() && !seen.contains(&leaf) && !ask.contains(&leaf) {
                    ask.push(leaf);
                }
            }
            // Chunks already asked about in this session: the receiver would answer "held"
            // for them anyway once their batch is stored; the set only saves questions and
            // duplicate sends between batches in flight, so it is bounded (about 64 MiB).
            if seen.len() > MAX_SEEN {
                seen.clear();
            }
            seen.extend(ask.iter().copied());
            let mut client = client.clone();
            let session = session.to_owned();
            async move {
                if ask.is_empty() {
                    return Ok((window, HashSet::new()));
                }
                let reply = client
                    .missing_chunks(pb::MissingChunksRequest {
                        session,
                        hashes: ask.iter().map(|h| h.0.to_vec()).collect(),
                    })
                    .await
                    .map_err(SyncError::refused("MissingChunks"))?
                    .into_inner();
                let missing = missing_answer(&ask, &reply.missing)?;
                Ok::<_, SyncError>((window, missing))
            }
        })
        .buffered(QUESTIONS_IN_FLIGHT);
    while let Some(answer) = answers.next().await {
        if ctx.send(answer?).await.is_err() {
            compressor_gone = true;
            break;
        }
    }
    drop(answers);
    drop(ctx);
    let compressed = compressor
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?;
    let uploaded = upload
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?
        .map_err(SyncError::refused("Upload"));
    let scanned = scanner
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?;
    // The upload's own error explains a stopped scan better than "upload stopped".
    uploaded?;
    let (sent, upload_gone) = compressed?;
    if upload_gone || compressor_gone {
        return Err(SyncError::Protocol("the upload stream closed early"));
    }
    let scans = scanned?;
    Ok((scans, sent))
}

/// The compression stage of [`transfer`]: compresses the chunks the receiver lacks, builds
/// each window's batch and queues it for upload. Returns (bytes, chunks) sent per disk and
/// whether the upload stream went away early.
fn compress_all(
    session: &str,
    codec: &rewind_proto::crypt::Codec,
    disks: usize,
    mut windows: mpsc::Receiver<(Vec<Item>, HashSet<BlockHash>)>,
    out: mpsc::Sender<pb::Batch>,
    mut limiter: RateLimiter,
) -> Result<(Vec<(u64, u64)>, bool), SyncError> {
    let mut sent = vec![(0u64, 0u64); disks];
    // Threads of its own: on the shared pool the scan's hashing of its next step waited
    // behind the compression of a whole window, starving this stage of windows in turn.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compress-{i}"))
        .build()
        .map_err(|e| SyncError::Worker(format!("compression threads: {e}")))?;
    while let Some((window, missing)) = windows.blocking_recv() {
        let mut to_send: Vec<(u32, BlockHash, &[u8])> = Vec::new();
        let mut queued: HashSet<BlockHash> = HashSet::new();
        for it in &window {
            if let Some(data) = &it.change.data {
                if missing.contains(&it.change.leaf) && queued.insert(it.change.leaf) {
                    to_send.push((it.pos, it.change.leaf, data));
                }
            }
        }
        let frames: Vec<(u32, BlockHash, Vec<u8>)> = pool
            .install(|| {
                to_send
                    .par_iter()
                    .map(|(pos, leaf, data)| codec.encode(*leaf, data).map(|f| (*pos, *leaf, f)))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .map_err(|e| SyncError::Worker(format!("compression failed: {e}")))?;
        for (pos, _, f) in &frames {
            sent[*pos as usize].0 += f.len() as u64;
            sent[*pos as usize].1 += 1;
        }
        for message in split_window(session, &window, frames) {
            limiter.spend(message.chunks.iter().map(|c| c.data.len() as u64).sum());
            if out.blocking_send(message).is_err() {
                return Ok((sent, true));
            }
        }
    }
    Ok((sent, false))
}

/// Splits one window's compressed chunks into upload messages of at most
/// [`MESSAGE_TARGET_BYTES`] (one larger chunk goes alone), each with the entries of the blocks
/// whose chunks it carries: the receiver refuses a chunk that no entry of its own message
/// uses. Entries whose chunk the receiver already holds, or that an earlier message of the
/// stream carried, or that are zero go in the first message, so every entry arrives with or
/// after its chunk (one stream keeps its order). Always yields at least one message.
fn split_window(
    session: &str,
    window: &[Item],
    frames: Vec<(u32, BlockHash, Vec<u8>)>,
) -> Vec<pb::Batch> {
    let message = || pb::Batch {
        session: session.to_owned(),
        entries: Vec::new(),
        chunks: Vec::new(),
    };
    let mut messages = vec![message()];
    let mut carried_in: std::collections::HashMap<BlockHash, usize> =
        std::collections::HashMap::with_capacity(frames.len());
    let mut bytes = 0usize;
    for (_, leaf, data) in frames {
        if bytes > 0 && bytes + data.len() > MESSAGE_TARGET_BYTES {
            messages.push(message());
            bytes = 0;
        }
        bytes += data.len();
        carried_in.insert(leaf, messages.len() - 1);
        if let Some(m) = messages.last_mut() {
            m.chunks.push(pb::Chunk {
                hash: leaf.0.to_vec(),
                data: data.into(),
            });
        }
    }
    for it in window {
        let n = carried_in.get(&it.change.leaf).copied().unwrap_or(0);
        messages[n].entries.push(pb::BlockEntry {
            disk: it.pos,
            index: it.change.index,
            hash: it.change.leaf.0.to_vec(),
        });
    }
    messages
}

/// The blocking half of [`transfer`]: scans disk after disk, records every change as pending
/// and hands batches of changes to the uploader.
fn scan_all(
    disks: &[OpenDisk],
    full: &[bool],
    heal: &HashSet<BlockHash>,
    cfg: &SyncConfig,
    out: mpsc::Sender<Vec<Item>>,
    progress: Progress,
) -> Result<ScanResults, SyncError> {
    let (state_dir, vm) = (cfg.state_dir.as_path(), cfg.vm.as_str());
    let read_conn = state::open(state_dir)?;
    let write_conn = state::open(state_dir)?;
    let mut pending = PendingWriter::new(&write_conn, vm)?;
    let total: u64 = disks.iter().map(|d| d.geometry.size).sum();
    let mut done_before = 0u64;
    let mut results = Vec::new();
    let mut window: Vec<Item> = Vec::new();
    let mut window_bytes = 0usize;
    for (pos, d) in disks.iter().enumerate() {
        let mut old = OldLeaves::new(&read_conn, vm, (!full[pos]).then_some(d.name.as_str()));
        let report = |p: u64| progress(done_before + p, total);
        // Healing needs every block read: a dirty bitmap only names the changed ones.
        let (mut src, plan) = open_reader(
            &d.reader,
            &d.geometry,
            full[pos] || !heal.is_empty(),
            full[pos],
        )?;
        let scan = scan::scan_disk(
            src.as_mut(),
            d.geometry,
            &plan.named(cfg.codec.chunk_ids()),
            &mut old,
            heal,
            |change| {
                pending.add(&d.name, change.index, &change.leaf)?;
                window_bytes += change.data.as_ref().map_or(0, bytes::Bytes::len);
                window.push(Item {
                    pos: pos as u32,
                    change,
                });
                if window_bytes >= BATCH_TARGET_BYTES || window.len() >= MAX_WINDOW_ENTRIES {
                    window_bytes = 0;
                    // Never hold the state's write lock while waiting on the network.
                    pending.checkpoint()?;
                    out.blocking_send(std::mem::take(&mut window))
                        .map_err(|_| ScanError::Stopped)?;
                }
                Ok(())
            },
            &report,
        )?;
        tracing::info!(vm, disk = %d.name, source = %d.source, changed = scan.changed, read = scan.read_bytes, "disk scanned");
        done_before += d.geometry.size;
        results.push(ScannedDisk {
            name: d.name.clone(),
            size: d.geometry.size,
            source: d.source.clone(),
            scan,
        });
    }
    pending.finish()?;
    if !window.is_empty() {
        out.blocking_send(window).map_err(|_| ScanError::Stopped)?;
    }
    Ok(results)
}

/// Opens a disk's reader and plans which blocks to read: everything that may hold data for a
/// full read, only the dirty blocks when a bitmap says which changed. A raw disk read for the
/// `first` time (no base point) is read with O_DIRECT.
fn open_reader(
    reader: &Reader,
    geometry: &DiskGeometry,
    full: bool,
    first: bool,
) -> Result<(Box<dyn BlockSource + Send>, ScanPlan), SyncError> {
    match reader {
        Reader::Raw(disk) => {
            let plan = ScanPlan::full(&disk.data_extents()?, geometry);
            let mut src = disk.try_clone()?;
            if first {
                // A first copy reads the whole disk once, past the page cache; later scans
                // read through it (an image the cache holds reads several times faster).
                src = src.read_direct();
            }
            Ok((Box::new(src), plan))
        }
        Reader::Nbd {
            socket,
            export,
            bitmap,
        } => {
            let dirty_ctx = bitmap.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
            let mut contexts = vec!["base:allocation"];
            contexts.extend(dirty_ctx.as_deref());
            let mut client = NbdClient::connect_unix(socket, export, &contexts)?;
            if client.size() < geometry.size {
                return Err(SyncError::Protocol(
                    "the NBD export is smaller than the disk",
                ));
            }
            let alloc = client.block_status("base:allocation", 0, geometry.size)?;
            let span = |flags: fn(u32) -> bool| -> Vec<(u64, u64)> {
                alloc
                    .iter()
                    .filter(|e| flags(e.flags))
                    .map(|e| (e.offset, e.offset + e.length))
                    .collect()
            };
            let data = span(|f| f & nbd::STATE_ZERO == 0);
            let plan = match dirty_ctx.filter(|_| !full) {
                None => ScanPlan::full(&data, geometry),
                Some(ctx) => {
                    let dirty: Vec<(u64, u64)> = client
                        .block_status(&ctx, 0, geometry.size)?
                        .iter()
                        .filter(|e| e.flags & nbd::STATE_DIRTY != 0)
                        .map(|e| (e.offset, e.offset + e.length))
                        .collect();
                    ScanPlan {
                        read: scan::block_ranges(&dirty, geometry),
                        zero: scan::whole_blocks(&span(|f| f & nbd::STATE_ZERO != 0), geometry),
                        outside: Outside::Unchanged,
                        ids: rewind_proto::crypt::ChunkIds::Plain,
                    }
                }
            };
            Ok((Box::new(client), plan))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_answer_with_a_malformed_or_unasked_hash_is_refused() {
        let (a, b, c) = (BlockHash([1; 32]), BlockHash([2; 32]), BlockHash([3; 32]));
        let asked = [a, b];
        let got = missing_answer(&asked, &[b.0.to_vec()]).expect("well-formed");
        assert_eq!(got, HashSet::from([b]));
        for bad in [vec![b.0.to_vec(), vec![7; 31]], vec![c.0.to_vec()]] {
            assert!(matches!(
                missing_answer(&asked, &bad),
                Err(SyncError::Protocol(_))
            ));
        }
    }

    fn item(pos: u32, index: u64, tag: u8, zero: bool) -> Item {
        let leaf = if zero {
            BlockHash::ZERO
        } else {
            BlockHash([tag; 32])
        };
        Item {
            pos,
            change: Change {
                index,
                leaf,
                data: (!zero).then(|| bytes::Bytes::from(vec![tag; 16])),
            },
        }
    }

    #[test]
    fn a_window_splits_into_messages_that_carry_their_own_entries() {
        // Six blocks: two share chunk 1, one is zero, one (tag 9) is held by the receiver.
        let window = vec![
            item(0, 0, 1, false),
            item(0, 1, 2, false),
            item(0, 2, 0, true),
            item(1, 0, 1, false),
            item(1, 1, 9, false),
            item(1, 2, 3, false),
        ];
        let big = MESSAGE_TARGET_BYTES / 2 + 1;
        let frames = vec![
            (0, BlockHash([1; 32]), vec![1; big]),
            (0, BlockHash([2; 32]), vec![2; big]),
            (1, BlockHash([3; 32]), vec![3; 10]),
        ];
        let messages = split_window("s", &window, frames);
        // Per message: (disk, index) of its entries, and the first byte of its chunks.
        type Shape = (Vec<(u32, u64)>, Vec<u8>);
        let shape: Vec<Shape> = messages
            .iter()
            .map(|m| {
                assert_eq!(m.session, "s");
                (
                    m.entries.iter().map(|e| (e.disk, e.index)).collect(),
                    m.chunks.iter().map(|c| c.hash[0]).collect(),
                )
            })
            .collect();
        // Chunks 1 and 2 do not fit one message; 3 fits beside 2. Zero and held entries go
        // first; each chunk's entries go with it.
        assert_eq!(
            shape,
            vec![
                (vec![(0, 0), (0, 2), (1, 0), (1, 1)], vec![1]),
                (vec![(0, 1), (1, 2)], vec![2, 3]),
            ]
        );
        for m in &messages {
            let bytes: usize = m.chunks.iter().map(|c| c.data.len()).sum();
            assert!(m.chunks.len() == 1 || bytes <= MESSAGE_TARGET_BYTES);
        }
    }

    #[test]
    fn a_window_with_nothing_to_send_is_one_message() {
        let window = vec![item(0, 0, 0, true), item(0, 1, 9, false)];
        let messages = split_window("s", &window, Vec::new());
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].entries.len(), 2);
        assert!(messages[0].chunks.is_empty());
    }
}
