//! A real Garage cluster for tests: three `garage server` processes on loopback (replication
//! factor 3, SQLite metadata, region [`REGION`]), one layout and one access key, driven through
//! the `garage` command line. Nodes can be killed and restarted to test a store that loses a
//! replica.
//!
//! Garage resolves keys and buckets from each node's local copy of its tables, so a node may
//! answer `NoSuchBucket` for a moment after a bucket was made elsewhere (seconds when it was
//! down at the time): [`Garage::bucket`] and [`Garage::restart`] wait until every running node
//! serves every bucket (signed requests sent by `python3`).
//!
//! Garage 2.5 ignores `If-None-Match` and `If-Match` on PUT (a second create-only PUT of a key
//! succeeds and replaces the object), and has neither Object Lock nor versioning (501
//! `NotImplemented`). It keeps and returns `x-amz-checksum-sha256`.

use serde_json::Value;
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The S3 region the cluster answers to; requests signed for any other are refused (HTTP 400
/// `AuthorizationHeaderMalformed`).
pub const REGION: &str = "garage";

/// Where the test setup installs Garage (`cargo install garage --locked --root
/// /var/cache/rewind-tests/garage`).
const DEFAULT_BINARY: &str = "/var/cache/rewind-tests/garage/bin/garage";
/// Nodes in the cluster (one replica of everything on each).
const NODES: usize = 3;
/// Longest wait for a node or the cluster to reach the state asked for.
const DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(50);
/// Environment variables the `garage` binary reads, removed so only the config file counts.
const GARAGE_ENV: &[&str] = &[
    "GARAGE_CONFIG_FILE",
    "GARAGE_RPC_HOST",
    "GARAGE_RPC_SECRET",
    "GARAGE_RPC_SECRET_FILE",
    "GARAGE_ADMIN_TOKEN",
    "GARAGE_ADMIN_TOKEN_FILE",
    "GARAGE_METRICS_TOKEN",
    "GARAGE_METRICS_TOKEN_FILE",
    "GARAGE_ALLOW_WORLD_READABLE_SECRETS",
    "GARAGE_LOG_TO_SYSLOG",
    "GARAGE_LOG_TO_JOURNALD",
    "RUST_LOG",
];

/// One S3 request signed with SigV4 (header auth, Python standard library only). Arguments:
/// METHOD ENDPOINT REGION KEY_ID SECRET BUCKET KEY BODY_FILE|- [NAME VALUE]... (query). Prints
/// the HTTP status on the first line, then the body.
const SIGNED_REQUEST: &str = r#"
import sys, hmac, hashlib, datetime, urllib.request, urllib.parse, urllib.error
method, endpoint, region, kid, sec, bucket, key, bodyfile, *qs = sys.argv[1:]
body = open(bodyfile, "rb").read() if bodyfile != "-" else b""
enc = lambda s, safe: urllib.parse.quote(s, safe=safe)
path = "/" + enc(bucket, "") + ("/" + enc(key, "/-_.~") if key else "")
query = "&".join(sorted(f"{enc(k, '-_.~')}={enc(v, '-_.~')}" for k, v in zip(qs[::2], qs[1::2])))
now = datetime.datetime.now(datetime.timezone.utc)
amzdate, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
digest = hashlib.sha256(body).hexdigest()
h = {"host": urllib.parse.urlsplit(endpoint).netloc, "x-amz-content-sha256": digest,
     "x-amz-date": amzdate}
names = ";".join(sorted(h))
canonical = "\n".join([method, path, query, "".join(f"{k}:{h[k]}\n" for k in sorted(h)), names,
                       digest])
scope = f"{day}/{region}/s3/aws4_request"
to_sign = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope,
                     hashlib.sha256(canonical.encode()).hexdigest()])
k = ("AWS4" + sec).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={kid}/{scope}, SignedHeaders={names}, "
                      f"Signature={sig}")
url = endpoint.rstrip("/") + path + ("?" + query if query else "")
req = urllib.request.Request(url, data=body if method == "PUT" else None, method=method, headers=h)
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        status, out = r.status, r.read()
except urllib.error.HTTPError as e:
    status, out = e.code, e.read()
