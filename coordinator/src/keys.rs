//! Tokens of the node agents, derived from one key every replica shares.
//!
//! A launch's bootstrap token is `HMAC(key, "bootstrap" || intent id)`. Deriving it, instead of drawing it at
//! random, lets a new leader that replays an open launch intent send the same user-data as the first call, so
//! the cloud's client-token idempotency still holds. Only the digest of the token is stored, and each instance
//! of the launch may redeem it once. A session token is `HMAC(key, "session" || instance id)`: any replica can
//! check it without shared state, so agents keep working across a change of leader.

use clearml_api::Secret;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct AgentKeys {
    key: Secret,
}

impl std::fmt::Debug for AgentKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKeys(***)")
    }
}

impl AgentKeys {
    pub fn new(key: Secret) -> Self {
        Self { key }
    }

    /// Returns the bootstrap token of every instance of launch `intent_id`.
    pub fn bootstrap_token(&self, intent_id: &str) -> Secret {
        Secret::new(self.sign("bootstrap", intent_id))
    }

    /// Returns the session token of `instance_id`, which its agent gets at registration.
    pub fn session_token(&self, instance_id: &str) -> Secret {
        Secret::new(self.sign("session", instance_id))
    }

    /// Checks a presented session token in constant time.
    pub fn verify_session(&self, instance_id: &str, presented: &str) -> bool {
        let Ok(presented) = hex_decode(presented) else {
            return false;
        };
        self.mac("session", instance_id)
            .verify_slice(&presented)
            .is_ok()
    }

    fn mac(&self, purpose: &str, subject: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.key.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(subject.as_bytes());
        mac
    }

    fn sign(&self, purpose: &str, subject: &str) -> String {
        let bytes = self.mac(purpose, subject).finalize().into_bytes();
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

fn hex_decode(text: &str) -> Result<Vec<u8>, ()> {
    if !text.len().is_multiple_of(2) {
        return Err(());
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2).ok_or(())?, 16).map_err(|_| ()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> AgentKeys {
        AgentKeys::new(Secret::new("0123456789abcdef0123456789abcdef"))
    }

    #[test]
    fn tokens_are_stable_per_subject() {
        let keys = keys();
        assert_eq!(
            keys.bootstrap_token("intent-1").expose(),
            keys.bootstrap_token("intent-1").expose()
        );
        assert_ne!(
            keys.bootstrap_token("intent-1").expose(),
            keys.bootstrap_token("intent-2").expose()
        );
        assert_ne!(
            keys.bootstrap_token("i-1").expose(),
            keys.session_token("i-1").expose(),
            "a bootstrap token is never a valid session token"
        );
    }

    #[test]
    fn session_token_is_bound_to_the_instance() {
        let keys = keys();
        let token = keys.session_token("i-1");
        assert!(keys.verify_session("i-1", token.expose()));
        assert!(!keys.verify_session("i-2", token.expose()));
        assert!(!keys.verify_session("i-1", "not hex"));
        assert!(!keys.verify_session("i-1", ""));
        let other = AgentKeys::new(Secret::new("another key of thirty-two characters"));
        assert!(!other.verify_session("i-1", token.expose()));
    }
}
