//! `fleet-bridge certificates sign`: the devices' certificate requests
//! answered (docs/configuration.md, "Certificate renewal"). An agent whose
//! client certificate nears its expiry makes a new key and publishes a
//! request for its own name, retained, on `<prefix>/<device>/csr` (the
//! broker's ACL lets a device publish there only under its own name).
//! This command, run by an operator or a timer with the fleet's device CA,
//! reads every retained request, checks it (a valid device id, never a
//! central identity's `fleet-` name; its signature; CN = the device of its
//! topic), and publishes a certificate for the request's key,
//! retained, on `<prefix>/<device>/certificate`. Only the key is taken from
//! the request: the name, the validity and the usage (client
//! authentication, not a CA) are the authority's. A request already
//! answered (the retained certificate is for its key) is not signed again.
//! Every decision is printed and appended to
//! `<audit.dir>/certificates-<YYYY-MM-DD>.jsonl`.

use crate::config::Config;
use crate::operator::Operator;
use std::path::Path;
use std::time::Duration;

/// The fleet's device CA, signing.
pub struct Authority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    days: u32,
}

/// What became of one device's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new certificate (PEM) for it.
    Signed(String),
    /// The retained certificate is already for its key.
    Answered,
    /// Not signed, and why.
    Refused(String),
}

impl Authority {
    /// The CA's certificate and key (PEM; the key PKCS#8, as
    /// scripts/fleet-certs.sh makes it); certificates valid `days`.
    pub fn load(ca_cert: &Path, ca_key: &Path, days: u32) -> Result<Authority, String> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
        let key = rcgen::KeyPair::from_pem(&read(ca_key)?)
            .map_err(|e| format!("{}: not a usable private key: {e}", ca_key.display()))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&read(ca_cert)?, key)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca_cert.display()))?;
        if days == 0 {
            return Err("--days must be at least 1".into());
        }
        Ok(Authority { issuer, days })
    }

    /// The decision on `device`'s request `csr_pem`, given the certificate
    /// retained for it now (if any); `now_secs` starts the validity (an
    /// hour before it: boxes' clocks differ).
    pub fn decide(&self, device: &str, csr_pem: &[u8], retained: Option<&[u8]>, now_secs: i64) -> Decision {
        // A central identity's name ("fleet-admin") from the fleet CA would
        // be an operator on a NATS node's MQTT listener, which trusts both
        // CAs (docs/scaling.md): never signed, whoever could publish the
        // request.
        if let Err(e) = edge_wire::validate_device_id(device) {
            return Decision::Refused(e);
        }
        let Ok(text) = std::str::from_utf8(csr_pem) else { return Decision::Refused("not PEM text".into()) };
        // Parsing checks the request's own signature.
        let req = match rcgen::CertificateSigningRequestParams::from_pem(text) {
            Ok(r) => r,
            Err(e) => return Decision::Refused(format!("not a valid certificate request: {e}")),
        };
        let cn = req.params.distinguished_name.get(&rcgen::DnType::CommonName);
        let named = match cn {
            Some(rcgen::DnValue::Utf8String(s)) => s == device,
            Some(rcgen::DnValue::PrintableString(s)) => s.as_str() == device,
            _ => false,
        };
        if !named {
            return Decision::Refused(format!("the request names {cn:?}, not CN={device} (its topic's device)"));
        }
        use rcgen::PublicKeyData;
        if retained.and_then(|c| edge_wire::tls::certificate_public_key(c).ok()).as_deref()
            == Some(req.public_key.der_bytes())
        {
            return Decision::Answered;
        }
        match self.certificate(device, &req.public_key, now_secs) {
            Ok(pem) => Decision::Signed(pem),
            Err(e) => Decision::Refused(format!("cannot sign: {e}")),
        }
    }

    fn certificate(&self, device: &str, key: &rcgen::PublicKey, now_secs: i64) -> Result<String, rcgen::Error> {
        let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, device);
        params.not_before = at(now_secs - 3600);
        params.not_after = at(now_secs + i64::from(self.days) * 86_400);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // Unique per certificate (two for one key, e.g. after a request
        // was cleared and made again, differ).
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| rcgen::Error::RingUnspecified)?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }
}

/// The device of a request topic `<prefix>/<device>/csr`.
fn device_of<'a>(prefix: &str, topic: &'a str) -> Option<&'a str> {
    let device = topic.strip_prefix(prefix)?.strip_prefix('/')?.strip_suffix("/csr")?;
    (!device.is_empty() && !device.contains('/')).then_some(device)
}

/// What a run did, by decision.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub signed: usize,
    pub answered: usize,
    pub refused: usize,
}

