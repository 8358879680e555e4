//! TLS settings shared by the agent and the bridge for their MQTT
//! connections (feature `tls`): a CA to verify the broker, and optionally a
//! client certificate and key (PEM files). rustls with the ring provider.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// rustls' own verifier, asked about a time no earlier than `floor`.
#[derive(Debug)]
struct FloorVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    floor: Option<Duration>,
}

impl ServerCertVerifier for FloorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now = match self.floor {
            Some(floor) if now.as_secs() < floor.as_secs() => UnixTime::since_unix_epoch(floor),
            _ => now,
        };
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// false: plain TCP (only for a broker on the same host or a test).
    /// On unless a config says `enabled = false`: a `[mqtt.tls]` table
    /// that leaves the key out still means TLS.
    pub enabled: bool,
    /// PEM: the CA(s) that signed the broker's certificate. The broker's
    /// host name (`mqtt.host`) must be in that certificate's names.
    pub ca_file: PathBuf,
    /// PEM: this client's certificate (chain). Empty: no client
    /// certificate (then authenticate with a user name and password).
    pub cert_file: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
}

impl TlsConfig {
    /// TLS on, with files in `dir`: `ca.crt`, `<name>.crt`, `<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsConfig {
        TlsConfig {
            enabled: true,
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
        }
    }

    /// Checks the settings without reading files (config validation).
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.ca_file.as_os_str().is_empty() {
            return Err(format!("{key}.ca_file must be set when {key}.enabled is true"));
        }
        if self.cert_file.as_os_str().is_empty() != self.key_file.as_os_str().is_empty() {
            return Err(format!("{key}.cert_file and {key}.key_file go together: set both or neither"));
        }
        Ok(())
    }

    /// Reads the files and builds the client configuration. Errors name the
    /// file and what is wrong with it.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        self.client_config_with_floor(None)
    }

    /// As [`TlsConfig::client_config`], with the broker's certificate
    /// checked at `floor` (Unix seconds) whenever this machine's clock is
    /// before it: a box that boots with its clock years behind (no RTC)
    /// still connects, so it can learn the true time. Everything else
    /// (chain, name, signatures, expiry at the floor) is checked as always.
    pub fn client_config_with_floor(&self, floor: Option<u64>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&self.ca_file)? {
            roots.add(cert).map_err(|e| TlsError::new(&self.ca_file, format!("not a usable CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::new(&self.ca_file, format!("no usable CA: {e}")))?;
        let verifier = Arc::new(FloorVerifier { inner: webpki, floor: floor.map(Duration::from_secs) });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(&self.ca_file, e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = if self.cert_file.as_os_str().is_empty() {
            builder.with_no_client_auth()
        } else {
            let chain = read_certs(&self.cert_file)?;
            let key = PrivateKeyDer::from_pem_file(&self.key_file)
                .map_err(|e| TlsError::new(&self.key_file, format!("no private key read: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsError::new(&self.key_file, format!("key does not fit {}: {e}", self.cert_file.display()))
            })?
        };
        Ok(Arc::new(config))
    }
}

/// What a table gives for the keys it leaves out: TLS on (secure by
/// default), no files. A table that names no `ca_file` is then refused by
/// [`TlsConfig::validate`], naming the key; a config without the table at
/// all gets its program's files ([`TlsConfig::in_dir`]).
impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { enabled: true, ca_file: PathBuf::new(), cert_file: PathBuf::new(), key_file: PathBuf::new() }
    }
}

impl TlsConfig {
    /// Whether a warning is due: plain TCP to `host` that is not this
    /// machine (a loopback address or `localhost`). Both programs say so at
    /// every start.
    pub fn plain_to_remote(&self, host: &str) -> bool {
        if self.enabled {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback =
            host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        !loopback
    }
}

impl TlsConfig {
    /// When the client certificate (`cert_file`, its first certificate:
    /// the leaf) expires, in Unix seconds; `None` without one. Errors name
    /// the file.
    pub fn client_certificate_expiry(&self) -> Option<Result<i64, TlsError>> {
        (self.enabled && !self.cert_file.as_os_str().is_empty()).then(|| certificate_expiry(&self.cert_file))
    }
}

/// When the first certificate in the PEM file `path` expires (its
/// notAfter), in Unix seconds.
pub fn certificate_expiry(path: &Path) -> Result<i64, TlsError> {
    use x509_cert::der::Decode;
    let certs = read_certs(path)?;
    let cert = x509_cert::Certificate::from_der(certs[0].as_ref())
        .map_err(|e| TlsError::new(path, format!("not an X.509 certificate: {e}")))?;
    Ok(cert.tbs_certificate().validity().not_after.to_unix_duration().as_secs() as i64)
}

/// A client identity (certificate chain and key, PEM) checked before it is
/// used: the key fits the certificate, the certificate chains to `ca_file`
/// for client use and is valid at `now_secs`, and its subject's CN is
/// `expected_cn`. Returns its expiry (Unix seconds); the error says what is
/// wrong, in words, with a short reason first (`unreadable`, `key_mismatch`,
/// `not_from_ca`, `expired`, `not_yet_valid`, `other_identity`).
pub fn check_client_identity(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
    expected_cn: &str,
    now_secs: u64,
) -> Result<i64, (&'static str, String)> {
    use x509_cert::der::Decode;
    let unreadable = |e: TlsError| ("unreadable", e.to_string());
    let chain = read_certs(cert_file).map_err(unreadable)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| ("unreadable", format!("{}: no private key read: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    fits(&provider, chain.clone(), key)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file).map_err(unreadable)? {
        roots.add(cert).map_err(|e| ("unreadable", format!("{}: not a usable CA: {e}", ca_file.display())))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| ("unreadable", format!("{}: no usable CA: {e}", ca_file.display())))?;
    let now = UnixTime::since_unix_epoch(Duration::from_secs(now_secs));
    verifier.verify_client_cert(&chain[0], &chain[1..], now).map_err(|e| {
        use rustls::{CertificateError as C, Error as E};
        let reason = match &e {
            E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
            E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "not_yet_valid",
            _ => "not_from_ca",
        };
        (reason, format!("not a valid client certificate from {}: {e}", ca_file.display()))
    })?;
    let cert = x509_cert::Certificate::from_der(chain[0].as_ref())
        .map_err(|e| ("unreadable", format!("not an X.509 certificate: {e}")))?;
    let subject = cert.tbs_certificate().subject().to_string();
    let cn = subject.split(',').find_map(|rdn| rdn.trim().strip_prefix("CN=")).unwrap_or("");
    if cn != expected_cn {
        return Err(("other_identity", format!("its subject is {subject:?}, not CN={expected_cn}")));
    }
    Ok(cert.tbs_certificate().validity().not_after.to_unix_duration().as_secs() as i64)
}

/// The subject public key (its bits, as in the SubjectPublicKeyInfo) of
/// the first certificate in `chain_pem`.
pub fn certificate_public_key(chain_pem: &[u8]) -> Result<Vec<u8>, String> {
    use x509_cert::der::Decode;
    let first = CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .ok_or("holds no PEM certificate")?
        .map_err(|e| format!("not valid PEM: {e}"))?;
    let cert =
        x509_cert::Certificate::from_der(first.as_ref()).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.tbs_certificate().subject_public_key_info().subject_public_key.raw_bytes().to_vec())
}

/// Whether the private key `key_pem` fits the leaf of the certificate
/// chain `chain_pem` (both PEM); the error says why not.
pub fn key_fits(chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not valid PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("no private key read: {e}"))?;
    fits(&Arc::new(rustls::crypto::ring::default_provider()), chain, key).map_err(|(_, why)| why)
}

fn fits(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), (&'static str, String)> {
    // with_client_auth_cert checks that the key fits the certificate.
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("unreadable", e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, key)
        .map(drop)
        .map_err(|e| ("key_mismatch", format!("the key does not fit the certificate: {e}")))
}

/// Why a TLS handshake failed, in a word an operator can act on, when
/// `err` (or its source chain) is one: `expired`, `not_yet_valid` (the
/// broker's certificate at this box's clock), `unknown_ca`, `wrong_name`,
/// `bad_certificate` (the broker's: revoked, bad signature, unusable),
/// `client_certificate_expired`, `client_certificate_refused` (the broker
/// refused ours: its alert), `other`. `None`: not a TLS failure.
pub fn handshake_failure(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let tls = e.downcast_ref::<E>().or_else(|| {
            e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<E>())
        });
        if let Some(t) = tls {
            return Some(match t {
                E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
                E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "not_yet_valid",
                E::InvalidCertificate(C::UnknownIssuer) => "unknown_ca",
                E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => "wrong_name",
                E::InvalidCertificate(_) => "bad_certificate",
                E::AlertReceived(A::CertificateExpired) => "client_certificate_expired",
                E::AlertReceived(
                    A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::CertificateRequired,
                ) => "client_certificate_refused",
                _ => "other",
            });
        }
        cur = e.source();
    }
    // An alert that comes after the handshake, with the broker's first
    // answer (TLS 1.3: the server checks our certificate then), reaches us
    // through the MQTT client's read error, whose source chain does not
    // keep rustls' error: only its text does.
    let text = err.to_string();
    let alert = text.split("received fatal alert: ").nth(1)?;
    let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or("");
    Some(match name {
        "CertificateExpired" => "client_certificate_expired",
        "BadCertificate"
        | "UnsupportedCertificate"
        | "CertificateRevoked"
        | "CertificateUnknown"
        | "UnknownCA"
        | "AccessDenied"
        | "CertificateRequired" => "client_certificate_refused",
        _ => "other",
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::new(path, format!("cannot read: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::new(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::new(path, "holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// A TLS file that cannot be used; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("TLS file {path}: {message} (scripts/fleet-certs.sh makes a working set; docs/configuration.md)")]
pub struct TlsError {
    pub path: PathBuf,
    pub message: String,
}

impl TlsError {
    fn new(path: &Path, message: String) -> TlsError {
        TlsError { path: path.to_owned(), message }
    }
}

/// Why a connection to the broker failed, in a word an operator can act
/// on: `tls` (handshake: certificate, CA, name, validity), `refused` (no
/// broker listening), `dns` (the host name does not resolve), `timeout`,
/// `not_authorized` (the broker refused the login), `refused_by_broker`
/// (another CONNACK refusal), `closed` (the broker closed the connection)
/// or `other`. Walks `err`'s source chain.
pub fn connection_failure(err: &(dyn std::error::Error + 'static)) -> &'static str {
    let top = err.to_string();
    if top.contains("Connection refused, return code") || top.contains("ConnectionRefused(") {
        return if top.contains("NotAuthorized") || top.contains("BadUserName") {
            "not_authorized"
        } else {
            "refused_by_broker"
        };
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return "tls";
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionRefused => return "refused",
                K::TimedOut => return "timeout",
                K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe => return "closed",
                _ if io.to_string().contains("lookup address") => return "dns",
                _ => {}
            }
            if io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) {
                return "tls";
            }
        }
        cur = e.source();
    }
    match top.to_ascii_lowercase() {
        t if t.contains("tls") || t.contains("certificate") => "tls",
        t if t.contains("timeout") => "timeout",
        t if t.contains("lookup address") => "dns",
        t if t.contains("connection closed") || t.contains("reset") => "closed",
        _ => "other",
    }
}

/// MQTT user name and password; the password is read from a file so it
/// stays out of configs that are shared or logged.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    /// Empty: no user name is sent.
    pub username: String,
    /// A file whose first line is the password.
    pub password_file: PathBuf,
}

impl Credentials {
    /// `(user, password)` to send, if a user name is set.
    pub fn load(&self) -> Result<Option<(String, String)>, TlsError> {
        if self.username.is_empty() {
            return Ok(None);
        }
        if self.password_file.as_os_str().is_empty() {
            return Ok(Some((self.username.clone(), String::new())));
        }
        let text = std::fs::read_to_string(&self.password_file)
            .map_err(|e| TlsError::new(&self.password_file, format!("cannot read the password: {e}")))?;
        Ok(Some((self.username.clone(), text.lines().next().unwrap_or("").to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two self-signed certificates made with openssl (`-days 3650` and
    /// `-days 10000`): notAfter as UTCTime (2036) and as GeneralizedTime
    /// (2054, past 2049); the times are `openssl x509 -enddate`'s.
    #[test]
    fn certificate_expiry_reads_both_time_forms() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata");
        assert_eq!(certificate_expiry(&dir.join("utc-time.crt")).unwrap(), 2_111_778_493);
        assert_eq!(certificate_expiry(&dir.join("generalized-time.crt")).unwrap(), 2_660_418_493);
        let tmp = std::env::temp_dir().join(format!("edge-wire-not-a-cert-{}", std::process::id()));
        std::fs::write(&tmp, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let e = certificate_expiry(&tmp).unwrap_err().to_string();
        let _ = std::fs::remove_file(&tmp);
        assert!(e.contains("edge-wire-not-a-cert") && e.contains("not an X.509 certificate"), "{e}");
    }

    #[test]
    fn an_alert_known_only_by_its_text_is_classified() {
        let e = std::io::Error::other(
            "Mqtt state: Mqtt serialization/deserialization error: IO: received fatal alert: CertificateExpired",
        );
        assert_eq!(handshake_failure(&e), Some("client_certificate_expired"));
        let e = std::io::Error::other("IO: received fatal alert: UnknownCA");
        assert_eq!(handshake_failure(&e), Some("client_certificate_refused"));
        assert_eq!(handshake_failure(&std::io::Error::other("connection refused")), None);
    }

    #[test]
    fn handshake_failures_by_reason() {
        use rustls::{AlertDescription, CertificateError, Error};
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let r = |e: Error| handshake_failure(&io(e));
        assert_eq!(r(Error::InvalidCertificate(CertificateError::Expired)), Some("expired"));
        assert_eq!(r(Error::InvalidCertificate(CertificateError::UnknownIssuer)), Some("unknown_ca"));
        assert_eq!(r(Error::InvalidCertificate(CertificateError::NotValidForName)), Some("wrong_name"));
        assert_eq!(r(Error::AlertReceived(AlertDescription::CertificateExpired)), Some("client_certificate_expired"));
        assert_eq!(r(Error::AlertReceived(AlertDescription::UnknownCA)), Some("client_certificate_refused"));
        assert_eq!(r(Error::DecryptError), Some("other"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(handshake_failure(&refused), None);
    }

    #[test]
    fn errors_name_the_file() {
        let t = TlsConfig::in_dir(Path::new("/nonexistent/tls"), "device");
        t.validate("mqtt.tls").unwrap();
        let e = t.client_config().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/tls/ca.crt"), "{e}");
        let mut half = t.clone();
        half.key_file = PathBuf::new();
        assert!(half.validate("mqtt.tls").unwrap_err().contains("mqtt.tls.cert_file"));
    }

    #[test]
    fn a_table_without_enabled_means_tls() {
        #[derive(Deserialize)]
        struct Wrap {
            tls: TlsConfig,
        }
        let w: Wrap = toml::from_str("[tls]\nca_file = \"/x/ca.crt\"\n").unwrap();
        assert!(w.tls.enabled, "a table that names files but leaves out `enabled` is TLS");
        let w: Wrap = toml::from_str("[tls]\nenabled = false\n").unwrap();
        assert!(!w.tls.enabled);
        // Without a CA the table is refused, naming the key.
        let w: Wrap = toml::from_str("[tls]\n").unwrap();
        assert!(w.tls.validate("mqtt.tls").unwrap_err().contains("mqtt.tls.ca_file"));
    }

    #[test]
    fn plain_tcp_beyond_this_machine_is_flagged() {
        let plain = TlsConfig { enabled: false, ..TlsConfig::default() };
        for host in ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "LOCALHOST"] {
            assert!(!plain.plain_to_remote(host), "{host}");
        }
        for host in ["10.0.0.2", "fleet-broker", "broker.example"] {
            assert!(plain.plain_to_remote(host), "{host}");
        }
        assert!(!TlsConfig::default().plain_to_remote("fleet-broker"));
    }

    #[test]
    fn connection_failures_are_named() {
        use std::io::{Error, ErrorKind};
        let refused = Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(connection_failure(&refused), "refused");
        let tls = Error::new(
            ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet),
        );
        assert_eq!(connection_failure(&tls), "tls");
        let dns = Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(connection_failure(&dns), "dns");
        assert_eq!(connection_failure(&Error::from(ErrorKind::ConnectionReset)), "closed");
        #[derive(Debug, thiserror::Error)]
        #[error("Connection refused, return code: `NotAuthorized`")]
        struct Refused;
        assert_eq!(connection_failure(&Refused), "not_authorized");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("edge-wire-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), "not a certificate\n").unwrap();
        let e = TlsConfig::in_dir(&dir, "x").client_config().unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
