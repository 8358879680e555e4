//! Client certificate renewal over the uplink (docs/configuration.md,
//! "Certificate renewal"). The private key never leaves the box: when the
//! client certificate expires within `mqtt.renew_certificate_days`, the
//! agent makes a new key (ECDSA P-256) and a certificate signing request
//! for its own name (CN = `device_id`), keeps both in `<state_dir>/tls/`
//! (`request.key`, mode 0600, and `request.csr`) and publishes the request,
//! retained, on `<prefix>/<device>/csr`. An operator signs it with the
//! fleet's CA (`fleet-bridge certificates sign`), which publishes the
//! certificate, retained, on `<prefix>/<device>/certificate`. A certificate
//! that fits the waiting key goes, with the key, into the drop directory of
//! a rotation (rotation.rs): checked against the CA, tried on the next
//! connection, installed only if the broker takes it. Any other message
//! there (an answer to an earlier request, one for another key, not a
//! certificate) is ignored and counted.
//!
//! The request is made once: it stays until a certificate for it comes,
//! and is published (retained) once a connection has had a block
//! confirmed, again at most once an hour (an older broker ACL that refuses
//! it ends the connection: the data goes first). After a certificate came
//! the retained request is cleared (an empty retained message). A rotation that refuses
//! the delivered certificate leaves the box without a request, and the next
//! connection attempt makes a new one.

use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::ResultLabels;

/// The waiting request's files, in `<state_dir>/tls/`.
pub const REQUEST_KEY: &str = "request.key";
pub const REQUEST_CSR: &str = "request.csr";
/// A request answered, its retained message not yet cleared.
pub const ANSWERED: &str = "request.answered";
/// Largest certificate message taken (a chain of a few certificates).
pub const MAX_CERTIFICATE_BYTES: usize = 64 * 1024;
/// A request is published again (retained already) at most this often: a
/// broker that refuses it ends the connection each time.
pub const REPUBLISH: std::time::Duration = std::time::Duration::from_secs(3600);

pub struct Renewal {
    dir: PathBuf,
    drop_dir: PathBuf,
    device_id: String,
    /// Renew when the certificate expires within this (s); 0: never.
    before_secs: i64,
    /// When the waiting request was last published (this run).
    published_at: Option<std::time::Instant>,
    /// The audit trail each step also goes to.
    pub trail: Option<std::sync::Arc<crate::audit::Audit>>,
    results: Family<ResultLabels, Counter>,
}

/// What the uplink publishes on the request topic at a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// The waiting request (PEM), retained.
    Request(Vec<u8>),
    /// An empty retained message: the answered request is cleared.
    Clear,
}

impl Renewal {
    pub fn new(state_dir: &Path, device_id: &str, renew_days: u32, results: Family<ResultLabels, Counter>) -> Renewal {
        Renewal {
            dir: state_dir.join("tls"),
            drop_dir: state_dir.join("tls-drop"),
            device_id: device_id.to_owned(),
            before_secs: i64::from(renew_days) * 86_400,
            published_at: None,
            trail: None,
            results,
        }
    }

    /// Whether a request waits for its certificate.
    pub fn waiting(&self) -> bool {
        self.dir.join(REQUEST_KEY).exists() && self.dir.join(REQUEST_CSR).exists()
    }

    /// Called with the client certificate's expiry at every connection
    /// attempt: makes a request when the certificate is due for renewal and
    /// none waits (nor a delivered certificate in the drop directory).
    pub fn check(&mut self, expiry: i64, now: i64) {
        if self.before_secs == 0 || expiry - now >= self.before_secs || self.waiting() {
            return;
        }
        if self.drop_dir.join(super::rotation::CANDIDATE_CERT).exists() {
            return; // a certificate is in the drop directory: the rotation's
        }
        match self.make_request() {
            Ok(()) => {
                self.step(
                    "requested",
                    &format!("the certificate expires in {} days: a new key and request made", (expiry - now) / 86_400),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %self.dir.display(), "cannot make a certificate request");
                self.count("not_requested");
            }
        }
    }