/// Reads every retained request and answers it (see the module's text).
pub fn run(cfg: &Config, authority: &Authority) -> Result<Summary, String> {
    std::fs::create_dir_all(&cfg.audit.dir).map_err(|e| format!("{}: {e}", cfg.audit.dir.display()))?;
    let log = cfg.audit.dir.join(format!("certificates-{}.jsonl", crate::audit::day(crate::now_ms())));
    let prefix = &cfg.mqtt.topic_prefix;
    let mut op = Operator::connect(cfg, "certificates")?;
    let quiet = Duration::from_secs(1);
    let requests = op.retained_all(&edge_wire::certificate_request_topic(prefix, "+"), quiet)?;
    let answers = op.retained_all(&edge_wire::certificate_topic(prefix, "+"), quiet)?;
    let mut summary = Summary::default();
    for (topic, csr) in requests.iter().filter(|(_, p)| !p.is_empty()) {
        let Some(device) = device_of(prefix, topic) else { continue };
        let answer_topic = edge_wire::certificate_topic(prefix, device);
        let retained = answers.iter().find(|(t, _)| *t == answer_topic).map(|(_, p)| p.as_slice());
        let (step, detail) = match authority.decide(device, csr, retained, crate::now_ms() / 1000) {
            Decision::Signed(pem) => {
                op.publish(&answer_topic, pem.into_bytes())?;
                summary.signed += 1;
                ("signed", format!("valid {} days, published on {answer_topic}", authority.days))
            }
            Decision::Answered => {
                summary.answered += 1;
                ("answered", "the certificate retained is for this request's key".into())
            }
            Decision::Refused(why) => {
                summary.refused += 1;
                ("refused", why)
            }
        };
        println!("certificates: {step} device:{device}: {detail}");
        let line = serde_json::json!({
            "time_ms": crate::now_ms(), "step": step, "device": device, "detail": detail,
        });
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|_| f.sync_data()));
        if let Err(e) = r {
            eprintln!("certificates: cannot append to {}: {e}", log.display());
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(dir: &Path) -> Authority {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.distinguished_name.push(rcgen::DnType::CommonName, "edge fleet CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let cert = ca.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        Authority::load(&dir.join("ca.crt"), &dir.join("ca.key"), 365).unwrap()
    }

    fn request(cn: &str) -> (rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        // What a device cannot get however it asks.
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn a_request_gets_a_client_certificate_for_its_own_name_and_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let (key, csr) = request("press-7");
        let now = 1_800_000_000;
        let Decision::Signed(pem) = ca.decide("press-7", csr.as_bytes(), None, now) else { panic!() };
        // Chains to the CA, for client use, CN press-7, for the request's key.
        let (cert, keyf) = (dir.path().join("d.crt"), dir.path().join("d.key"));
        std::fs::write(&cert, &pem).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        let expiry =
            edge_wire::tls::check_client_identity(&dir.path().join("ca.crt"), &cert, &keyf, "press-7", now as u64)
                .unwrap();
        assert_eq!(expiry, now + 365 * 86_400);
        // Not a CA, whatever the request asked.
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!parsed.is_ca());
        assert!(parsed.extended_key_usage().unwrap().unwrap().value.client_auth);
        // Answered once: the same request with that certificate retained.
        assert_eq!(ca.decide("press-7", csr.as_bytes(), Some(pem.as_bytes()), now), Decision::Answered);
        // Another device's name, or garbage: refused.
        let Decision::Refused(why) = ca.decide("press-8", csr.as_bytes(), None, now) else { panic!() };
        assert!(why.contains("not CN=press-8"), "{why}");
        assert!(matches!(
            ca.decide("press-7", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", None, now),
            Decision::Refused(_)
        ));
    }

    /// A request on `<prefix>/fleet-admin/csr` naming itself fleet-admin
    /// (only a client with that user name could publish it) is refused: a
    /// fleet-CA certificate with a central identity's name is an operator
    /// wherever a listener trusts both CAs.
    #[test]
    fn a_central_identity_name_is_never_signed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        for name in ["fleet-admin", "fleet-bridge", "FLEET-x"] {
            let (_, csr) = request(name);
            let Decision::Refused(why) = ca.decide(name, csr.as_bytes(), None, 1_800_000_000) else {
                panic!("{name} signed")
            };
            assert!(why.contains("reserved"), "{why}");
        }
    }

    #[test]
    fn request_topics_name_one_device() {
        assert_eq!(device_of("edge", "edge/press-7/csr"), Some("press-7"));
        assert_eq!(device_of("edge", "edge/a/b/csr"), None);
        assert_eq!(device_of("edge", "edge//csr"), None);
        assert_eq!(device_of("edge", "other/press-7/csr"), None);
    }
}
