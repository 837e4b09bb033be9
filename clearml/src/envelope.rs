//! The response envelope that clearml-server wraps around every response:
//! `{"meta": {"result_code": 200, "result_subcode": 0, "result_msg": "OK", ...}, "data": {...}}`.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

#[derive(Debug, Deserialize)]
struct RawEnvelope {
    meta: Meta,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// The `meta` part of the envelope.
#[derive(Debug, Clone, Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub trx: Option<String>,
    pub result_code: u16,
    #[serde(default)]
    pub result_subcode: u16,
    #[serde(default)]
    pub result_msg: String,
}

/// Decodes one response body into `T`, turning error envelopes and schema mismatches into [`Error`].
pub(crate) fn decode<T: DeserializeOwned>(
    endpoint: &str,
    http_status: u16,
    body: &[u8],
) -> Result<T, Error> {
    let envelope: RawEnvelope =
        serde_json::from_slice(body).map_err(|source| Error::MalformedResponse {
            endpoint: endpoint.to_owned(),
            http_status,
            reason: format!(
                "body is not a ClearML envelope ({source}); body starts with {:?}",
                excerpt(body)
            ),
        })?;

    if http_status >= 400 || envelope.meta.result_code != 200 {
        return Err(Error::Api {
            endpoint: endpoint.to_owned(),
            http_status,
            result_code: envelope.meta.result_code,
            result_subcode: envelope.meta.result_subcode,
            result_msg: envelope.meta.result_msg,
        });
    }

    // An endpoint with nothing to return sends `"data": {}` or omits it; both decode as an empty object.
    let data = match envelope.data {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(data) => data,
    };
    serde_json::from_value(data).map_err(|source| Error::MalformedResponse {
        endpoint: endpoint.to_owned(),
        http_status,
        reason: format!("data does not match the expected schema: {source}"),
    })
}

fn excerpt(body: &[u8]) -> String {
    const MAX_CHARS: usize = 120;
    String::from_utf8_lossy(body)
        .chars()
        .take(MAX_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Token {
        token: String,
    }

    #[test]
    fn decodes_data_of_success_envelope() {
        let body = br#"{"meta":{"id":"1","trx":"1","result_code":200,"result_subcode":0,"result_msg":"OK"},"data":{"token":"abc"}}"#;
        let token: Token = decode("auth.login", 200, body).unwrap();
        assert_eq!(token.token, "abc");
    }

    #[test]
    fn error_envelope_keeps_codes_and_message() {
        let body = br#"{"meta":{"result_code":401,"result_subcode":22,"result_msg":"Unauthorized (invalid credentials)"},"data":{}}"#;
        let err = decode::<Token>("auth.login", 401, body).unwrap_err();
        assert_eq!(err.result_codes(), Some((401, 22)));
        assert_eq!(
            err.to_string(),
            "ClearML API call auth.login failed: HTTP 401, result_code 401, result_subcode 22: Unauthorized (invalid credentials)"
        );
    }

    #[test]
    fn missing_field_names_field_and_endpoint() {
        let body =
            br#"{"meta":{"result_code":200,"result_subcode":0,"result_msg":"OK"},"data":{}}"#;
        let err = decode::<Token>("auth.login", 200, body).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("auth.login"), "{message}");
        assert!(message.contains("missing field `token`"), "{message}");
    }

    #[test]
    fn non_json_body_is_quoted_in_error() {
        let err = decode::<Token>("queues.get_all", 502, b"<html>Bad Gateway</html>").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("queues.get_all"), "{message}");
        assert!(message.contains("<html>Bad Gateway"), "{message}");
        assert!(err.is_transient());
    }

    #[test]
    fn missing_data_decodes_as_empty_object() {
        #[derive(Debug, Deserialize)]
        struct Empty {}
        let body = br#"{"meta":{"result_code":200,"result_subcode":0,"result_msg":"OK"}}"#;
        decode::<Empty>("workers.register", 200, body).unwrap();
    }
}
