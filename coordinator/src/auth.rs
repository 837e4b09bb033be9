//! Authorization of calls to the coordinator: API tokens with roles for FleetService, and bootstrap tokens with which a new
//! instance's agent registers once.
//!
//! Tokens are compared by SHA-256 digest in constant time, so neither the stored digests nor the comparison
//! time reveal a token.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clearml_api::Secret;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ApiToken, Role};

/// Random bytes in a generated token (256 bits).
const TOKEN_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token; send the metadata 'authorization: Bearer <token>'")]
    Missing,
    #[error("invalid authorization metadata; expected 'Bearer <token>'")]
    Malformed,
    #[error("invalid token")]
    Invalid,
    #[error("token {name:?} has the viewer role; this call needs an operator token")]
    Forbidden { name: String },
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Forbidden { .. } => tonic::Status::permission_denied(err.to_string()),
            _ => tonic::Status::unauthenticated(err.to_string()),
        }
    }
}

/// The configured API tokens, by digest.
pub struct ApiAuth {
    tokens: Vec<(TokenDigest, String, Role)>,
}

impl ApiAuth {
    pub fn new(tokens: &[ApiToken]) -> Self {
        Self {
            tokens: tokens
                .iter()
                .map(|token| {
                    (
                        TokenDigest::of(token.token.expose()),
                        token.name.clone(),
                        token.role,
                    )
                })
                .collect(),
        }
    }

    /// Checks the `authorization` metadata of a call that needs `needed`, and returns the token's name.
    pub fn authorize(&self, authorization: Option<&str>, needed: Role) -> Result<&str, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Malformed)?;

        let digest = TokenDigest::of(token);
        // Compare with every token, so the time taken does not depend on which one matched.
        let mut found = None;
        for (candidate, name, role) in &self.tokens {
            if candidate.matches(&digest) && found.is_none() {
                found = Some((name.as_str(), *role));
            }
        }
        let (name, role) = found.ok_or(AuthError::Invalid)?;
        if needed == Role::Operator && role == Role::Viewer {
            return Err(AuthError::Forbidden {
                name: name.to_owned(),
            });
        }
        Ok(name)
    }
}

/// SHA-256 of a token, hex-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDigest(String);

impl TokenDigest {
    pub fn of(token: &str) -> Self {
        let digest = Sha256::digest(token.as_bytes());
        Self(digest.iter().map(|byte| format!("{byte:02x}")).collect())
    }

    /// Compares in time that depends only on the length, which is fixed.
    fn matches(&self, other: &TokenDigest) -> bool {
        let (left, right) = (self.0.as_bytes(), other.0.as_bytes());
        left.len() == right.len()
            && left
                .iter()
                .zip(right)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// Generates a random URL-safe token.
pub fn generate_token() -> Secret {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(URL_SAFE_NO_PAD.encode(bytes))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "bootstrap token rejected for instance {instance_id}: it does not match the launch's token"
    )]
    Invalid { instance_id: String },
    #[error(
        "bootstrap token rejected for instance {instance_id}: the instance already registered with it"
    )]
    Reused { instance_id: String },
    #[error(
        "bootstrap token rejected for instance {instance_id}: the instance does not belong to launch intent {intent_id}"
    )]
    WrongInstance {
        instance_id: String,
        intent_id: String,
    },
    #[error(
        "bootstrap token rejected for instance {instance_id}: all {count} registrations of the launch are used"
    )]
    Exhausted { instance_id: String, count: u32 },
}

impl From<BootstrapError> for tonic::Status {
    fn from(err: BootstrapError) -> Self {
        tonic::Status::permission_denied(err.to_string())
    }
}

/// The stored side of a bootstrap token: one per launch intent, because one RunInstances call gives every
/// instance the same user-data. Each instance of the launch may register once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapRecord {
    pub intent_id: String,
    pub digest: TokenDigest,
    /// Instances the launch may create.
    pub count: u32,
    /// Instances that registered with the token.
    pub redeemed_by: BTreeSet<String>,
    pub created_ms: u64,
}

impl BootstrapRecord {
    /// Creates the token for a launch of `count` instances; the plain token goes into the instances'
    /// bootstrap config and only its digest is stored.
    pub fn issue(intent_id: &str, count: u32, now_ms: u64) -> (Secret, BootstrapRecord) {
        let token = generate_token();
        let record = BootstrapRecord {
            intent_id: intent_id.to_owned(),
            digest: TokenDigest::of(token.expose()),
            count,
            redeemed_by: BTreeSet::new(),
            created_ms: now_ms,
        };
        (token, record)
    }

    /// Builds the stored side of a token derived elsewhere (see [`crate::keys::AgentKeys::bootstrap_token`]).
    pub fn for_token(intent_id: &str, token: &Secret, count: u32, now_ms: u64) -> BootstrapRecord {
        BootstrapRecord {
            intent_id: intent_id.to_owned(),
            digest: TokenDigest::of(token.expose()),
            count,
            redeemed_by: BTreeSet::new(),
            created_ms: now_ms,
        }
    }

