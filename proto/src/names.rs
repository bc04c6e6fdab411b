//! Validation of VM and disk names: they become catalog keys and may appear in file names on
//! restore, so they never carry path characters.

use thiserror::Error;

/// A name that could escape a folder or confuse a shell.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ -, not starting with . or -")]
pub struct BadName {
    pub kind: &'static str,
    pub name: String,
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
            name: name.to_owned(),
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