sys.stdout.write(f"{status}\n")
sys.stdout.flush()
sys.stdout.buffer.write(out)
"#;

/// The `garage` binary: `$REWIND_GARAGE` when set, else the one the test setup installs, if
/// it is there.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REWIND_GARAGE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(DEFAULT_BINARY);
    p.exists().then(|| p.to_owned())
}

/// One node: its folder (config, `meta/`, `data/`, `garage.log`), addresses and process.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    /// Full node id (public key, hex).
    id: String,
    rpc: SocketAddr,
    s3: SocketAddr,
    /// Running server; `None` while killed.
    child: Option<Child>,
}

/// A running three-node cluster with a layout applied and one access key; every node is
/// killed when dropped.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// The access key's id (`GK...`).
    pub key_id: String,
    /// The access key's secret (64 hex digits).
    pub secret: String,
}

/// `n` distinct loopback ports free at the time of the call.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("port").port())
        .collect()
}

/// 32 random bytes in hex (an `rpc_secret` or a token).
fn random_hex() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `s` as a TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Polls `cond` every [`POLL`] until it holds; panics with `what` after [`DEADLINE`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "garage: timed out waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

impl Garage {
    /// Starts three nodes, each in its own folder `dir/garageN` (config, metadata, data and
    /// `garage.log`) on free loopback ports; connects them, applies a layout (zone `dc1`, 1 GB
    /// each), waits until every node sees the three up, and creates the access key.
    pub fn start(dir: &Path) -> Garage {
        Self::start_with(dir, "")
    }

    /// [`Garage::start`] with `extra` lines at the top of each node's configuration (settings
    /// such as `compression_level`).
    pub fn start_with(dir: &Path, extra: &str) -> Garage {
        let bin = binary().expect("no garage binary: set REWIND_GARAGE or install it");
        let rpc_secret = random_hex();
        let admin_token = random_hex();
        let ports = free_ports(3 * NODES);
        let mut garage = Garage {
            bin,
            nodes: Vec::new(),
            key_id: String::new(),
            secret: String::new(),
        };
        for (i, p) in ports.chunks(3).enumerate() {
            let node_dir = dir.join(format!("garage{i}"));
            for sub in ["meta", "data"] {
                std::fs::create_dir_all(node_dir.join(sub)).expect("garage node folder");
            }
            let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
            let (rpc, s3, admin) = (addr(p[0]), addr(p[1]), addr(p[2]));
            let meta = node_dir.join("meta");
            let data = node_dir.join("data");
            let text = format!(
                "{extra}\n\
                 metadata_dir = {}\n\
                 data_dir = {}\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = {NODES}\n\
                 rpc_bind_addr = \"{rpc}\"\n\
                 rpc_public_addr = \"{rpc}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"{s3}\"\n\n\
                 [admin]\n\
                 api_bind_addr = \"{admin}\"\n\
                 admin_token = \"{admin_token}\"\n",
                toml_str(&meta.to_string_lossy()),
                toml_str(&data.to_string_lossy()),
            );
            let config = node_dir.join("garage.toml");
            std::fs::write(&config, text).expect("write garage.toml");
            garage.nodes.push(Node {
                dir: node_dir,
                config,
                id: String::new(),
                rpc,
                s3,
                child: None,
            });
            garage.spawn(i);
        }
        for i in 0..NODES {
            garage.wait_rpc(i);
        }
        for i in 0..NODES {
            for j in (0..NODES).filter(|&j| j != i) {
                garage.connect(i, j);
            }
        }
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        assign.extend(garage.nodes.iter().map(|n| n.id.as_str()));
        garage.ok(0, &assign);
        garage.ok(0, &["layout", "apply", "--version", "1"]);
        garage.wait_cluster();
        let key = garage.json(0, "CreateKey", r#"{"name":"rewind-test"}"#);
        let field = |k: &str| {
            key[k]
                .as_str()
                .unwrap_or_else(|| panic!("garage CreateKey: no {k} in {key}"))
                .to_owned()
        };
        garage.key_id = field("accessKeyId");
        garage.secret = field("secretAccessKey");
        garage
    }

    /// Creates bucket `name`, allows the access key to read, write and own it, and waits until
    /// every running node serves it.
    pub fn bucket(&self, name: &str) {
        self.ok(0, &["bucket", "create", name]);
        self.ok(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                name,
                "--key",
                &self.key_id,
            ],
        );
        for i in self.running() {
            self.wait_serves(i, name);
        }
    }

    /// Node 0's S3 endpoint URL.
    /// The process ids of the nodes running.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// Node `i`'s S3 endpoint URL.
    pub fn endpoint_of(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].s3)
    }

    /// The environment a receiver command needs to reach the cluster through node 0.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_of(0)
    }

    /// The environment a receiver command needs to reach the cluster through node `i` (path-style
    /// requests are the receiver's default).
    pub fn env_of(&self, i: usize) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint_of(i)),
            ("AWS_ENDPOINT_URL_S3", self.endpoint_of(i)),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.to_owned()),
        ]
    }

    /// Kills node `i` with SIGKILL (a crash). The others notice only when they next send to it
    /// (a ping every 15 s at worst): meanwhile writes still succeed, two of three nodes being a
    /// quorum, but the first may stall for seconds. See [`Garage::wait_down`].
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("garage node {i} is not running"));
        child.kill().expect("kill garage node");
        child.wait().expect("reap garage node");
    }

    /// Waits until every running node sees node `i` down (about ten seconds after a kill).
    pub fn wait_down(&self, i: usize) {
        assert!(!self.is_running(i), "garage node {i} is running");
        for j in self.running() {
            wait_for(&format!("node {j} to see node {i} down"), || {
                // A call to every node: sending on the dead connection shows it closed.
                let _ = self.cli(
                    j,
                    &["json-api", "GetNodeInfo", r#"{"node":"*","body":null}"#],
                );
                self.try_json(j, "GetClusterStatus", "null")
                    .and_then(|s| s["nodes"].as_array().cloned())
                    .is_some_and(|nodes| {
                        nodes
                            .iter()
                            .any(|n| n["id"] == self.nodes[i].id.as_str() && n["isUp"] == false)
                    })
            });
        }
    }

    /// Starts killed node `i` again with the same configuration, folders and ports once the
    /// others saw it down ([`Garage::wait_down`]: they would keep a dead connection to it),
    /// reconnects it with the running nodes, and waits until they all see each other and it
    /// serves every bucket (when two nodes run: a bucket made while it was down reaches it
    /// within seconds).
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "garage node {i} is already running"
        );
        self.wait_down(i);
        self.spawn(i);
        self.wait_rpc(i);
        for j in self.running().filter(|&j| j != i) {
            self.connect(i, j);
            self.connect(j, i);
        }
        self.wait_cluster();
        if self.running().count() >= 2 {
            let source = self.running().find(|&j| j != i).unwrap_or(i);
            for name in self.bucket_names(source) {
                self.wait_serves(i, &name);
            }
        }
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Node `i`'s log file.
    pub fn log_of(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("garage.log")
    }

    /// The object keys of bucket `name` under `prefix` (a signed listing through node 0).
    pub fn keys(&self, name: &str, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .signed(
                0,
                "GET",
                name,
                "",
                None,
                &[("list-type", "2"), ("prefix", prefix)],
            )
            .unwrap_or_else(|e| panic!("list {name}: {e}"));
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "list {name}: {text}");
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// Overwrites object `key` with the bytes of `file`, behind the receiver's back (a plain
    /// signed PUT through node 0, as a store fault or an intruder would).
    pub fn overwrite(&self, bucket: &str, key: &str, file: &Path) {
        let (status, body) = self
            .signed(0, "PUT", bucket, key, Some(file), &[])
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        assert_eq!(status, 200, "put {key}: {}", String::from_utf8_lossy(&body));
    }

    /// Starts node `i`'s server, its output appended to its log.
    fn spawn(&mut self, i: usize) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_of(i))
            .expect("garage log");
        let mut cmd = Command::new(&self.bin);
        for v in GARAGE_ENV {
            cmd.env_remove(v);
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .arg("-c")
            .arg(&self.nodes[i].config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` answers on its RPC port, and records its id.
    fn wait_rpc(&mut self, i: usize) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let exited = self.nodes[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "garage node {i} exited ({status}); see {}",
                    self.log_of(i).display()
                );
            }
            if self
                .cli(i, &["json-api", "GetClusterHealth"])
                .status
                .success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "garage node {i} did not start; see {}",
                self.log_of(i).display()
            );
            std::thread::sleep(POLL);
        }
        let out = self.ok(i, &["node", "id", "-q"]);
        let line = String::from_utf8_lossy(&out.stdout);
        self.nodes[i].id = line
            .trim()
            .split('@')
            .next()
            .filter(|id| id.len() == 64)
            .unwrap_or_else(|| panic!("garage node id: {line:?}"))
            .to_owned();
    }

    /// Has node `from` open a connection to node `to`.
    fn connect(&self, from: usize, to: usize) {
        let target = format!("{}@{}", self.nodes[to].id, self.nodes[to].rpc);
        self.ok(from, &["node", "connect", &target]);
    }

    /// The nodes that run.
    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..NODES).filter(|&i| self.is_running(i))
    }

    /// Waits until every running node has the layout and sees every running node up.
    fn wait_cluster(&self) {
        let running: Vec<usize> = self.running().collect();
        for &i in &running {
            wait_for(&format!("node {i} to see the running nodes up"), || {
                let Some(status) = self.try_json(i, "GetClusterStatus", "null") else {
                    return false;
                };
                let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
                status["layoutVersion"].as_u64() >= Some(1)
                    && running.iter().all(|&j| {
                        nodes.iter().any(|n| {
                            n["id"] == self.nodes[j].id.as_str()
                                && n["isUp"] == true
                                && n["role"].is_object()
                        })
                    })
            });
        }
    }

    /// Global aliases of every bucket, as node `i` lists them.
    fn bucket_names(&self, i: usize) -> Vec<String> {
        let list = self.json(i, "ListBuckets", "{}");
        list.as_array()
            .into_iter()
            .flatten()
            .flat_map(|b| b["globalAliases"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until node `i` lists bucket `name` for the access key.
    fn wait_serves(&self, i: usize, name: &str) {
        wait_for(&format!("node {i} to serve bucket {name}"), || {
            self.signed(
                i,
                "GET",
                name,
                "",
                None,
                &[("list-type", "2"), ("max-keys", "1")],
            )
            .is_ok_and(|(status, _)| status == 200)
        });
    }

    /// One signed S3 request to node `i`: HTTP status and body, or why none came.
    fn signed(
        &self,
        i: usize,
        method: &str,
        bucket: &str,
        key: &str,
        body: Option<&Path>,
        query: &[(&str, &str)],
    ) -> Result<(u16, Vec<u8>), String> {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", SIGNED_REQUEST, method, &self.endpoint_of(i), REGION])
            .args([self.key_id.as_str(), self.secret.as_str(), bucket, key]);
        match body {
            Some(f) => cmd.arg(f),
            None => cmd.arg("-"),
        };
        for (k, v) in query {
            cmd.args([k, v]);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run python3: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = out.stdout;
        let nl = text
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no status line")?;
        let status = std::str::from_utf8(&text[..nl])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad status line")?;
        Ok((status, text[nl + 1..].to_vec()))
    }

    /// `garage -c CONFIG ARGS` for node `i` (the CLI talks to that node over RPC).
    fn cli(&self, i: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        for v in GARAGE_ENV {
            cmd.env_remove(v);
        }
        cmd.arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()))
    }

    /// Like [`Garage::cli`], but panics unless it succeeded.
    fn ok(&self, i: usize, args: &[&str]) -> Output {
        let out = self.cli(i, args);
        assert!(
            out.status.success(),
            "garage {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The answer of admin call `call` with JSON `payload` on node `i`, if it gave one.
    fn try_json(&self, i: usize, call: &str, payload: &str) -> Option<Value> {
        let out = self.cli(i, &["json-api", call, payload]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Like [`Garage::try_json`], but panics without an answer.
    fn json(&self, i: usize, call: &str, payload: &str) -> Value {
        let out = self.ok(i, &["json-api", call, payload]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("garage json-api {call}: {e}"))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
