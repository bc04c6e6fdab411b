//! Validation of VM and disk names: they become catalog keys and may appear in file names on
//! restore, so they never carry path characters.

use thiserror::Error;

/// A name that could escape a folder or confuse a shell. Only a short prefix of it is kept
/// (see [`shown`]): errors and logs never echo a hostile peer's 10 kB name.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {kind} name {name}: use 1-64 characters of A-Z a-z 0-9 . _ -, not starting with . or -")]
pub struct BadName {
    pub kind: &'static str,
    pub name: String,
}

/// Longest prefix of peer-supplied text an error or log line shows.
pub const SHOWN_CHARS: usize = 64;

/// `text` quoted for an error or a log line: its first [`SHOWN_CHARS`] characters, with the
/// length of the rest when cut.
pub fn shown(text: &str) -> String {
    let mut chars = text.char_indices();
    match chars.nth(SHOWN_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes in all)", &text[..cut], text.len()),
    }
}

fn check(kind: &'static str, name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadName {
            kind,
            name: shown(name),
        })
    }
}

/// Checks a VM name.
pub fn vm(name: &str) -> Result<(), BadName> {
    check("VM", name)
}

/// Checks a disk name.
pub fn disk(name: &str) -> Result<(), BadName> {
    check("disk", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_in_errors() {
        let long = "x".repeat(10_000);
        let e = vm(&long).expect_err("too long").to_string();
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("10000 bytes"), "{e}");
        assert_eq!(shown("web1"), "\"web1\"");
        let multi = "é".repeat(100);
        assert_eq!(
            shown(&multi),
            format!("{:?}... (200 bytes in all)", "é".repeat(64))
        );
    }

    #[test]
    fn accepts_plain_names() {
        for n in ["web1", "vda", "db-2.prod", "A_b"] {
            assert!(vm(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_path_tricks() {
        for n in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\\b",
            "-rf",
            ".hidden",
            "a b",
            "x\0",
            &"a".repeat(65),
        ] {
            assert!(disk(n).is_err(), "{n:?}");
        }
    }
}
