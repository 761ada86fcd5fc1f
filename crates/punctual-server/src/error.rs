//! The service's error type: a code and a message every front end shows, with the HTTP status
//! that classifies it (HTTP answers with it; the Redis protocol maps it to an error prefix).

use axum::http::StatusCode;
use punctual_store::StoreError;

/// An error answer: `{"error": {"code", "message"}}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Answer with `Connection: close` (the request was not read to its end).
    pub close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            close: false,
        }
    }
    /// The same error, answered with `Connection: close`.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }
    /// A refusal for want of room (memory for bodies, disk), not a fault: logged as a warning and
    /// answered with `Retry-After: 1`.
    pub fn is_overload(&self) -> bool {
        matches!(self.code, "server_busy" | "insufficient_storage")
    }
    /// A passing overload: `503 server_busy` with `Retry-After: 1`.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message)
    }
    /// Malformed JSON or an unusable request line.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// Well-formed JSON with a field of the wrong type or out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
    }
    pub fn not_found(queue: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no task {id:?} in queue {queue:?}"),
        )
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Maps a JSON decoding error: syntax errors are 400, type and range errors 422.
    pub fn from_json(error: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match error.classify() {
            Category::Data => Self::invalid(error.to_string()),
            Category::Syntax | Category::Eof | Category::Io => Self::bad_request(
                "malformed_json",
                format!("request body is not valid JSON: {error}"),
            ),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Poisoned(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_poisoned",
                error.to_string(),
            ),
            StoreError::NoSpace(_) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                error.to_string(),
            ),
            StoreError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                error.to_string(),
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                error.to_string(),
            ),
        }
    }
}
