//! Domain newtypes, made once where a value enters cim and trusted after:
//! a `StorePath` (from nix's output or a host's answer) is always a
//! well-formed `/nix/store/<hash>-<name>`, a `Revision` (from a git ref)
//! a commit id, a `HostName` (from a spec) a DNS label — each safe to pass
//! to ssh, git and nix as an argument. Checking never panics, whatever the
//! input.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A string newtype checked by `$check` (`Result<(), &str>`) when made,
/// from a `&str` or through serde; read as a `&str` after.
macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:path, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The value, if `s` is well-formed.
            pub fn parse(s: &str) -> Option<$name> {
                $check(s).is_ok().then(|| $name(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(s: String) -> Result<$name, String> {
                match $check(&s) {
                    Ok(()) => Ok($name(s)),
                    Err(why) => Err(format!("`{s}` is not {}: {why}", $what)),
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_string!(
    /// A path in the Nix store: `/nix/store/`, 32 characters of nix's
    /// base32 (lowercase letters and digits), `-`, and a name of the
    /// characters nix allows in store path names.
    StorePath,
    check_store_path,
    "a store path"
);

checked_string!(
    /// A git commit id, as the watcher reads it from a ref: 40 (SHA-1) or
    /// 64 (SHA-256) lowercase hexadecimal digits. Nix and git get it as an
    /// argument, so nothing else may pass.
    Revision,
    check_revision,
    "a commit id"
);

checked_string!(
    /// A host's name, as `metadata.name` gives it: an RFC 1123 DNS label
    /// (lowercase letters, digits and '-', at most 63).
    HostName,
    check_dns_label,
    "a host name"
);

impl AsRef<std::ffi::OsStr> for StorePath {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_ref()
    }
}

impl Revision {
    /// The first 7 digits, as git shows a commit.
    pub fn short(&self) -> &str {
        &self.0[..7]
    }
}

fn check_store_path(s: &str) -> Result<(), &'static str> {
    if is_store_path(s) {
        Ok(())
    } else {
        Err("not /nix/store/<32 base-32 characters>-<name>")
    }
}

fn check_revision(s: &str) -> Result<(), &'static str> {
    if !matches!(s.len(), 40 | 64) {
        return Err("must be 40 or 64 hexadecimal digits");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("must be lowercase hexadecimal digits");
    }
    Ok(())
}

/// RFC 1123 DNS label, as Kubernetes object names.
pub fn check_dns_label(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 63 {
        return Err("must be at most 63 characters");
    }
    let bytes = name.as_bytes();
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err("must contain only lowercase letters, digits and '-'");
    }
    if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
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

    #[test]
    fn revisions_and_host_names_are_checked() {
        let sha1 = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(Revision::parse(sha1).unwrap().short(), "0123456");
        assert!(Revision::parse(&"a".repeat(64)).is_some());
        for bad in ["", "main", &sha1.to_uppercase(), &sha1[..39], "-x"] {
            assert!(Revision::parse(bad).is_none(), "{bad}");
        }
        assert!(HostName::parse("web-1").is_some());
        for bad in ["", "Web", "-a", "a.b", &"a".repeat(64)] {
            assert!(HostName::parse(bad).is_none(), "{bad}");
        }
        assert!(serde_json::from_str::<Revision>("\"HEAD\"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn checking_never_panics(s in "\\PC*") {
            let _ = StorePath::parse(&s);
            let _ = StorePath::parse(&format!("/nix/store/{s}"));
            let _ = Revision::parse(&s);
            let _ = HostName::parse(&s);
        }
    }
}
