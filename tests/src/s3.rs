//! A real S3 server for tests: `moto_server` on loopback (it enforces conditional writes and
//! Object Lock), with a bucket made by a plain HTTP request.

use crate::{bin, disk, Deployment, Receiver};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running moto_server; killed when dropped.
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

/// Whether `moto_server` can be run here.
pub fn available() -> bool {
    Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Moto {
    /// Starts a server on a loopback port of its own choosing (its log in `dir/moto.log`)
    /// and waits until it says where it listens. The server binds port 0 itself: a port
    /// picked here and handed over could be taken by another test's process in between, and
    /// the probe would then reach that process while this server failed to start.
    pub fn start(dir: &Path) -> Moto {
        let path = dir.join("moto.log");
        let log = std::fs::File::create(&path).expect("moto log");
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited ({status}) before listening: {text}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // It binds before it says so; a refused connection here is a real fault.
        TcpStream::connect(addr).expect("connect to moto_server where it said it listens");
        Moto { child, addr }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The endpoint URL for the receiver.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates bucket `name` (with Object Lock enabled when `lock`).
    pub fn bucket(&self, name: &str, lock: bool) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-f", "-X", "PUT"]);
        if lock {
            cmd.args(["-H", "x-amz-bucket-object-lock-enabled: true"]);
        }
        let out = cmd
            .arg(format!("{}/{name}", self.endpoint()))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "create bucket {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Overwrites object `key` with the bytes of `file`, behind the receiver's back (a plain
    /// PUT, as a store fault or an intruder would).
    pub fn overwrite(&self, bucket: &str, key: &str, file: &Path) {
        let path = file.to_string_lossy();
        self.boto3(
            "s3.put_object(Bucket=sys.argv[2], Key=sys.argv[3], Body=open(sys.argv[4], \"rb\").read())",
            &[bucket, key, &path],
        );
    }

    /// The object keys of bucket `name` under `prefix` (a plain listing request).
    pub fn keys(&self, name: &str, prefix: &str) -> Vec<String> {
        self.listed(&format!("{name}?list-type=2&prefix={prefix}"), "Key")
    }

    /// The keys of every version and delete marker in bucket `name` under `prefix`, one per
    /// entry (a plain version listing request).
    pub fn versions(&self, name: &str, prefix: &str) -> Vec<String> {
        self.listed(&format!("{name}?versions&prefix={prefix}"), "Key")
    }

    /// Tries to delete every version of object `key` with the receiver's keys (signed
    /// requests through boto3, as a thief holding those keys would); returns each try's
    /// outcome: `deleted`, or the store's error code.
    pub fn delete_versions(&self, bucket: &str, key: &str) -> Vec<String> {
        let out = self.boto3(
            r#"
vs = s3.list_object_versions(Bucket=sys.argv[2], Prefix=sys.argv[3]).get("Versions", [])
for v in vs:
    try:
        s3.delete_object(Bucket=sys.argv[2], Key=v["Key"], VersionId=v["VersionId"])
        print("deleted")
    except Exception as e:
        print(getattr(e, "response", {}).get("Error", {}).get("Code", str(e)))
"#,
            &[bucket, key],
        );
        out.lines().map(str::to_owned).collect()
    }

    /// Runs `code` in Python with `s3`, a boto3 client holding the receiver's keys, and
    /// `sys.argv[1]` the endpoint followed by `args`; returns what it printed.
    fn boto3(&self, code: &str, args: &[&str]) -> String {
        let script = format!(
            "import boto3, sys\ns3 = boto3.client(\"s3\", endpoint_url=sys.argv[1], \
             aws_access_key_id=\"rewind-test\", aws_secret_access_key=\"rewind-test-secret\", \
             region_name=\"us-east-1\")\n{code}\n"
        );
        let out = Command::new("timeout")
            .args(["60", "python3", "-c", &script, &self.endpoint()])
            .args(args)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ids of the multipart uploads open in bucket `name` (a plain listing request).
    pub fn uploads(&self, name: &str) -> Vec<String> {
        self.listed(&format!("{name}?uploads"), "UploadId")
    }

    /// The texts of the `tag` elements of the answer to a plain GET of `query`.
    fn listed(&self, query: &str, tag: &str) -> Vec<String> {
        let out = Command::new("curl")
            .args(["-sS", "-f"])
            .arg(format!("{}/{query}", self.endpoint()))
            .output()
            .expect("run curl");
        assert!(out.status.success(), "GET {query}");
        let text = String::from_utf8_lossy(&out.stdout);
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        text.split(open.as_str())
            .skip(1)
            .filter_map(|s| s.split(close.as_str()).next())
            .map(str::to_owned)
            .collect()
    }

    /// Deletes object `key` with the receiver's keys and no version (a signed request through
    /// boto3, as a thief holding those keys would): on a versioned bucket this puts a delete
    /// marker over it, which Object Lock allows, and plain reads then miss the object.
    pub fn delete_plain(&self, bucket: &str, key: &str) {
        self.boto3(
            "s3.delete_object(Bucket=sys.argv[2], Key=sys.argv[3])",
            &[bucket, key],
        );
    }

    /// The environment a receiver command needs to reach the server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "rewind-test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "rewind-test-secret".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of the first "Running on http://127.0.0.1:PORT" line of a moto_server log.
fn listening_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|l| l.split("Running on http://127.0.0.1:").nth(1))
        .and_then(|rest| {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..digits].parse().ok()
        })
}

/// The variables a receiver command needs to reach the S3 server.
pub type Env = Vec<(&'static str, String)>;

/// A deployment and a moto_server with bucket `rewind`; None (skipped) without moto_server.
pub fn with_moto() -> Option<(Deployment, Moto, Env)> {
    if !available() {
        eprintln!("moto_server is not installed: skipped (the test command installs it)");
        return None;
    }
    let d = Deployment::new();
    let moto = Moto::start(d.dir.path());
    moto.bucket("rewind", false);
    let env = moto.env();
    Some((d, moto, env))
}

/// `verify --json EXTRA`: whether it succeeded, and its report.
pub fn verify_json(
    d: &Deployment,
    env: &[(&'static str, String)],
    extra: &[&str],
) -> (bool, serde_json::Value) {
    let mut args = vec!["verify", "--json"];
    args.extend_from_slice(extra);
    let o = receiver(d, env, &args);
    let report = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no report ({e}): {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.success(), report)
}

/// `serve --store URL` with the server's environment, reaching it at `endpoint`.
pub fn serve(d: &Deployment, url: &str, env: &[(&'static str, String)]) -> Receiver {
    serve_at(d, url, env, "127.0.0.1:0")
}

/// [`serve`] listening on `listen` (a receiver started again where its agents and copies
/// reach it).
pub fn serve_at(
    d: &Deployment,
    url: &str,
    env: &[(&'static str, String)],
    listen: &str,
) -> Receiver {
    let mut cmd = Command::new(bin("rewind-receiver"));
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    Receiver::start_via(cmd, &d.data(), &d.pki(), listen, &["--store", url])
}

/// `rewind-receiver ARGS --data DATA` with the server's environment.
pub fn receiver(d: &Deployment, env: &[(&'static str, String)], args: &[&str]) -> Output {
    crate::run(
        Command::new(bin("rewind-receiver"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(args)
            .arg("--data")
            .arg(d.data()),
    )
}

/// Restores `disk` of `point` and returns its digest.
pub fn restored(d: &Deployment, env: &[(&'static str, String)], point: u64) -> disk::Digest {
    let out = d.path(&format!("restored-{point}.raw"));
    let o = crate::run(
        Command::new(bin("rewind-receiver"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["restore", "--vm", "vm1", "--disk", "vda", "--point"])
            .arg(point.to_string())
            .arg("--data")
            .arg(d.data())
            .arg("--out")
            .arg(&out),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = disk::digest(&out);
    std::fs::remove_file(&out).expect("remove the restored image");
    digest
}

pub fn empty_cache(d: &Deployment) {
    let cache = d.data().join("object-cache/packs");
    for e in std::fs::read_dir(&cache).expect("the cache folder") {
        std::fs::remove_file(e.expect("a cache entry").path()).expect("remove a cached pack");
    }
}

pub fn copy_digest(d: &Deployment, src: &Path, name: &str) -> disk::Digest {
    let copy = d.path(name);
    std::fs::copy(src, &copy).expect("copy the disk");
    disk::digest(&copy)
}

/// Seeds `vda` as agent `host1`, VM `vm1`, and runs `fault` as soon as `published()` sees the
/// seed's first pack object in the bucket; then, when the seed failed (its error must contain
/// `expected`), syncs again, which must send fewer than `chunks` chunks (what was durable is
/// not sent again). Returns the report of the sync that made the point.
pub fn seed_through_fault(
    d: &Deployment,
    rx: &Receiver,
    (vda, chunks): (&Path, u64),
    published: impl Fn() -> bool,
    fault: impl FnOnce(),
    expected: &str,
) -> serde_json::Value {
    let first = std::thread::scope(|s| {
        let sync = s.spawn(|| d.sync(rx, "host1", "vm1", &[("vda", vda)], &[]));
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !published() {
            assert!(
                !sync.is_finished(),
                "the seed ended before its first pack went up"
            );
            assert!(std::time::Instant::now() < deadline, "no pack went up");
            std::thread::sleep(Duration::from_millis(20));
        }
        fault();
        sync.join().expect("the seed's thread")
    });
    if first.status.success() {
        return crate::sync_report(&first);
    }
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains(expected), "{err}");
    assert!(d.points("vm1").is_empty());
    let again = crate::sync_report(&d.sync(rx, "host1", "vm1", &[("vda", vda)], &[]));
    let sent = again["disks"][0]["sent_chunks"]
        .as_u64()
        .expect("sent_chunks");
    assert!(sent < chunks, "{again}");
    again
}
