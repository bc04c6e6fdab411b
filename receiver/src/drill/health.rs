//! Application checks in the booted guest: each check's command runs through qemu-ga
//! ([`crate::guest_agent`]), retried until it passes or its timeout passes, in order, stopping at
//! the first that fails.

use super::checks::{Check, CheckReport};
use super::tail;
use crate::guest_agent::{AgentError, Exited, GuestAgent};
use rewind_proto::report::chain;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of the end of each of a check's stdout and stderr kept in the report.
const OUTPUT_TAIL: usize = 1024;
/// Between the starts of two attempts of a check that has not passed yet.
const CHECK_RETRY: Duration = Duration::from_secs(1);
/// Between two questions whether a check's command has exited.
const EXEC_POLL: Duration = Duration::from_millis(200);

/// Runs `checks` in order through the guest agent on `sock`, each retried until it passes or its
/// timeout (default `default_timeout`) passes, and stops at the first that fails. Returns every
/// check's report (those after a failure stay "not run") and the seconds from `started` until
/// all passed, or the failed check's reason.
pub(super) fn run_checks(
    sock: &Path,
    checks: &[Check],
    default_timeout: Duration,
    started: Instant,
    cancel: &Arc<AtomicBool>,
) -> (Vec<CheckReport>, Result<f64, String>) {
    let mut reports: Vec<CheckReport> = checks.iter().map(CheckReport::not_run).collect();
    let mut agent = None;
    for (check, report) in checks.iter().zip(reports.iter_mut()) {
        let began = Instant::now();
        let timeout = check.timeout.unwrap_or(default_timeout);
        *report = run_check(&mut agent, sock, check, timeout, started, cancel);
        if !report.passed {
            let reason = format!(
                "check {:?} failed ({} attempt(s) in {:.0} s): {}",
                report.name,
                report.attempts,
                began.elapsed().as_secs_f64(),
                report.problem.as_deref().unwrap_or("unknown")
            );
            return (reports, Err(reason));
        }
    }
    (reports, Ok(started.elapsed().as_secs_f64()))
}

