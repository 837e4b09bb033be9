//! User data rendered from a template with `{{name}}` placeholders and base64-encoded for RunInstances.

use std::collections::BTreeMap;

use base64::Engine;

/// Raw user data EC2 accepts, before base64 encoding: 16 KB.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// Replaces every `{{name}}` in `template` with `vars[name]` and returns the result base64-encoded.
///
/// Whitespace inside the braces is ignored (`{{ queue }}` works). A placeholder without a value is an error,
/// so a typo never reaches an instance as literal braces.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let rendered = render_text(template, vars)?;
    if rendered.len() > MAX_USER_DATA_BYTES {
        return Err(format!(
            "rendered user data is {} bytes; EC2 accepts at most {MAX_USER_DATA_BYTES} bytes before base64 encoding",
            rendered.len()
        ));
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(rendered))
}

/// Replaces every `{{name}}` in `template` with `vars[name]`, with the rules of [`render`], and returns the
/// text as it is.
pub fn render_text(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;

    while let Some(start) = rest.find("{{") {
        rendered.push_str(&rest[..start]);
        let after_open = &rest[start + 2..];
        let Some(end) = after_open.find("}}") else {
            return Err(format!(
                "unclosed placeholder at byte {} of the template; close it with }}}}",
                template.len() - rest.len() + start
            ));
        };
        let name = after_open[..end].trim();
        let Some(value) = vars.get(name) else {
            let known: Vec<&str> = vars.keys().map(String::as_str).collect();
            return Err(format!(
                "placeholder {{{{{name}}}}} has no value; known placeholders: {}",
                known.join(", ")
            ));
        };
        rendered.push_str(value);
        rest = &after_open[end + 2..];
    }
    rendered.push_str(rest);
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(encoded: &str) -> String {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("render returns valid base64");
        String::from_utf8(bytes).expect("rendered template is UTF-8")
    }

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("queue".to_owned(), "gpu".to_owned()),
            ("cluster".to_owned(), "prod".to_owned()),
        ])
    }

    #[test]
    fn placeholders_are_replaced() {
        let encoded = render("#!/bin/sh\necho {{queue}} {{ cluster }}\n", &vars()).unwrap();
        assert_eq!(decode(&encoded), "#!/bin/sh\necho gpu prod\n");
    }

    #[test]
    fn unknown_placeholder_is_named() {
        let error = render("{{queue}} {{region}}", &vars()).unwrap_err();
        assert!(error.contains("{{region}} has no value"), "{error}");
    }

    #[test]
    fn unclosed_placeholder_is_rejected() {
        let error = render("echo {{queue", &vars()).unwrap_err();
        assert!(error.contains("unclosed placeholder at byte 5"), "{error}");
    }

    #[test]
    fn oversized_user_data_is_rejected() {
        let template = "x".repeat(MAX_USER_DATA_BYTES + 1);
        let error = render(&template, &vars()).unwrap_err();
        assert!(error.contains("16384"), "{error}");
    }
}
