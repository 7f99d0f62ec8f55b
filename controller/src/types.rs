//! Domain newtypes, made once where a value enters cim (nix's output, a
//! host's answer) and trusted after: a `StorePath` is always a well-formed
//! `/nix/store/<hash>-<name>`, safe to pass to ssh and nix as an argument.
//! Checking never panics, whatever the input.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A path in the Nix store: `/nix/store/`, 32 characters of nix's base32
/// (lowercase letters and digits), `-`, and a name of the characters nix
/// allows in store path names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath(String);

impl StorePath {
    /// The path, if `s` is a well-formed store path.
    pub fn parse(s: &str) -> Option<StorePath> {
        is_store_path(s).then(|| StorePath(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StorePath {
    type Error = String;

    fn try_from(s: String) -> Result<StorePath, String> {
        if is_store_path(&s) {
            Ok(StorePath(s))
        } else {
            Err(format!("`{s}` is not a store path"))
        }
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.0
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for StorePath {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_ref()
    }
}

impl PartialEq<str> for StorePath {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for StorePath {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<StorePath> for String {
    fn eq(&self, other: &StorePath) -> bool {
        *self == other.0
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `path` names a store object.
pub fn is_store_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/nix/store/") else {
        return false;
    };
    // Bytes, not chars: a host's output may hold anything, and slicing a
    // str at a byte offset inside a multi-byte character would panic.
    let rest = rest.as_bytes();
    let (hash, name) = rest.split_at(rest.len().min(32));
    hash.len() == 32
        && hash
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() > 1
        && name[0] == b'-'
        && name[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-a-1";

    #[test]
    fn store_paths_are_checked() {
        assert!(is_store_path(GOOD));
        assert!(is_store_path(
            "/nix/store/6ihf0pnw4hyqwq5vg515a28rirb74c7a-nixos-system-a-1.drv"
        ));
        for bad in [
            "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb",
            "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-a;rm",
            "/tmp/x",
            "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicix\u{e9}-a",
            "/nix/store/\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}x",
            "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-\u{e9}",
        ] {
            assert!(!is_store_path(bad), "{bad}");
            assert_eq!(StorePath::parse(bad), None);
        }
    }

    #[test]
    fn store_paths_are_validated_when_read() {
        let p: StorePath = serde_json::from_str(&format!("\"{GOOD}\"")).unwrap();
        assert_eq!(p.as_str(), GOOD);
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{GOOD}\""));
        assert!(serde_json::from_str::<StorePath>("\"/tmp/evil\"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn checking_never_panics(s in "\\PC*") {
            let _ = StorePath::parse(&s);
            let _ = StorePath::parse(&format!("/nix/store/{s}"));
        }
    }
}
