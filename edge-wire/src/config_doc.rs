//! Remote configuration documents (docs/remote-config.md): a TOML overlay
//! for one device or a group of devices, published retained on
//! `<prefix>/<device>/config` or `<prefix>/group/<group>/config`, signed
//! with Ed25519 (as model cards are) or trusted for the broker's ACL alone.
//!
//! ```text
//! u8        version (1)
//! postcard  ConfigDoc { target, id, issued_ms, toml }
//! u8        signature length: 0 (unsigned) or 64
//! [u8; n]   Ed25519 signature of every byte before the length byte
//! ```

use crate::DecodeError;
use serde::{Deserialize, Serialize};

pub const CONFIG_DOC_VERSION: u8 = 1;
/// Largest document payload.
pub const MAX_DOC_BYTES: usize = 64 * 1024;
/// Longest id, in bytes.
pub const MAX_ID: usize = 64;

/// One configuration document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDoc {
    /// Whom it is for: `device:<id>` or `group:<name>`. A device takes only
    /// documents for itself or its groups, whatever topic they came on.
    pub target: String,
    /// The operator's name for this version (audited, in the metrics).
    pub id: String,
    /// When it was made (ms since the epoch): a device never goes back to
    /// an older document of the same target.
    pub issued_ms: i64,
    /// The overlay: TOML of the sections it changes.
    pub toml: String,
}

/// A document as received: its fields, and what its signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub doc: ConfigDoc,
    pub signed: Vec<u8>,
    pub signature: Option<[u8; 64]>,
}

impl ConfigDoc {
    /// The unsigned payload.
    pub fn encode_unsigned(&self) -> Vec<u8> {
        let mut out = self.body();
        out.push(0);
        out
    }

    /// The payload signed with the Ed25519 key in `pkcs8` (DER, as
    /// `openssl genpkey -algorithm ed25519` makes it).
    pub fn encode_signed(&self, pkcs8: &[u8]) -> Result<Vec<u8>, String> {
        let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| format!("not an Ed25519 private key: {e}"))?;
        let mut out = self.body();
        let sig = key.sign(&out);
        out.push(64);
        out.extend_from_slice(sig.as_ref());
        Ok(out)
    }

    fn body(&self) -> Vec<u8> {
        let mut out = vec![CONFIG_DOC_VERSION];
        // Serializing strings and numbers to a Vec cannot fail.
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes a payload (the signature is not checked here: [`Received::verify`]).
    pub fn decode(payload: &[u8]) -> Result<Received, DecodeError> {
        if payload.len() > MAX_DOC_BYTES {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        let body = crate::versioned(payload, "config document", CONFIG_DOC_VERSION)?;
        let bad = |reason: String| DecodeError::Malformed { what: "config document", reason };
        let (doc, rest): (ConfigDoc, _) = postcard::take_from_bytes(body).map_err(|e| bad(e.to_string()))?;
        let signed = payload[..payload.len() - rest.len()].to_vec();
        let signature = match rest {
            [0] => None,
            [64, sig @ ..] if sig.len() == 64 => Some(sig.try_into().map_err(|_| bad("signature".into()))?),
            _ => return Err(bad("the signature must be 0 or 64 bytes, and last".into())),
        };
        let target_ok = match doc.target.split_once(':') {
            Some(("device", id)) => crate::validate_device_id(id).is_ok(),
            Some(("group", g)) => is_group(g),
            _ => false,
        };
        if !target_ok {
            return Err(bad(format!("target {:?} is not device:<id> or group:<name>", doc.target)));
        }
        if doc.id.is_empty() || doc.id.len() > MAX_ID || doc.id.chars().any(char::is_control) {
            return Err(bad(format!("id must be 1..={MAX_ID} bytes of printable text")));
        }
        Ok(Received { doc, signed, signature })
    }
}

impl Received {
    /// Whether the signature verifies with the Ed25519 public key `key`
    /// (32 bytes).
    pub fn verify(&self, key: &[u8]) -> Result<(), String> {
        let sig = self.signature.ok_or("the document is not signed, and remote_config.public_key_file is set")?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&self.signed, &sig)
            .map_err(|_| "the document's signature does not verify with remote_config.public_key_file".to_string())
    }
}

/// A group name: as a device id (it is a topic level).
pub fn is_group(name: &str) -> bool {
    crate::validate_device_id(name).is_ok()
}

/// `<prefix>/<device>/config`.
pub fn device_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/config")
}

/// `<prefix>/group/<group>/config`.
pub fn group_topic(prefix: &str, group: &str) -> String {
    format!("{prefix}/group/{group}/config")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> ConfigDoc {
        ConfigDoc {
            target: "group:line-1".into(),
            id: "probes-v2".into(),
            issued_ms: 1_780_000_000_000,
            toml: "[probes.devices]\nenabled = false\n".into(),
        }
    }

    #[test]
    fn documents_round_trip_and_signatures_bind_every_field() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
        let signed = doc().encode_signed(pkcs8.as_ref()).unwrap();
        let r = ConfigDoc::decode(&signed).unwrap();
        assert_eq!(r.doc, doc());
        r.verify(&public).unwrap();
        // Any byte changed: refused or not verified.
        for i in 1..signed.len() - 64 {
            let mut bad = signed.clone();
            bad[i] ^= 1;
            assert!(
                ConfigDoc::decode(&bad).and_then(|r| r.verify(&public).map_err(DecodeError::Invalid)).is_err(),
                "byte {i}"
            );
        }
        let unsigned = ConfigDoc::decode(&doc().encode_unsigned()).unwrap();
        assert!(unsigned.signature.is_none() && unsigned.verify(&public).is_err());
        let mut other = doc();
        other.target = "everyone".into();
        assert!(ConfigDoc::decode(&other.encode_unsigned()).is_err());
        assert!(ConfigDoc::decode(&doc().encode_unsigned()[..10]).is_err());
    }
}
