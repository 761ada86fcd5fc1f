//! The stored record format and the distributed mode's notices: bad bytes are errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = punctual_store::fuzzing::decode_record(bytes);
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = punctual_store::fuzzing::decode_notice(text);
    }
});
