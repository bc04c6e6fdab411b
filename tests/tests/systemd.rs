//! The service side: `systemd-analyze verify` accepts the units (with the real binaries in
//! place of /usr/local/bin), and `serve` tells systemd it is ready over `$NOTIFY_SOCKET`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, run, Deployment};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let pairs = [
        ("rewind-receiver.service", "rewind-receiver.service"),
        ("rewind-agent.service", "rewind-agent.service"),
        ("rewind-drill@.service", "rewind-drill@web1.service"),
        ("rewind-drill@.timer", "rewind-drill@web1.timer"),
        ("rewind-verify.service", "rewind-verify.service"),
        ("rewind-verify.timer", "rewind-verify.timer"),
        ("rewind-prune.service", "rewind-prune.service"),
        ("rewind-prune.timer", "rewind-prune.timer"),
    ];
    // Every unit in the folder is checked (a new one must be added above).
    let mut shipped: Vec<String> = std::fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".timer"))
        .collect();
    shipped.sort();
    let mut listed: Vec<String> = pairs.iter().map(|(f, _)| (*f).to_owned()).collect();
    listed.sort();
    assert_eq!(shipped, listed);
    // All units side by side first: a timer is verified together with its service.
    for (file, as_name) in pairs {
        let text = std::fs::read_to_string(units.join(file)).unwrap();
        let text = text
            .replace(
                "/usr/local/bin/rewind-receiver",
                bin("rewind-receiver").to_str().unwrap(),
            )
            .replace(
                "/usr/local/bin/rewind-agent",
                bin("rewind-agent").to_str().unwrap(),
            );
        std::fs::write(dir.path().join(as_name), text).unwrap();
    }
    for (_, as_name) in pairs {
        let path = dir.path().join(as_name);
        let out = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .current_dir(dir.path()));
        let err = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("rewind")).collect();
        assert!(out.status.success() && ours.is_empty(), "{as_name}: {err}");
    }
}

/// The example configuration files parse: `status` reads them (and lists their VMs).
#[test]
fn example_configurations_are_valid() {
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let d = Deployment::new();
    let out = run(Command::new(bin("rewind-agent"))
        .args(["status", "--json", "--config"])
        .arg(units.join("agent.toml.example"))
        .arg("--state")
        .arg(d.path("state")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let vms: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0]["vm"], "db1");
    assert_eq!(vms[0]["rpo_seconds"], 120);
    assert_eq!(vms[1]["vm"], "web1");
    assert_eq!(vms[1]["state"], "seeding");
    // The receiver's example parses (prune reads its retention; --data points at an empty store,
    // which a receiver created; a folder without a catalog is refused).
    let empty = d.path("not-a-store");
    std::fs::create_dir_all(&empty).unwrap();
    let refused = run(Command::new(bin("rewind-receiver"))
        .args(["prune", "--dry-run", "--config"])
        .arg(units.join("receiver.toml.example"))
        .arg("--data")
        .arg(&empty));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("holds no Rewind catalog"));
    assert!(!empty.join("catalog.sqlite").exists(), "nothing created");
    drop(d.serve());
    let rx = run(Command::new(bin("rewind-receiver"))
        .args(["prune", "--dry-run", "--json", "--config"])
        .arg(units.join("receiver.toml.example"))
        .arg("--data")
        .arg(d.data()));
    assert!(
        rx.status.success(),
        "{}",
        String::from_utf8_lossy(&rx.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&rx.stdout).unwrap();
    assert_eq!(v["vms"], serde_json::json!([]));
}

#[test]
fn serve_notifies_readiness() {
    let d = Deployment::new();
    let sock_path = d.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(bin("rewind-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(d.data())
        .arg("--pki")
        .arg(d.pki())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    let n = sock.recv(&mut buf).unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).into_owned();
    // SIGTERM: the receiver says it is stopping, then exits cleanly.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let mut stopping = false;
    for _ in 0..20 {
        let Ok(n) = sock.recv(&mut buf) else { break };
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(first.starts_with("READY=1"), "{first}");
    assert_eq!(second, "WATCHDOG=1");
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    assert!(status.success(), "{status}");
}

/// Under systemd (`$JOURNAL_STREAM` set) logs go to the journal's socket with structured fields,
/// one `cycle committed` entry per cycle, and not to stderr. Skipped where a real journald owns
/// the socket (its traffic is not ours to intercept).
#[test]
fn logs_go_to_the_journal_under_systemd() {
    let socket = std::path::Path::new("/run/systemd/journal/socket");
    if socket.exists() {
        eprintln!("skipped: a journald listens on {}", socket.display());
        return;
    }
    let made_dir = !socket.parent().unwrap().exists();
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let journal = UnixDatagram::bind(socket).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    rewind_tests::disk::create(&vda, 1 << 20);
    rewind_tests::disk::random_blocks(&vda, 65536, 0, 2, &mut rand::rng());
    let out = d
        .sync_cmd(&rx, "host1", "journaled", &[("vda", &vda)], &[])
        .env("JOURNAL_STREAM", "8:12345")
        .env("REWIND_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = journal.recv(&mut buf) {
        entries.push(journal_fields(&buf[..n]));
    }
    drop(journal);
    let _ = std::fs::remove_file(socket);
    if made_dir {
        let _ = std::fs::remove_dir(socket.parent().unwrap());
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cycles: Vec<_> = entries
        .iter()
        .filter(|e| e.get("MESSAGE").map(String::as_str) == Some("cycle committed"))
        .collect();
    assert_eq!(cycles.len(), 1, "{entries:?}");
    let cycle = cycles[0];
    assert_eq!(cycle["F_VM"], "journaled", "{cycle:?}");
    assert_eq!(cycle["F_CHANGED"], "2", "{cycle:?}");
    let point = d.points("journaled")[0]["id"].as_u64().unwrap();
    assert_eq!(cycle["F_POINT"], point.to_string(), "{cycle:?}");
    assert_eq!(cycle["SYSLOG_IDENTIFIER"], "rewind-agent", "{cycle:?}");
    assert!(cycle.contains_key("PRIORITY"), "{cycle:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("cycle committed"),
        "logged to stderr too: {err}"
    );
}

/// The fields of one entry in the journal's native protocol: `NAME=value\n`, or for values that
/// may hold newlines `NAME\n` + little-endian u64 length + value + `\n`.
fn journal_fields(mut b: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    while !b.is_empty() {
        let Some(end) = b.iter().position(|&c| c == b'=' || c == b'\n') else {
            break;
        };
        let name = String::from_utf8_lossy(&b[..end]).into_owned();
        if b[end] == b'=' {
            let rest = &b[end + 1..];
            let stop = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            out.insert(name, String::from_utf8_lossy(&rest[..stop]).into_owned());
            b = &rest[(stop + 1).min(rest.len())..];
        } else {
            let rest = &b[end + 1..];
            if rest.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = &rest[8..8 + len];
            out.insert(name, String::from_utf8_lossy(value).into_owned());
            b = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}
