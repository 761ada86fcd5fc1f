//! The command line's duration parser: any text is a duration or an error naming the units.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(message) = punctual_core::duration::parse_duration_ms(text) {
        assert!(message.contains("units are"), "{message}");
    }
});
