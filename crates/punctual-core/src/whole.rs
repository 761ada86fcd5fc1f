//! Whole numbers in JSON requests: an integer, or a number without a fraction (`1800000.0`, as
//! PHP's and Python's encoders write a float), which JSON Schema also counts as an integer. Used with
//! `#[serde(default, deserialize_with = "whole::opt_u64")]` on request fields; anything else (a
//! fraction, a negative number, a string) is refused as "expected a whole number".

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// A whole number from JSON.
struct Whole(u64);

struct WholeVisitor;

impl<'de> Visitor<'de> for WholeVisitor {
    type Value = Whole;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Whole, E> {
        Ok(Whole(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Whole, E> {
        u64::try_from(v)
            .map(Whole)
            .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Whole, E> {
        // 2^64 is exactly representable; every f64 below it with no fraction fits a u64.
        if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
            Ok(Whole(v as u64))
        } else {
            Err(E::invalid_type(Unexpected::Float(v), &self))
        }
    }
}

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WholeVisitor)
    }
}

fn narrow<T: TryFrom<u64>, E: de::Error>(v: u64) -> Result<T, E> {
    T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &"a smaller whole number"))
}

pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Whole::deserialize(d)?.0)
}

pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Whole>::deserialize(d)?.map(|w| w.0))
}

pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Option::<Whole>::deserialize(d)?
        .map(|w| narrow(w.0))
        .transpose()
}

pub fn opt_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    Option::<Whole>::deserialize(d)?
        .map(|w| narrow(w.0))
        .transpose()
}

pub fn opt_vec_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u64>>, D::Error> {
    Ok(Option::<Vec<Whole>>::deserialize(d)?.map(|v| v.into_iter().map(|w| w.0).collect()))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(default, deserialize_with = "super::opt_u64")]
        a: Option<u64>,
        #[serde(default, deserialize_with = "super::opt_u32")]
        b: Option<u32>,
        #[serde(default, deserialize_with = "super::opt_vec_u64")]
        c: Option<Vec<u64>>,
    }

    fn parse(text: &str) -> Result<T, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn integers_and_floats_without_a_fraction_are_whole() {
        assert_eq!(
            parse(r#"{"a": 1800000.0, "b": 3, "c": [10000, 30000.0]}"#).unwrap(),
            T {
                a: Some(1_800_000),
                b: Some(3),
                c: Some(vec![10_000, 30_000])
            }
        );
        assert_eq!(
            parse(r#"{"a": null}"#).unwrap(),
            T {
                a: None,
                b: None,
                c: None
            }
        );
        for (bad, says) in [
            (
                r#"{"a": 1.5}"#,
                "floating point `1.5`, expected a whole number",
            ),
            (r#"{"a": -1}"#, "integer `-1`, expected a whole number"),
            (r#"{"a": "30m"}"#, "string \"30m\", expected a whole number"),
            (r#"{"a": 1e300}"#, "expected a whole number"),
            (r#"{"b": 4294967296}"#, "expected a smaller whole number"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
