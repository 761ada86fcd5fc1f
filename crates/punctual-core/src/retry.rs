//! Retry policies: how long to wait before the next attempt after a failed one.

/// The delay schedule between attempts of one task.
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// An explicit ladder: the delay after failed attempt `n` is `steps_ms[n - 1]`; the last step repeats.
    Ladder { steps_ms: Vec<u64> },
    /// `initial_ms * factor^(n - 1)` after failed attempt `n`, capped at `max_ms`.
    /// With `jitter`, the delay is drawn from `[d/2, d]` ("equal jitter") so that tasks that failed together
    /// do not all come back in the same millisecond.
    Exponential {
        initial_ms: u64,
        factor: f64,
        max_ms: u64,
        jitter: bool,
    },
}

impl Default for Backoff {
    /// 1 s, 2 s, 4 s, … capped at 5 minutes, with jitter.
    fn default() -> Self {
        Backoff::Exponential {
            initial_ms: 1_000,
            factor: 2.0,
            max_ms: 300_000,
            jitter: true,
        }
    }
}

impl Backoff {
    /// The delay before the attempt that follows failed attempt `failed_attempt` (1-based).
    ///
    /// `jitter_seed` makes the jitter deterministic: the caller derives it from the task and attempt,
    /// so the same inputs always give the same delay (which keeps this function pure and testable).
    pub fn delay_ms(&self, failed_attempt: u32, jitter_seed: u64) -> u64 {
        let n = failed_attempt.max(1);
        match self {
            Backoff::Ladder { steps_ms } => match steps_ms.len() {
                0 => 0,
                len => steps_ms[(n as usize - 1).min(len - 1)],
            },
            Backoff::Exponential {
                initial_ms,
                factor,
                max_ms,
                jitter,
            } => {
                let exponent = i32::try_from(n - 1).unwrap_or(i32::MAX);
                let raw = (*initial_ms as f64) * factor.powi(exponent);
                let delay = if raw.is_finite() && raw < *max_ms as f64 {
                    raw as u64
                } else {
                    *max_ms
                };
                if *jitter && delay > 1 {
                    let half = delay / 2;
                    half + jitter_seed % (delay - half + 1)
                } else {
                    delay
                }
            }
        }
    }

    /// Checks the policy's own numbers; the message names the offending field.
    pub fn validate(&self, max_delay_ms: u64) -> Result<(), String> {
        match self {
            Backoff::Ladder { steps_ms } => {
                // An empty ladder is refused rather than read as "retry at once": a client that sends
                // [] most likely meant "no retries", which is max_attempts 1.
                if steps_ms.is_empty() {
                    return Err(
                        "backoff_ms needs at least one step: [0] retries at once, and \
                                max_attempts: 1 means no retries"
                            .into(),
                    );
                }
                if steps_ms.len() > 100 {
                    return Err("backoff_ms has more than 100 steps".into());
                }
                if let Some(step) = steps_ms.iter().find(|s| **s > max_delay_ms) {
                    return Err(format!(
                        "backoff_ms step {step} exceeds the maximum delay of {max_delay_ms} ms"
                    ));
                }
                Ok(())
            }
            Backoff::Exponential {
                initial_ms,
                factor,
                max_ms,
                ..
            } => {
                if !factor.is_finite() || *factor < 1.0 || *factor > 100.0 {
                    return Err("backoff.factor must be between 1 and 100".into());
                }
                if *initial_ms > *max_ms {
                    return Err("backoff.initial_ms must not exceed backoff.max_ms".into());
                }
                if *max_ms > max_delay_ms {
                    return Err(format!(
                        "backoff.max_ms exceeds the maximum delay of {max_delay_ms} ms"
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_repeats_its_last_step() {
        let ladder = Backoff::Ladder {
            steps_ms: vec![10_000, 30_000, 60_000, 120_000, 300_000],
        };
        let delays: Vec<u64> = (1..=7).map(|n| ladder.delay_ms(n, 0)).collect();
        assert_eq!(
            delays,
            [10_000, 30_000, 60_000, 120_000, 300_000, 300_000, 300_000]
        );
        assert_eq!(Backoff::Ladder { steps_ms: vec![] }.delay_ms(3, 0), 0);
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let exp = Backoff::Exponential {
            initial_ms: 100,
            factor: 2.0,
            max_ms: 1_000,
            jitter: false,
        };
        let delays: Vec<u64> = (1..=6).map(|n| exp.delay_ms(n, 0)).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(exp.delay_ms(u32::MAX, 0), 1_000);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let exp = Backoff::default();
        for seed in [0, 1, 7, u64::MAX, 123_456_789] {
            let d = exp.delay_ms(3, seed);
            assert!((2_000..=4_000).contains(&d), "{d}");
        }
        assert_ne!(exp.delay_ms(3, 1), exp.delay_ms(3, 2));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = Backoff::Exponential {
            initial_ms: 10,
            factor: 0.5,
            max_ms: 100,
            jitter: false,
        };
        assert!(bad.validate(u64::MAX).unwrap_err().contains("factor"));
        let long = Backoff::Ladder {
            steps_ms: vec![5, 10],
        };
        assert!(long.validate(7).unwrap_err().contains("backoff_ms"));
        let empty = Backoff::Ladder { steps_ms: vec![] };
        assert!(empty.validate(7).unwrap_err().contains("max_attempts: 1"));
    }
}
