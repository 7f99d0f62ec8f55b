//! Who may change the fleet: the SSH keys allowed to sign the commits cim
//! deploys (`--allowed-signers`, git's `allowed_signers` format), and the
//! verdict on one commit's signature. The allowed signers are part of the
//! controller's configuration, never read from the repository whose
//! commits they judge. Pure: the watcher hands in the signature and the
//! signed bytes it read from the commit.

use std::path::Path;

use ssh_key::{PublicKey, SshSig};

/// The namespace git signs commits in (`ssh-keygen -Y sign -n git`).
const NAMESPACE: &str = "git";

/// What a commit's signature says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No signers are configured: commits are not checked.
    NotChecked,
    /// Signed by an allowed key of `principal`.
    Trusted { principal: String },
    /// The commit carries no signature.
    Unsigned,
    /// Signed, but not by an allowed key, or the signature does not hold.
    Untrusted { why: String },
}

/// One allowed signer: principals and a key.
#[derive(Debug, Clone)]
struct Signer {
    principals: String,
    key: PublicKey,
}

/// The keys allowed to sign commits.
#[derive(Debug, Clone, Default)]
pub struct AllowedSigners {
    signers: Vec<Signer>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignersError {
    #[error("cannot read the allowed signers file {}", .path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {why}", .path.display())]
    Line {
        path: std::path::PathBuf,
        line: usize,
        why: String,
    },
    #[error("{} allows no key to sign commits", .0.display())]
    Empty(std::path::PathBuf),
}

impl AllowedSigners {
    pub fn load(path: &Path) -> Result<AllowedSigners, SignersError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignersError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let signers = AllowedSigners::parse(&text).map_err(|(line, why)| SignersError::Line {
            path: path.to_path_buf(),
            line,
            why,
        })?;
        if signers.signers.is_empty() {
            return Err(SignersError::Empty(path.to_path_buf()));
        }
        Ok(signers)
    }

    /// Parses git's `allowed_signers` format: `PRINCIPALS [OPTIONS] KEYTYPE
    /// BASE64 [COMMENT]` per line. Keys whose `namespaces=` leaves out
    /// `git` are skipped; certificate authorities are refused (not
    /// supported). Errors name the line (1-based).
    pub fn parse(text: &str) -> Result<AllowedSigners, (usize, String)> {
        let mut signers = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(at) = fields.iter().position(|f| is_key_type(f)) else {
                return Err((i + 1, "no SSH public key on this line".to_string()));
            };
            if at == 0 {
                return Err((i + 1, "no principal before the key".to_string()));
            }
            let options = fields[1..at].join(" ");
            if options.contains("cert-authority") {
                return Err((i + 1, "cert-authority keys are not supported".to_string()));
            }
            if let Some(namespaces) = option_value(&options, "namespaces") {
                if !namespaces.split(',').any(|n| n.trim() == NAMESPACE) {
                    continue;
                }
            }
            let encoded = fields[at..fields.len().min(at + 2)].join(" ");
            let key = PublicKey::from_openssh(&encoded)
                .map_err(|e| (i + 1, format!("not an SSH public key: {e}")))?;
            signers.push(Signer {
                principals: fields[0].to_string(),
                key,
            });
        }
        Ok(AllowedSigners { signers })
    }

    /// Judges a commit from its signature (`None`: unsigned) and the bytes
    /// it signs.
    pub fn verdict(&self, signature: Option<&[u8]>, signed: &[u8]) -> Verdict {
        let Some(signature) = signature else {
            return Verdict::Unsigned;
        };
        let sig = match std::str::from_utf8(signature)
            .map_err(|e| e.to_string())
            .and_then(|pem| SshSig::from_pem(pem.trim()).map_err(|e| e.to_string()))
        {
            Ok(sig) => sig,
            Err(why) => {
                return Verdict::Untrusted {
                    why: format!(
                        "not an SSH signature (only SSH-signed commits are supported): {why}"
                    ),
                }
            }
        };
        let fingerprint = sig.public_key().fingerprint(Default::default());
        let Some(signer) = self
            .signers
            .iter()
            .find(|s| s.key.key_data() == sig.public_key())
        else {
            return Verdict::Untrusted {
                why: format!("signed by {fingerprint}, which --allowed-signers does not allow"),
            };
        };
        match signer.key.verify(NAMESPACE, signed, &sig) {
            Ok(()) => Verdict::Trusted {
                principal: signer.principals.clone(),
            },
            Err(e) => Verdict::Untrusted {
                why: format!("the signature by {fingerprint} does not verify: {e}"),
            },
        }
    }
}

fn is_key_type(field: &str) -> bool {
    field.starts_with("ssh-") || field.starts_with("ecdsa-sha2-") || field.starts_with("sk-")
}

/// The value of `name="…"` (or `name=…`) in an options field.
fn option_value<'a>(options: &'a str, name: &str) -> Option<&'a str> {
    let start = options.find(&format!("{name}="))? + name.len() + 1;
    let rest = &options[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split([' ', ',']).next(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";

    #[test]
    fn allowed_signers_are_read_as_git_writes_them() {
        let text = format!(
            "# the release team\nalice@example.org {KEY} alice\nbob@example.org namespaces=\"file\" {KEY}\ncarol@example.org namespaces=\"git,file\" {KEY}\n"
        );
        let signers = AllowedSigners::parse(&text).unwrap();
        let principals: Vec<&str> = signers
            .signers
            .iter()
            .map(|s| s.principals.as_str())
            .collect();
        assert_eq!(principals, ["alice@example.org", "carol@example.org"]);
        assert_eq!(
            AllowedSigners::parse("alice@example.org nonsense\n")
                .unwrap_err()
                .0,
            1
        );
        assert!(AllowedSigners::parse(&format!("x cert-authority {KEY}")).is_err());
    }

    #[test]
    fn unsigned_and_garbled_signatures_are_not_trusted() {
        let signers = AllowedSigners::parse(&format!("alice {KEY}")).unwrap();
        assert_eq!(signers.verdict(None, b"tree 0"), Verdict::Unsigned);
        let pgp = b"-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----";
        assert!(matches!(
            signers.verdict(Some(pgp), b"tree 0"),
            Verdict::Untrusted { .. }
        ));
    }
}
