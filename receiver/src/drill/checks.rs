//! What an application check is: its spec as written in a checks file (`[[check]]`) or a drill
//! schedule, its compiled form, how a run of its command is judged, and what it reports.

use super::tail;
use crate::guest_agent::Exited;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Bytes of the end of each output quoted in a failed check's reason.
const REASON_TAIL: usize = 200;

/// An application check as written in a checks file (`[[check]]`) or a drill schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Names the check in reports (default: the command).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The program (a path in the guest, or a name on qemu-ga's PATH) and its arguments.
    pub command: Vec<String>,
    /// The exit code that passes.
    #[serde(default)]
    pub expect_exit: i64,
    /// A regular expression that must match somewhere in stdout (multi-line mode: `^` and `$`
    /// match at each line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_output: Option<String>,
    /// Seconds to keep retrying until it passes (default: the drill's boot timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// A checks file: `[[check]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    #[serde(default)]
    pub check: Vec<CheckSpec>,
}

/// Why checks could not be read. The underlying error is part of the message, not a source, so
/// `{:#}` does not print it twice.
#[derive(Debug, Error)]
pub enum CheckError {
    /// A check with no program to run.
    #[error("check {name:?}: the command is empty")]
    EmptyCommand { name: String },
    /// `expect_output` is not a regular expression.
    #[error("check {name:?}: expect_output: {error}")]
    BadRegex { name: String, error: regex::Error },
    /// `timeout = 0` leaves no time to run.
    #[error("check {name:?}: timeout must be positive (seconds)")]
    ZeroTimeout { name: String },
    /// The checks file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The checks file is not TOML of `[[check]]` tables.
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    /// The checks file holds no check.
    #[error("{path}: no [[check]] table")]
    NoChecks { path: PathBuf },
}

/// A check ready to run: its command has a program and its expected output is compiled.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    /// The program, then its arguments.
    pub(super) program: String,
    pub(super) args: Vec<String>,
    pub expect_exit: i64,
    pub expect_output: Option<regex::Regex>,
    /// None: the drill's boot timeout.
    pub timeout: Option<Duration>,
}

impl Check {
    /// Checks a spec and compiles it.
    pub fn parse(spec: &CheckSpec) -> Result<Check, CheckError> {
        let name = if spec.name.is_empty() {
            spec.command.join(" ")
        } else {
            spec.name.clone()
        };
        let Some((program, args)) = spec
            .command
            .split_first()
            .filter(|(p, _)| !p.trim().is_empty())
        else {
            return Err(CheckError::EmptyCommand { name });
        };
        let expect_output = match &spec.expect_output {
            None => None,
            Some(re) => Some(
                regex::RegexBuilder::new(re)
                    .multi_line(true)
                    .build()
                    .map_err(|error| CheckError::BadRegex {
                        name: name.clone(),
                        error,
                    })?,
            ),
        };
        if spec.timeout == Some(0) {
            return Err(CheckError::ZeroTimeout { name });
        }
        Ok(Check {
            program: program.clone(),
            args: args.to_vec(),
            expect_exit: spec.expect_exit,
            expect_output,
            timeout: spec.timeout.map(Duration::from_secs),
            name,
        })
    }

    /// `/bin/sh -c COMMAND`, passing on exit 0, named for the command.
    pub fn shell(command: &str) -> Result<Check, CheckError> {
        if command.trim().is_empty() {
            return Err(CheckError::EmptyCommand {
                name: command.to_owned(),
            });
        }
        Check::parse(&CheckSpec {
            name: command.to_owned(),
            command: vec!["/bin/sh".into(), "-c".into(), command.to_owned()],
            expect_exit: 0,
            expect_output: None,
            timeout: None,
        })
    }

    /// The program and its arguments.
    pub fn command(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }

    /// Why a run of the check's command does not pass it, or None when it passes.
    pub(super) fn judge(&self, out: &Exited) -> Option<String> {
        let exit_ok = out.exit_code == Some(self.expect_exit);
        let output_ok = self
            .expect_output
            .as_ref()
            .is_none_or(|re| re.is_match(&String::from_utf8_lossy(&out.stdout)));
        if exit_ok && output_ok {
            return None;
        }
        let mut problem = format!("expected exit {}", self.expect_exit);
        if let Some(re) = &self.expect_output {
            problem += &format!(" and stdout matching {:?}", re.as_str());
        }
        problem += &match (out.exit_code, out.signal) {
            (Some(code), _) => format!(", got exit {code}"),
            (None, Some(sig)) => format!(", got killed by signal {sig}"),
            (None, None) => ", got no exit code".to_owned(),
        };
        if exit_ok {
            problem += " and stdout not matching";
        }
        for (what, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            let end = tail(bytes, REASON_TAIL);
            let end = end.trim();
            if !end.is_empty() {
                problem += &format!("; {what} ends {end:?}");
            }
        }
        Some(problem)
    }
}

/// Reads a checks file: one or more `[[check]]` tables.
pub fn load_checks(path: &Path) -> Result<Vec<Check>, CheckError> {
    let text = std::fs::read_to_string(path).map_err(|error| CheckError::Read {
        path: path.to_owned(),
        error,
    })?;
    let file: ChecksFile = toml::from_str(&text).map_err(|error| CheckError::Parse {
        path: path.to_owned(),
        error: Box::new(error),
    })?;
    if file.check.is_empty() {
        return Err(CheckError::NoChecks {
            path: path.to_owned(),
        });
    }
    file.check.iter().map(Check::parse).collect()
}