    /// Accepts the registration of `instance_id` with `presented`, if the token matches, the instance belongs
    /// to this launch (`launched` contains the instance ids the cloud reported for the intent) and has not
    /// registered before. The caller stores the updated record before it responds to the agent.
    pub fn redeem(
        &mut self,
        presented: &str,
        instance_id: &str,
        launched: &BTreeSet<String>,
    ) -> Result<(), BootstrapError> {
        let instance = instance_id.to_owned();
        if !self.digest.matches(&TokenDigest::of(presented)) {
            return Err(BootstrapError::Invalid {
                instance_id: instance,
            });
        }
        if self.redeemed_by.contains(instance_id) {
            return Err(BootstrapError::Reused {
                instance_id: instance,
            });
        }
        if !launched.contains(instance_id) {
            return Err(BootstrapError::WrongInstance {
                instance_id: instance,
                intent_id: self.intent_id.clone(),
            });
        }
        if self.redeemed_by.len() as u32 >= self.count {
            return Err(BootstrapError::Exhausted {
                instance_id: instance,
                count: self.count,
            });
        }
        self.redeemed_by.insert(instance);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> ApiAuth {
        ApiAuth::new(&[
            ApiToken {
                name: "ops".to_owned(),
                role: Role::Operator,
                token: Secret::new("operator-token"),
            },
            ApiToken {
                name: "grafana".to_owned(),
                role: Role::Viewer,
                token: Secret::new("viewer-token"),
            },
        ])
    }

    #[test]
    fn operator_token_may_write() {
        assert_eq!(
            auth().authorize(Some("Bearer operator-token"), Role::Operator),
            Ok("ops")
        );
    }

    #[test]
    fn viewer_token_may_read_not_write() {
        let auth = auth();
        assert_eq!(
            auth.authorize(Some("Bearer viewer-token"), Role::Viewer),
            Ok("grafana")
        );

        let err = auth
            .authorize(Some("Bearer viewer-token"), Role::Operator)
            .unwrap_err();

        assert_eq!(
            err,
            AuthError::Forbidden {
                name: "grafana".to_owned()
            }
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("needs an operator token"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn missing_and_bad_tokens_are_unauthenticated() {
        let auth = auth();
        for (header, expected) in [
            (None, AuthError::Missing),
            (Some("operator-token"), AuthError::Malformed),
            (Some("Bearer "), AuthError::Malformed),
            (Some("Bearer guess"), AuthError::Invalid),
        ] {
            let err = auth.authorize(header, Role::Viewer).unwrap_err();
            assert_eq!(err, expected, "header {header:?}");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::Unauthenticated
            );
        }
    }

    #[test]
    fn generated_tokens_differ() {
        let first = generate_token();
        let second = generate_token();
        assert_ne!(first.expose(), second.expose());
        assert_eq!(first.expose().len(), 43, "32 bytes in unpadded base64url");
    }

    #[test]
    fn bootstrap_token_registers_each_instance_once() {
        let (token, mut record) = BootstrapRecord::issue("intent-1", 2, 1_000);
        let launched = BTreeSet::from(["i-a".to_owned(), "i-b".to_owned()]);
        assert!(
            !serde_json::to_string(&record)
                .unwrap()
                .contains(token.expose()),
            "only the digest is stored"
        );

        record.redeem(token.expose(), "i-a", &launched).unwrap();
        record.redeem(token.expose(), "i-b", &launched).unwrap();
        let reused = record.redeem(token.expose(), "i-a", &launched).unwrap_err();

        assert_eq!(
            reused,
            BootstrapError::Reused {
                instance_id: "i-a".to_owned()
            }
        );
        assert!(
            reused.to_string().contains("already registered"),
            "{reused}"
        );
    }

    #[test]
    fn bootstrap_token_rejects_strangers() {
        let (token, mut record) = BootstrapRecord::issue("intent-1", 1, 1_000);
        let launched = BTreeSet::from(["i-a".to_owned()]);

        let wrong_token = record.redeem("guess", "i-a", &launched).unwrap_err();
        let wrong_instance = record
            .redeem(token.expose(), "i-zzz", &launched)
            .unwrap_err();

        assert_eq!(
            wrong_token,
            BootstrapError::Invalid {
                instance_id: "i-a".to_owned()
            }
        );
        assert!(
            wrong_instance
                .to_string()
                .contains("does not belong to launch intent intent-1"),
            "{wrong_instance}"
        );
        assert!(record.redeemed_by.is_empty());
    }

    #[test]
    fn bootstrap_token_stops_after_count() {
        let (token, mut record) = BootstrapRecord::issue("intent-1", 1, 1_000);
        let launched = BTreeSet::from(["i-a".to_owned(), "i-b".to_owned()]);
        record.redeem(token.expose(), "i-a", &launched).unwrap();

        let err = record.redeem(token.expose(), "i-b", &launched).unwrap_err();

        assert_eq!(
            err,
            BootstrapError::Exhausted {
                instance_id: "i-b".to_owned(),
                count: 1
            }
        );
    }
}
