//! Decoding request bodies into typed requests, with refusals in our words: each names the field by
//! its JSON path (`tasks[3].delay_ms`), says what was expected and gives an example.
//!
//! serde's own messages name Rust types (`expected u64`, `expected struct Webhook`); a client in PHP or
//! Python should not need to know them.

use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// What a field holds, in words, and an example; by the field's name (the last key of its path).
fn field_hint(field: &str) -> Option<(&'static str, &'static str)> {
    let ms = "a whole number of milliseconds";
    Some(match field {
        "delay_ms" => (ms, r#""delay_ms": 1800000 (30 minutes)"#),
        "lease_ms" => (ms, r#""lease_ms": 30000"#),
        "wait_ms" => (ms, r#""wait_ms": 5000"#),
        "timeout_ms" => (ms, r#""timeout_ms": 10000"#),
        "initial_ms" => (ms, r#""initial_ms": 1000"#),
        "max_ms" => (ms, r#""max_ms": 3600000"#),
        "max_attempts" => ("a whole number from 1", r#""max_attempts": 5"#),
        "max" => ("a whole number from 1", r#""max": 10"#),
        "factor" => ("a number of at least 1", r#""factor": 2"#),
        "jitter" => ("true or false", r#""jitter": true"#),
        "backoff_ms" => (
            "a list of delays in whole milliseconds",
            r#""backoff_ms": [10000, 30000, 60000]"#,
        ),
        "backoff" => (
            "an object with initial_ms, factor, max_ms and jitter (each optional)",
            r#""backoff": {"initial_ms": 1000, "factor": 2, "max_ms": 600000}"#,
        ),
        "run_at" => (
            "an RFC 3339 date-time with a zone, as a string",
            r#""run_at": "2026-12-01T15:00:00Z""#,
        ),
        "webhook" => (
            "an object with a url (and optional headers and timeout_ms)",
            r#""webhook": {"url": "https://example.com/hook"}"#,
        ),
        "url" => (
            "an http:// or https:// URL, as a string",
            r#""url": "https://example.com/hook""#,
        ),
        "headers" => (
            "an object of header names to string values",
            r#""headers": {"x-api-key": "secret"}"#,
        ),
        "id" => ("a string", r#""id": "cancel-123""#),
        "lease_token" => (
            "the lease_token string from the reserve answer",
            r#""lease_token": "3f2a…""#,
        ),
        "error" => ("a string", r#""error": "mail server said 451""#),
        "tasks" => (
            "a list of task objects",
            r#""tasks": [{"id": "a", "delay_ms": 1000}, {"id": "b", "delay_ms": 2000}]"#,
        ),
        _ => return None,
    })
}

/// The path's last key, skipping list indexes: `tasks[3].backoff_ms[1]` → `backoff_ms`.
fn last_key(path: &str) -> &str {
    let key = path.rsplit('.').next().unwrap_or(path);
    key.split('[').next().unwrap_or(key)
}

/// serde's words for a JSON value's kind, in a client's words: `string "30m"` stays as it is,
/// `map` becomes `an object`, `sequence` `a list`.
fn kind_in_words(serde_kind: &str) -> String {
    let kind = serde_kind.trim();
    match kind {
        "map" => "an object".to_owned(),
        "sequence" => "a list".to_owned(),
        "null" | "unit" => "null".to_owned(),
        _ => kind
            .replace("floating point", "the number")
            .replace("integer", "the number")
            .replace("boolean", "")
            .replace('`', "")
            .trim()
            .to_owned(),
    }
}

/// Decodes `bytes` as a `T`. `at` is the JSON path of this value inside the whole body (`""` for the
/// body itself, `tasks[3]` for a batch item); `root` says what the body itself must be, for a body of
/// the wrong kind altogether.
pub fn decode_at<T: DeserializeOwned>(bytes: &[u8], at: &str, root: &str) -> Result<T, ApiError> {
    // serde lets a struct be read from a list of its fields in order, so `[{"id": "a"}]` would be
    // refused as "[0]: expected a string"; every request here is an object, so say that instead.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let subject = if at.is_empty() {
            "the request body"
        } else {
            at
        };
        return Err(ApiError::invalid(format!(
            "{subject} must be {root}; got a list"
        )));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let inner_path = error.path().to_string();
        let path = match (at.is_empty(), inner_path.as_str()) {
            (true, ".") => String::new(),
            (true, p) => p.to_owned(),
            (false, ".") => at.to_owned(),
            (false, p) if p.starts_with('[') => format!("{at}{p}"),
            (false, p) => format!("{at}.{p}"),
        };
        refusal(error.inner(), &path, root)
    })?;
    // Anything after the value (`{} {}`) is malformed too.
    deserializer
        .end()
        .map_err(|error| refusal(&error, at, root))?;
    Ok(value)
}

fn refusal(error: &serde_json::Error, path: &str, root: &str) -> ApiError {
    use serde_json::error::Category;
    let text = error.to_string();
    // serde_json appends " at line L column C"; the path says where, better.
    let words = text
        .rfind(" at line ")
        .map_or(text.as_str(), |end| &text[..end]);
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
            "malformed_json",
            format!("request body is not valid JSON: {text}"),
        ),
        Category::Data => ApiError::invalid(data_message(words, path, root)),
    }
}

fn data_message(words: &str, path: &str, root: &str) -> String {
    let subject = if path.is_empty() {
        "the request body".to_owned()
    } else {
        path.to_owned()
    };
    // "invalid type: string \"30m\", expected u64" and "invalid value: integer `-1`, expected u64".
    let got = words
        .strip_prefix("invalid type: ")
        .or_else(|| words.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
        .map(|(got, _)| kind_in_words(got));
    if let Some(got) = got {
        if path.is_empty() {
            return format!("the request body must be {root}; got {got}");
        }
        if let Some((what, example)) = field_hint(last_key(path)) {
            return format!("{subject}: expected {what}, got {got}; for example {example}");
        }
        let expected = words.rsplit_once(", expected ").map_or("", |(_, e)| e);
        return format!("{subject}: expected {expected}, got {got}");
    }
    if let Some(rest) = words.strip_prefix("unknown field ") {
        let (field, known) = rest.split_once(", expected ").unwrap_or((rest, ""));
        // The path ends at the unknown key itself; the message is about the object holding it.
        let parent = path.rsplit_once('.').map_or("", |(parent, _)| parent);
        let holder = if parent.is_empty() {
            "the request body"
        } else {
            parent
        };
        let mut message = format!("{holder} has an unknown field {field}");
        if !known.is_empty() {
            let known = known.trim_start_matches("one of ");
            message.push_str(&format!("; the fields are {known}"));
        }
        if field == "`tasks`" && parent.is_empty() {
            message.push_str(
                "; to schedule many tasks in one request, POST {\"tasks\": [...]} to \
                 /v1/queues/{queue}/batch",
            );
        }
        return message;
    }
    if let Some(field) = words.strip_prefix("missing field ") {
        return format!("{subject}: missing field {field}");
    }
    format!("{subject}: {words}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_keys() {
        assert_eq!(last_key("tasks[3].backoff_ms[1]"), "backoff_ms");
        assert_eq!(last_key("delay_ms"), "delay_ms");
        assert_eq!(last_key("tasks[0]"), "tasks");
    }
}
