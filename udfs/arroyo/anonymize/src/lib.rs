//! `anonymize(value, key)`: the keyed pseudonym ebb's filter gives an identifier
//! (HMAC-SHA256, first 128 bits in hex), for Arroyo pipelines.

use arroyo_udf_plugin::udf;

/// The pseudonym of `value` under `key`.
#[udf]
fn anonymize(value: &str, key: &str) -> String {
    ebb_udf_core::anonymize(key.as_bytes(), value)
}