/// Tries one check about once a second until it passes, `timeout` passes, the guest breaks the
/// protocol or the drill is cancelled. The agent connection is made on first use and kept.
fn run_check(
    agent: &mut Option<GuestAgent>,
    sock: &Path,
    check: &Check,
    timeout: Duration,
    started: Instant,
    cancel: &Arc<AtomicBool>,
) -> CheckReport {
    // u32::MAX seconds (136 years) is as good as no limit, and the clock can add it.
    let deadline = Instant::now() + timeout.min(Duration::from_secs(u32::MAX.into()));
    let mut report = CheckReport::not_run(check);
    loop {
        let attempt_began = Instant::now();
        report.attempts += 1;
        match attempt(agent, sock, check, deadline, cancel) {
            Ok(out) => {
                report.exit_code = out.exit_code;
                report.stdout = tail(&out.stdout, OUTPUT_TAIL);
                report.stderr = tail(&out.stderr, OUTPUT_TAIL);
                report.problem = check.judge(&out);
                if report.problem.is_none() {
                    report.passed = true;
                    report.passed_seconds = Some(started.elapsed().as_secs_f64());
                    return report;
                }
            }
            Err(e) => {
                report.problem = Some(chain(&e));
                if e.is_final() {
                    return report;
                }
            }
        }
        let next = (attempt_began + CHECK_RETRY).max(Instant::now());
        if next >= deadline {
            return report;
        }
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if cancel.load(Ordering::Relaxed) {
                report.problem = Some(AgentError::Cancelled.to_string());
                return report;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// One run of a check's command (connecting to the agent first if need be).
fn attempt(
    agent: &mut Option<GuestAgent>,
    sock: &Path,
    check: &Check,
    deadline: Instant,
    cancel: &Arc<AtomicBool>,
) -> Result<Exited, AgentError> {
    let connected = match agent.take() {
        Some(a) => a,
        None => GuestAgent::connect(sock, deadline, Some(cancel.clone()))?,
    };
    agent
        .insert(connected)
        .run(&check.program, &check.args, EXEC_POLL, deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::boot::QGA_SOCKET;
    use crate::drill::checks::ChecksFile;
    use crate::guest_agent::fake::{self, Fake, Run};
    use crate::guest_agent::MAX_REPLY;
    use std::path::PathBuf;

    fn exits(code: i64, stdout: &'static [u8]) -> Run {
        Run::Exits {
            code,
            stdout,
            stderr: b"",
        }
    }

    /// A socket in a fresh folder where `fake` answers the first connection.
    fn agent_socket(f: Fake) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(QGA_SOCKET);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                fake::serve(f, stream);
            }
        });
        (dir, path)
    }

    fn check(text: &str) -> Check {
        let file: ChecksFile = toml::from_str(text).expect("valid");
        Check::parse(file.check.first().expect("one check")).expect("valid")
    }

    fn run(sock: &Path, checks: &[Check]) -> (Vec<CheckReport>, Result<f64, String>) {
        let cancel = Arc::new(AtomicBool::new(false));
        run_checks(
            sock,
            checks,
            Duration::from_secs(10),
            Instant::now(),
            &cancel,
        )
    }

    #[test]
    fn checks_pass_after_retries_in_order() {
        let (_dir, sock) = agent_socket(Fake {
            ignore_syncs: 1,
            runs: vec![exits(1, b"starting\n"), exits(0, b"running\n")],
            polls_running: 1,
            ..Fake::default()
        });
        let checks = [
            check("[[check]]\nname = \"up\"\ncommand = [\"systemctl\", \"is-system-running\"]\nexpect_output = \"^running$\""),
            Check::shell("true").expect("valid"),
        ];
        let started = Instant::now();
        let (reports, healthy) = run(&sock, &checks);
        let healthy = healthy.expect("healthy");
        assert_eq!(reports.len(), 2);
        let up = &reports[0];
        assert!(up.passed && up.problem.is_none(), "{up:?}");
        assert_eq!(up.attempts, 2, "retried once: the system was starting");
        assert_eq!(up.exit_code, Some(0));
        assert_eq!(up.stdout, "running\n");
        assert_eq!(up.command, ["systemctl", "is-system-running"]);
        let second = &reports[1];
        assert!(second.passed && second.attempts == 1, "{second:?}");
        assert_eq!(second.command, ["/bin/sh", "-c", "true"]);
        let (p1, p2) = (
            up.passed_seconds.expect("passed"),
            second.passed_seconds.expect("passed"),
        );
        assert!(p1 <= p2 && p2 <= healthy, "{p1} {p2} {healthy}");
        assert!(healthy <= started.elapsed().as_secs_f64());
    }

    #[test]
    fn a_failing_check_fails_the_rest_unrun_and_names_why() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![
                exits(0, b"ok\n"),
                exits(0, b"*** in database main ***\nerror\n"),
            ],
            ..Fake::default()
        });
        let checks = [
            check("[[check]]\nname = \"first\"\ncommand = [\"true\"]"),
            check("[[check]]\nname = \"database\"\ncommand = [\"sqlite3\"]\nexpect_output = \"^ok$\"\ntimeout = 2"),
            check("[[check]]\nname = \"third\"\ncommand = [\"true\"]"),
        ];
        let began = Instant::now();
        let (reports, healthy) = run(&sock, &checks);
        let reason = healthy.expect_err("fails");
        assert!(began.elapsed() < Duration::from_secs(5), "its own timeout");
        assert!(
            reason.starts_with("check \"database\" failed (2 attempt(s) in ")
                && reason.contains(" s): expected exit 0 and stdout matching \"^ok$\", got exit 0 and stdout not matching; stdout ends"),
            "{reason}"
        );
        assert!(reports[0].passed);
        assert!(!reports[1].passed && reports[1].passed_seconds.is_none());
        assert_eq!(reports[1].stdout, "*** in database main ***\nerror\n");
        assert_eq!(reports[2].attempts, 0);
        assert_eq!(reports[2].problem.as_deref(), Some("not run"));
    }

    #[test]
    fn a_wrong_exit_code_or_a_signal_fails() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![exits(3, b""), Run::Signal(9)],
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"svc\"\ncommand = [\"svc\"]\ntimeout = 2");
        let (reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("fails");
        assert!(reason.contains("got killed by signal 9"), "{reason}");
        assert_eq!(reports[0].exit_code, None, "the last run ended by a signal");
        assert_eq!(reports[0].attempts, 2);
    }

    #[test]
    fn a_command_that_never_exits_times_out() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![Run::Never],
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"hang\"\ncommand = [\"sleep\", \"inf\"]\ntimeout = 1");
        let began = Instant::now();
        let (reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("times out");
        assert!(began.elapsed() < Duration::from_secs(3));
        assert!(reason.contains("had not exited after"), "{reason}");
        assert_eq!(reports[0].exit_code, None);
    }

    #[test]
    fn an_agent_that_never_answers_times_out_by_the_checks_timeout() {
        let (_dir, sock) = agent_socket(Fake {
            ignore_syncs: usize::MAX,
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"db\"\ncommand = [\"x\"]\ntimeout = 2");
        let (_reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("no agent");
        assert!(
            reason.starts_with("check \"db\" failed (")
                && reason.ends_with("the guest agent did not answer within 2 s"),
            "{reason}"
        );
    }

    #[test]
    fn a_missing_channel_fails_without_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = check("[[check]]\ncommand = [\"x\"]\ntimeout = 1");
        let (_reports, healthy) = run(&dir.path().join(QGA_SOCKET), &[c]);
        let reason = healthy.expect_err("no socket");
        assert!(
            reason.contains("connecting to the guest agent's socket")
                && reason.contains("No such file"),
            "{reason}"
        );
    }

    #[test]
    fn a_hostile_reply_fails_the_check_at_once() {
        let mut huge = vec![b'x'; MAX_REPLY + 1];
        huge.push(b'\n');
        let (_dir, sock) = agent_socket(Fake {
            exec_reply: Some(huge),
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"flood\"\ncommand = [\"x\"]\ntimeout = 60");
        let began = Instant::now();
        let (reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("too long");
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "not retried to the timeout"
        );
        assert_eq!(reports[0].attempts, 1);
        assert!(
            reason.ends_with(&format!(
                "a reply from the guest agent is longer than {MAX_REPLY} bytes"
            )),
            "{reason}"
        );
    }

    #[test]
    fn kept_output_is_the_bounded_lossy_end() {
        let mut out = vec![b'a'; 5000];
        out.extend(b"\xff\xfeend\n");
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![Run::Exits {
                code: 0,
                stdout: out.leak(),
                stderr: b"\xc3",
            }],
            ..Fake::default()
        });
        let (reports, healthy) = run(&sock, &[Check::shell("cat big").expect("valid")]);
        healthy.expect("passes");
        let r = &reports[0];
        assert!(
            r.stdout.ends_with("\u{fffd}\u{fffd}end\n"),
            "{:?}",
            r.stdout
        );
        assert_eq!(
            r.stdout.chars().filter(|&c| c == 'a').count(),
            OUTPUT_TAIL - 6
        );
        assert_eq!(r.stderr, "\u{fffd}");
    }

    #[test]
    fn cancel_stops_the_checks() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![exits(1, b"")],
            ..Fake::default()
        });
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            c.store(true, Ordering::Relaxed);
        });
        let began = Instant::now();
        let (_r, healthy) = run_checks(
            &sock,
            &[Check::shell("false").expect("valid")],
            Duration::from_secs(60),
            Instant::now(),
            &cancel,
        );
        assert!(healthy
            .expect_err("cancelled")
            .ends_with("cancelled (signal)"));
        assert!(began.elapsed() < Duration::from_secs(5));
    }
}