    /// A new key and a request for CN = device_id: the key first (synced),
    /// then the request; a crash between leaves a key alone, replaced next
    /// time.
    fn make_request(&self) -> Result<(), String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, self.device_id.as_str());
        let csr = params.serialize_request(&key).map_err(|e| e.to_string())?.pem().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        write_synced(&self.dir, REQUEST_KEY, key.serialize_pem().as_bytes(), 0o600).map_err(|e| e.to_string())?;
        write_synced(&self.dir, REQUEST_CSR, csr.as_bytes(), 0o644).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// What to publish on the request topic on a connection made at
    /// `now`, if anything: the waiting request (unless published within
    /// [`REPUBLISH`]), or the clearing of an answered one.
    pub fn to_publish(&self, now: std::time::Instant) -> Option<Publish> {
        if self.waiting() {
            if self.published_at.is_some_and(|t| now.saturating_duration_since(t) < REPUBLISH) {
                return None;
            }
            return std::fs::read(self.dir.join(REQUEST_CSR)).ok().map(Publish::Request);
        }
        self.dir.join(ANSWERED).exists().then_some(Publish::Clear)
    }

    /// The request was published, or (`cleared`) the answered one's
    /// retained message cleared.
    pub fn published(&mut self, cleared: bool, now: std::time::Instant) {
        if cleared {
            let _ = std::fs::remove_file(self.dir.join(ANSWERED));
        } else {
            self.published_at = Some(now);
        }
    }

    /// A message on the certificate topic. A certificate (chain, PEM) that
    /// fits the waiting key goes with it into the drop directory (the
    /// certificate last: the rotation starts from it); anything else is
    /// ignored. Returns whether it was taken.
    pub fn certificate(&mut self, payload: &[u8]) -> bool {
        match self.take(payload) {
            Ok(()) => {
                self.step("delivered", "a certificate for the waiting request: into the drop directory, to be tried");
                true
            }
            Err(why) => {
                // A retained answer to an earlier request comes with every
                // connection: said at debug only.
                tracing::debug!(why, "certificate message ignored");
                self.count("ignored");
                false
            }
        }
    }

    fn take(&self, payload: &[u8]) -> Result<(), String> {
        if payload.is_empty() {
            return Err("empty".into());
        }
        if payload.len() > MAX_CERTIFICATE_BYTES {
            return Err(format!("{} bytes, more than {MAX_CERTIFICATE_BYTES}", payload.len()));
        }
        if !self.waiting() {
            return Err("no request waits".into());
        }
        let key = std::fs::read(self.dir.join(REQUEST_KEY)).map_err(|e| e.to_string())?;
        edge_wire::tls::key_fits(payload, &key).map_err(|e| format!("not for the waiting key: {e}"))?;
        std::fs::create_dir_all(&self.drop_dir).map_err(|e| e.to_string())?;
        write_synced(&self.drop_dir, super::rotation::CANDIDATE_KEY, &key, 0o600).map_err(|e| e.to_string())?;
        write_synced(&self.drop_dir, super::rotation::CANDIDATE_CERT, payload, 0o644).map_err(|e| e.to_string())?;
        // The request is answered: its retained message is cleared at the
        // next connection.
        std::fs::rename(self.dir.join(REQUEST_CSR), self.dir.join(ANSWERED)).map_err(|e| e.to_string())?;
        std::fs::remove_file(self.dir.join(REQUEST_KEY)).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// A step: audited, then counted (the count says it is done).
    fn step(&self, result: &str, detail: &str) {
        tracing::warn!(target: "edge_agent::audit", result, detail, "certificate renewal");
        if let Some(trail) = &self.trail {
            trail.record(&format!("certificate_{result}"), &[("detail", detail.to_owned())]);
        }
        self.count(result);
    }

    fn count(&self, result: &str) {
        self.results.get_or_create(&ResultLabels { result: result.into() }).inc();
    }
}

