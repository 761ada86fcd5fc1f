//! The RFC 3339 parser (a remote panic once): any text is a time or an error, and a parsed time
//! formats back to the same instant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use punctual_core::time::{format_rfc3339_ms, parse_rfc3339_ms};

fuzz_target!(|text: &str| {
    if let Ok(ms) = parse_rfc3339_ms(text) {
        assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Ok(ms));
    }
    let _ = punctual_core::time::parse_http_date_ms(text);
});
