//! Renders an error and its causes on one line, each cause said once.
//!
//! Rewind's errors follow one convention: a message never repeats its source, the chain adds
//! it. So wherever one of our errors becomes text (a log line, a gRPC status, a report) it is
//! rendered with [`chain`] or [`Chain`], never with `to_string()` alone, or the cause is lost.

use std::error::Error;
use std::fmt;

/// `err`'s message and those of its sources, joined by ": ".
///
/// Some third-party errors say their source's text too, in their own message or as a source
/// that restates them (SQLite's "database is locked" has the source "Error code 5: database is
/// locked"). So a source is skipped when its text is empty, when the text so far already ends
/// with it, or when it is the previous text with a prefix ("...: previous").
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut last = out.clone();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        let restated = !last.is_empty() && text.ends_with(&format!(": {last}"));
        if !text.is_empty() && !out.ends_with(&text) && !restated {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        last = text;
        next = e.source();
    }
    out
}

/// Displays an error as [`chain`] does, for log fields: `error = %Chain(&e)`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with an optional source, its message given as is.
    #[derive(Debug)]
    struct Layer {
        msg: &'static str,
        source: Option<Box<Layer>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.msg)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    fn layers(msgs: &[&'static str]) -> Layer {
        let mut it = msgs.iter().rev();
        let mut e = Layer {
            msg: it.next().copied().unwrap_or(""),
            source: None,
        };
        for msg in it {
            e = Layer {
                msg,
                source: Some(Box::new(e)),
            };
        }
        e
    }

    #[test]
    fn a_lone_error_is_its_message() {
        assert_eq!(chain(&layers(&["catalog"])), "catalog");
    }

    #[test]
    fn each_source_is_appended_once_in_order() {
        let e = layers(&[
            "syncing",
            "reading /x",
            "No such file or directory (os error 2)",
        ]);
        assert_eq!(
            chain(&e),
            "syncing: reading /x: No such file or directory (os error 2)"
        );
        assert_eq!(Chain(&e).to_string(), chain(&e));
    }

    #[test]
    fn a_source_its_parent_already_printed_is_skipped() {
        let e = layers(&["transport error: broken pipe", "broken pipe", "os"]);
        assert_eq!(chain(&e), "transport error: broken pipe: os");
    }

    #[test]
    fn a_source_that_restates_its_parent_with_a_prefix_is_skipped() {
        let e = layers(&[
            "catalog",
            "database is locked",
            "Error code 5: database is locked",
        ]);
        assert_eq!(chain(&e), "catalog: database is locked");
    }

    #[test]
    fn a_source_that_merely_ends_like_its_parent_is_kept() {
        let e = layers(&["locked", "the file is not locked"]);
        assert_eq!(chain(&e), "locked: the file is not locked");
    }

    #[test]
    fn an_empty_source_adds_no_separator() {
        let e = layers(&["catalog", "", "disk full"]);
        assert_eq!(chain(&e), "catalog: disk full");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct ReadError {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn an_io_cause_is_told_once() {
        let e = ReadError {
            path: "/x",
            source: std::io::Error::from_raw_os_error(2),
        };
        let os = std::io::Error::from_raw_os_error(2).to_string();
        let text = chain(&e);
        assert_eq!(text, format!("reading /x: {os}"));
        assert_eq!(text.matches(&os).count(), 1);
    }
}
