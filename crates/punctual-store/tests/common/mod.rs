//! What the conformance tests of every backend share.

use proptest::prelude::*;
use punctual_store::conformance::Step;

/// One step of a generated workload (see `conformance::compare_with_oracle`).
pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<u8>(), 0u16..600, any::<u8>()).prop_map(|(id, delay_ms, max_attempts)| {
            Step::Schedule {
                id,
                delay_ms,
                max_attempts,
            }
        }),
        any::<u8>().prop_map(|max| Step::Reserve { max }),
        (any::<u8>(), any::<u8>()).prop_map(|(nth, how)| Step::Settle { nth, how }),
        any::<u8>().prop_map(|id| Step::Cancel { id }),
        (any::<u8>(), 0u16..600).prop_map(|(id, delay_ms)| Step::Reschedule { id, delay_ms }),
        any::<u8>().prop_map(|id| Step::Retry { id }),
        (0u16..400).prop_map(|ms| Step::Advance { ms }),
    ]
}
