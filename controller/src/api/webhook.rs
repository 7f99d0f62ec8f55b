//! `POST /hooks/git`: a push hook from GitHub, Gitea/Forgejo, GitLab or a
//! plain `post-receive` script makes the watcher fetch at once (polling
//! stays as the fallback). Only a hook proven to know the secret
//! (`--webhook-secret-file`) is obeyed: an HMAC-SHA256 of the body
//! (`X-Hub-Signature-256: sha256=HEX`, GitHub's, also what a script can
//! compute with `openssl dgst -sha256 -hmac`; `X-Gitea-Signature: HEX`) or
//! GitLab's `X-Gitlab-Token`, all compared in constant time. The body is
//! not read for anything else: a hook only says "look now".

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shared secret; its `Debug` shows nothing.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    pub fn new(secret: &str) -> WebhookSecret {
        WebhookSecret(secret.as_bytes().to_vec())
    }

    /// Whether the hook's headers prove it knows the secret, for `body`.
    pub fn verifies(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(sig) = header("x-hub-signature-256") {
            return sig
                .strip_prefix("sha256=")
                .is_some_and(|hex| self.hmac_matches(hex, body));
        }
        if let Some(hex) = header("x-gitea-signature").or(header("x-forgejo-signature")) {
            return self.hmac_matches(hex, body);
        }
        if let Some(token) = header("x-gitlab-token") {
            return super::access::Token::new(&String::from_utf8_lossy(&self.0))
                .matches_secret(token);
        }
        false
    }

    fn hmac_matches(&self, hex_signature: &str, body: &[u8]) -> bool {
        let Ok(signature) = hex::decode(hex_signature.trim()) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(…)")
    }
}

/// The answer to a hook.
pub fn answer(verified: bool) -> (StatusCode, &'static str) {
    if verified {
        (StatusCode::ACCEPTED, "fetching")
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "the hook's signature does not match --webhook-secret-file",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn hooks_are_obeyed_only_with_the_secret() {
        let secret = WebhookSecret::new("hook-secret");
        let body = br#"{"ref":"refs/heads/main"}"#;
        let good = format!("sha256={}", sign("hook-secret", body));
        assert!(secret.verifies(&headers(&[("x-hub-signature-256", &good)]), body));
        let bad = format!("sha256={}", sign("other", body));
        assert!(!secret.verifies(&headers(&[("x-hub-signature-256", &bad)]), body));
        // The right signature of another body.
        assert!(!secret.verifies(&headers(&[("x-hub-signature-256", &good)]), b"{}"));
        let gitea = sign("hook-secret", body);
        assert!(secret.verifies(&headers(&[("x-gitea-signature", &gitea)]), body));
        assert!(secret.verifies(&headers(&[("x-gitlab-token", "hook-secret")]), body));
        assert!(!secret.verifies(&headers(&[("x-gitlab-token", "hook")]), body));
        assert!(!secret.verifies(&HeaderMap::new(), body));
        assert_eq!(format!("{secret:?}"), "WebhookSecret(…)");
    }
}