/// What one application check did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckReport {
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    pub passed: bool,
    /// Times the command was tried (0: not run).
    pub attempts: u32,
    /// Of the last run that exited (None: none did, or a signal ended it).
    pub exit_code: Option<i64>,
    /// The end of the last run's stdout (lossy UTF-8).
    pub stdout: String,
    /// The end of the last run's stderr (lossy UTF-8).
    pub stderr: String,
    /// Seconds from the drill's start to the check passing.
    pub passed_seconds: Option<f64>,
    /// Why it did not pass (the last attempt's problem), or "not run".
    pub problem: Option<String>,
}

impl CheckReport {
    pub(super) fn not_run(check: &Check) -> CheckReport {
        CheckReport {
            name: check.name.clone(),
            command: check.command(),
            problem: Some("not run".into()),
            ..CheckReport::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> Result<Vec<Check>, CheckError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("checks.toml");
        std::fs::write(&p, toml_text).expect("write");
        load_checks(&p)
    }

    fn check(text: &str) -> Check {
        spec(text)
            .expect("valid")
            .into_iter()
            .next()
            .expect("one check")
    }

    #[test]
    fn a_checks_file_parses_with_defaults() {
        let checks = spec(
            r#"
            [[check]]
            name = "database"
            command = ["sqlite3", "/var/lib/app/app.db", "PRAGMA integrity_check"]
            expect_exit = 0
            expect_output = "^ok$"
            timeout = 120

            [[check]]
            command = ["systemctl", "is-system-running"]
            "#,
        )
        .expect("valid");
        assert_eq!(checks[0].name, "database");
        assert_eq!(
            checks[0].command(),
            ["sqlite3", "/var/lib/app/app.db", "PRAGMA integrity_check"]
        );
        assert_eq!(checks[0].timeout, Some(Duration::from_secs(120)));
        assert_eq!(checks[1].name, "systemctl is-system-running");
        assert_eq!((checks[1].expect_exit, checks[1].timeout), (0, None));
        assert!(checks[1].expect_output.is_none());
    }

    #[test]
    fn bad_checks_are_refused_with_a_named_reason() {
        let cases = [
            (
                "[[check]]\nname = \"a\"\ncommand = []",
                "\"a\": the command is empty",
            ),
            ("[[check]]\ncommand = [\"\", \"x\"]", "the command is empty"),
            (
                "[[check]]\nname = \"r\"\ncommand = [\"x\"]\nexpect_output = \"(\"",
                "\"r\": expect_output",
            ),
            (
                "[[check]]\ncommand = [\"x\"]\ntimeout = 0",
                "timeout must be positive",
            ),
            ("[[check]]\ncommand = [\"x\"]\nexit = 1", "exit"),
            ("[[check]]\nname = \"no command\"", "command"),
            ("[[check]]\ncommand = \"ls -l\"", "command"),
            ("", "no [[check]] table"),
            ("[check]\ncommand = [\"x\"]", "check"),
        ];
        for (text, want) in cases {
            let e = spec(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = load_checks(Path::new("/nonexistent/checks.toml")).expect_err("missing");
        assert!(matches!(e, CheckError::Read { .. }), "{e}");
        assert!(matches!(
            Check::shell("  "),
            Err(CheckError::EmptyCommand { .. })
        ));
    }

    #[test]
    fn a_shell_check_runs_sh_and_expects_exit_0() {
        let c = Check::shell("test -f /etc/hostname").expect("valid");
        assert_eq!(c.name, "test -f /etc/hostname");
        assert_eq!(c.command(), ["/bin/sh", "-c", "test -f /etc/hostname"]);
        assert_eq!(c.expect_exit, 0);
        assert!(c.expect_output.is_none() && c.timeout.is_none());
    }

    #[test]
    fn a_checks_file_round_trips_through_toml() {
        let specs = vec![
            CheckSpec {
                name: "db".into(),
                command: vec!["sqlite3".into(), "a b.db".into(), "PRAGMA \"x\"".into()],
                expect_exit: 2,
                expect_output: Some("^ok$".into()),
                timeout: Some(7),
            },
            CheckSpec {
                name: String::new(),
                command: vec!["true".into()],
                expect_exit: 0,
                expect_output: None,
                timeout: None,
            },
        ];
        let text = toml::to_string(&ChecksFile {
            check: specs.clone(),
        })
        .expect("serializes");
        let back: ChecksFile = toml::from_str(&text).expect("parses");
        assert_eq!(back.check, specs);
    }

    #[test]
    fn judging_names_what_was_expected_and_what_came() {
        let c = check("[[check]]\ncommand = [\"x\"]\nexpect_output = \"^ok$\"");
        let out = |code: Option<i64>, stdout: &[u8]| Exited {
            exit_code: code,
            signal: None,
            stdout: stdout.to_vec(),
            stderr: b"disk I/O error\n".to_vec(),
        };
        assert_eq!(
            c.judge(&out(Some(0), b"row 1\nok\nrow 3\n")),
            None,
            "multi-line"
        );
        let p = c.judge(&out(Some(0), b"not ok\n")).expect("no match");
        assert_eq!(
            p,
            "expected exit 0 and stdout matching \"^ok$\", got exit 0 and stdout not matching; \
             stdout ends \"not ok\"; stderr ends \"disk I/O error\""
        );
        let p = c.judge(&out(Some(1), b"ok")).expect("exit 1");
        assert!(p.contains("got exit 1;"), "{p}");
        let killed = Exited {
            signal: Some(9),
            ..Exited::default()
        };
        let p = c.judge(&killed).expect("killed");
        assert!(p.contains("got killed by signal 9"), "{p}");
        let long = [b'x'; 5000];
        let p = c.judge(&out(Some(1), &long)).expect("long");
        assert!(p.len() < 2 * REASON_TAIL + 200, "{}", p.len());
    }
}
