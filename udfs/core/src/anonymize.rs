//! Keyed pseudonymisation of identifiers.
//!
//! A keyed hash (HMAC-SHA256), not a plain hash: instance ids, IPs and user ids come from
//! small, guessable spaces, so an unkeyed hash would be reversed by a dictionary in seconds.
//! The same key gives the same pseudonym, so joins and per-instance views still work.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Hex characters kept from the MAC: 128 bits, far beyond collision range for any fleet.
pub const PSEUDONYM_HEX_LEN: usize = 32;

/// A keyed hasher, built once so the key schedule is not redone per value.
#[derive(Clone)]
pub struct Anonymizer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Anonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, not even derived state.
        f.write_str("Anonymizer { key: <redacted> }")
    }
}

impl Anonymizer {
    /// Builds an anonymizer from a secret key of any length.
    pub fn new(key: &[u8]) -> Self {
        // HMAC accepts keys of every length (long ones are hashed first), so this cannot fail.
        let mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
        };
        Self { mac }
    }

    /// The pseudonym of `value`: the first 128 bits of HMAC-SHA256(key, value), in hex.
    pub fn hash(&self, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        hex::encode(&digest[..PSEUDONYM_HEX_LEN / 2])
    }
}

/// The pseudonym of `value` under `key` (see [`Anonymizer::hash`]).
pub fn anonymize(key: &[u8], value: &str) -> String {
    Anonymizer::new(key).hash(value)
}

/// Zeroes the host part of an IP address, keeping a network prefix (e.g. /24, /48), and
/// returns it in CIDR notation. Prefix lengths beyond the address width keep the whole address.
pub fn truncate_ip(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let prefix = v4_prefix.min(32);
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            let net = std::net::Ipv4Addr::from(u32::from(v4) & mask);
            format!("{net}/{prefix}")
        }
        IpAddr::V6(v6) => {
            let prefix = v6_prefix.min(128);
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            let net = std::net::Ipv6Addr::from(u128::from(v6) & mask);
            format!("{net}/{prefix}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_pseudonym_and_different_key_different_pseudonym() {
        let a = Anonymizer::new(b"key-one");
        let b = Anonymizer::new(b"key-two");
        assert_eq!(a.hash("i-0abc"), a.hash("i-0abc"));
        assert_ne!(a.hash("i-0abc"), b.hash("i-0abc"));
        assert_ne!(a.hash("i-0abc"), a.hash("i-0abd"));
        assert_eq!(a.hash("x").len(), PSEUDONYM_HEX_LEN);
    }

    #[test]
    fn matches_rfc4231_test_vector_prefix() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let got = anonymize(b"Jefe", "what do ya want for nothing?");
        assert_eq!(got, "5bdcc146bf60754e6a042426089575c7");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let shown = format!("{:?}", Anonymizer::new(b"super-secret"));
        assert!(!shown.contains("super-secret"));
    }

    #[test]
    fn truncates_ipv4_and_ipv6_to_their_prefix() {
        let v4: IpAddr = "203.0.113.77".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(truncate_ip(v4, 24, 48), "203.0.113.0/24");
        assert_eq!(truncate_ip(v4, 0, 48), "0.0.0.0/0");
        assert_eq!(truncate_ip(v4, 40, 48), "203.0.113.77/32");
        let v6: IpAddr = "2001:db8:abcd:12:1:2:3:4"
            .parse()
            .unwrap_or(IpAddr::from([0u16; 8]));
        assert_eq!(truncate_ip(v6, 24, 48), "2001:db8:abcd::/48");
    }
}