/// `name` in `dir`, whole or not at all: written beside it, synced, renamed.
fn write_synced(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renewal(dir: &Path, days: u32) -> Renewal {
        Renewal::new(dir, "press-7", days, Family::default())
    }

    fn sign(csr_pem: &[u8], cn: &str) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        // The request's public key, in a certificate of the test's own.
        let req = rcgen::CertificateSigningRequestParams::from_pem(std::str::from_utf8(csr_pem).unwrap()).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&req.public_key, &issuer).unwrap();
        (cert.pem(), ca_cert.pem())
    }

    #[test]
    fn a_request_is_made_when_due_and_answered_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = renewal(dir.path(), 30);
        let now = 1_800_000_000;
        let t0 = std::time::Instant::now();
        r.check(now + 31 * 86_400, now);
        assert!(!r.waiting(), "not due 31 days before");
        assert_eq!(r.to_publish(t0), None);
        r.check(now + 29 * 86_400, now);
        assert!(r.waiting());
        let Some(Publish::Request(csr)) = r.to_publish(t0) else { panic!("a request to publish") };
        let key = std::fs::read(dir.path().join("tls").join(REQUEST_KEY)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls").join(REQUEST_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Made once: a second check keeps the same request.
        r.check(now + 29 * 86_400, now);
        assert_eq!(r.to_publish(t0), Some(Publish::Request(csr.clone())));
        // Published: not again within the hour (a broker refusing it ends
        // the connection each time).
        r.published(false, t0);
        assert_eq!(r.to_publish(t0 + std::time::Duration::from_secs(600)), None);
        assert_eq!(r.to_publish(t0 + REPUBLISH), Some(Publish::Request(csr.clone())));
        let req = rcgen::CertificateSigningRequestParams::from_pem(std::str::from_utf8(&csr).unwrap()).unwrap();
        let cn = req.params.distinguished_name.get(&rcgen::DnType::CommonName).unwrap();
        assert_eq!(cn, &rcgen::DnValue::Utf8String("press-7".into()));

        // An answer to another key is ignored; the request still waits.
        let other_key = rcgen::KeyPair::generate().unwrap();
        let other_csr = {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name.push(rcgen::DnType::CommonName, "press-7");
            p.serialize_request(&other_key).unwrap().pem().unwrap()
        };
        let (stale, _) = sign(other_csr.as_bytes(), "press-7");
        assert!(!r.certificate(stale.as_bytes()));
        assert!(!r.certificate(b"not a certificate"));
        assert!(r.waiting());

        let (cert, _) = sign(&csr, "press-7");
        assert!(r.certificate(cert.as_bytes()));
        let drop = dir.path().join("tls-drop");
        assert_eq!(std::fs::read(drop.join("device.key")).unwrap(), key);
        assert_eq!(std::fs::read(drop.join("device.crt")).unwrap(), cert.as_bytes());
        assert!(!r.waiting());
        assert_eq!(r.to_publish(t0), Some(Publish::Clear));
        // The same answer again (retained) is ignored; while the delivered
        // certificate is in the drop directory no new request is made.
        assert!(!r.certificate(cert.as_bytes()));
        r.check(now + 29 * 86_400, now);
        assert!(!r.waiting());
        r.published(true, t0);
        assert_eq!(r.to_publish(t0), None);
        let counts: Vec<_> = ["requested", "delivered", "ignored"]
            .iter()
            .map(|k| r.results.get_or_create(&ResultLabels { result: (*k).into() }).get())
            .collect();
        assert_eq!(counts, [1, 1, 3]);
    }

    #[test]
    fn renewal_off_never_requests() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = renewal(dir.path(), 0);
        r.check(0, 1_800_000_000);
        assert!(!r.waiting());
    }
}
