//! An HTTP proxy in front of an S3 server on loopback that meddles with the requests a test
//! picks: it refuses them as the store would (403 AccessDenied), or passes them and flips one
//! byte in the body of the answer (a store that serves rotten bytes while its metadata is
//! intact). One request per connection (every answer says `Connection: close`); our S3 client
//! simply reconnects. It handles requests with a `Content-Length` body only, as ours are.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meddle {
    Pass,
    Refuse,
    FlipBody,
    /// Answers 501 `NotImplemented`, as Garage answers what it lacks (versions, Object Lock).
    NotImplemented,
}

/// The request line of a request: method and target (path and query).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
}

type Rule = dyn Fn(&Request) -> Meddle + Send + Sync;

/// A running proxy; stopped when dropped.
pub struct S3Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Every request seen, with what was done to it, in order.
    pub seen: Arc<Mutex<Vec<(Request, Meddle)>>>,
}

impl S3Proxy {
    /// Listens on a free loopback port and forwards to `upstream`, meddling as `rule` says.
    pub fn start(
        upstream: SocketAddr,
        rule: impl Fn(&Request) -> Meddle + Send + Sync + 'static,
    ) -> S3Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<Rule> = Arc::new(rule);
        let (s, log) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (rule, log) = (rule.clone(), log.clone());
                        std::thread::spawn(move || {
                            if let Err(e) = one(conn, upstream, &*rule, &log) {
                                eprintln!("s3 proxy: {e}");
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        S3Proxy {
            addr,
            stop,
            thread: Some(thread),
            seen,
        }
    }

    /// The endpoint URL to give the receiver instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen so far, in order: method and target.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.seen
            .lock()
            .expect("log")
            .iter()
            .map(|(r, _)| (r.method.clone(), r.target.clone()))
            .collect()
    }

    /// How many requests were met with `m`.
    pub fn count(&self, m: Meddle) -> usize {
        self.seen
            .lock()
            .expect("log")
            .iter()
            .filter(|(_, d)| *d == m)
            .count()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request's head (up to the blank line) and its body.
fn read_request(conn: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::Error::other("the client closed mid-request"));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(Ok(0), |v| v.trim().parse::<usize>())
        .map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok((head, body))
}

/// The head with any `Connection` header replaced by `Connection: close`.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn one(
    mut conn: TcpStream,
    upstream: SocketAddr,
    rule: &Rule,
    log: &Mutex<Vec<(Request, Meddle)>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let (head, body) = read_request(&mut conn)?;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let request = Request {
        method: parts.next().unwrap_or_default().to_owned(),
        target: parts.next().unwrap_or_default().to_owned(),
    };
    let meddle = rule(&request);
    log.lock().expect("log").push((request, meddle));
    let refusal = match meddle {
        Meddle::Refuse => Some(("403 Forbidden", "AccessDenied")),
        Meddle::NotImplemented => Some(("501 Not Implemented", "NotImplemented")),
        _ => None,
    };
    if let Some((status, code)) = refusal {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
             <Message>refused by the test proxy</Message></Error>"
        );
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{xml}",
            xml.len()
        );
        conn.write_all(answer.as_bytes())?;
        return conn.shutdown(Shutdown::Both);
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&closing(&head))?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    if meddle == Meddle::FlipBody {
        if let Some(start) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = &mut answer[start + 4..];
            if !body.is_empty() {
                let mid = body.len() / 2;
                body[mid] ^= 0x01;
            }
        }
    }
    conn.write_all(&answer)?;
    conn.shutdown(Shutdown::Both)
}
