//! Credentials and the JWT that `auth.login` issues, as `apiserver/service_repo/auth/` of clearml-server does.
//!
//! The token is an HS256 JWT with the claims of the server's `Token.to_dict` plus the extras that
//! `AuthBLL.get_token_for_user` adds (`api_version`, `server_version`, `server_build`, `feature_set`). The `clearml`
//! SDK decodes it without checking the signature and reads `api_version`, `server_version`, `env` and
//! `feature_set` (`clearml/backend_api/session/session.py`).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::envelope::{ApiError, MAX_API_VERSION, errors};

/// Default token lifetime of clearml-server (`apiserver.auth.default_expiration_sec`, 30 days).
pub(crate) const DEFAULT_TOKEN_EXPIRATION_SECS: i64 = 2_592_000;

/// The server version the emulator reports in its tokens.
pub(crate) const SERVER_VERSION: &str = "2.3.0";

/// The user and company that every authenticated call acts as.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub user: String,
    pub user_name: String,
    pub company: String,
    pub company_name: String,
    pub role: String,
}

impl Identity {
    pub fn to_json(&self) -> Value {
        json!({
            "user": self.user,
            "company": self.company,
            "role": self.role,
            "user_name": self.user_name,
            "company_name": self.company_name,
        })
    }
}

/// Checks an `Authorization` header value: `Basic <base64 key:secret>` or `Bearer <jwt>`.
pub(crate) fn authorize(
    header: Option<&str>,
    access_key: &str,
    secret_key: &str,
    token_secret: &[u8],
    now_unix: i64,
) -> Result<(), ApiError> {
    let header = header.ok_or_else(errors::no_credentials)?;
    let (auth_type, data) = header.split_once(' ').unwrap_or((header, ""));

    match auth_type {
        "Basic" => check_basic(data, access_key, secret_key),
        "Bearer" => verify_token(token_secret, data, now_unix).map(|_| ()),
        _ => Err(errors::bad_auth_type()),
    }
}

fn check_basic(data: &str, access_key: &str, secret_key: &str) -> Result<(), ApiError> {
    let decoded = STANDARD
        .decode(data.trim())
        .map_err(|e| errors::bad_credentials(&e.to_string()))?;
    // The server decodes credentials as latin-1, which maps every byte to one character.
    let decoded: String = decoded.iter().map(|&b| b as char).collect();
    let (key, secret) = decoded.split_once(':').unwrap_or((&decoded, ""));

    if key == access_key && secret == secret_key {
        Ok(())
    } else {
        Err(errors::invalid_credentials(
            "failed to locate provided credentials",
        ))
    }
}

/// Issues the token `auth.login` returns, valid for `expiration_secs` from `now_unix`.
pub(crate) fn issue_token(
    token_secret: &[u8],
    identity: &Identity,
    now_unix: i64,
    expiration_secs: i64,
) -> String {
    let claims = json!({
        "auth_type": "Bearer",
        "identity": identity.to_json(),
        "iat": now_unix,
        "exp": now_unix + expiration_secs,
        "env": "emulator",
        "session_id": uuid::Uuid::new_v4().simple().to_string(),
        "api_version": MAX_API_VERSION,
        "server_version": SERVER_VERSION,
        "server_build": "emulator",
        "feature_set": "basic",
    });
    encode_jwt(token_secret, &claims)
}

fn encode_jwt(secret: &[u8], claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = URL_SAFE_NO_PAD.encode(sign(secret, signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

fn sign(secret: &[u8], input: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(input);
    mac.finalize().into_bytes().to_vec()
}

/// Verifies a token's HS256 signature and expiry and returns its claims, or the server's `invalid_token` error
/// with PyJWT's reason.
pub(crate) fn verify_token(secret: &[u8], token: &str, now_unix: i64) -> Result<Value, ApiError> {
    let invalid = |reason: &str| {
        errors::invalid_token("invalid jwt token", &[("reason", Value::from(reason))])
    };

    let mut parts = token.trim().split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("Not enough segments"));
    };

    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| invalid("Invalid crypto padding"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(format!("{header}.{payload}").as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| invalid("Signature verification failed"))?;

    let claims: Value = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| invalid("Invalid payload string"))?;
    if claims
        .get("exp")
        .and_then(Value::as_i64)
        .is_some_and(|exp| exp <= now_unix)
    {
        return Err(invalid("Signature has expired"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            user: "u".into(),
            user_name: "n".into(),
            company: "c".into(),
            company_name: "cn".into(),
            role: "user".into(),
        }
    }

    #[test]
    fn token_round_trip_and_expiry() {
        let token = issue_token(b"secret", &identity(), 1_000, 60);
        let claims = verify_token(b"secret", &token, 1_030).unwrap();
        assert_eq!(claims["api_version"], MAX_API_VERSION);
        assert_eq!(claims["identity"]["company"], "c");

        let expired = verify_token(b"secret", &token, 1_061).unwrap_err();
        assert_eq!(
            expired.msg,
            "invalid token (invalid jwt token): reason=Signature has expired"
        );

        let forged = verify_token(b"other", &token, 1_030).unwrap_err();
        assert_eq!(forged.subcode, 30);
    }

    #[test]
    fn basic_credentials_checked() {
        let good = format!("Basic {}", STANDARD.encode("key:secret"));
        assert!(authorize(Some(&good), "key", "secret", b"t", 0).is_ok());

        let bad = format!("Basic {}", STANDARD.encode("key:wrong"));
        let error = authorize(Some(&bad), "key", "secret", b"t", 0).unwrap_err();
        assert_eq!((error.code, error.subcode), (401, 22));

        let missing = authorize(None, "key", "secret", b"t", 0).unwrap_err();
        assert_eq!(missing.msg, "unauthorized (missing credentials)");
    }
}
