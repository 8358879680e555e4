//! TLS settings shared by the agent and the bridge for their MQTT
//! connections (feature `tls`): a CA to verify the broker, and optionally a
//! client certificate and key (PEM files). rustls with the ring provider.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// false: plain TCP (only for a broker on the same host or a test).
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
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&self.ca_file)? {
            roots.add(cert).map_err(|e| TlsError::new(&self.ca_file, format!("not a usable CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(&self.ca_file, e.to_string()))?
            .with_root_certificates(roots);
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

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { enabled: false, ca_file: PathBuf::new(), cert_file: PathBuf::new(), key_file: PathBuf::new() }
    }
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
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("edge-wire-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), "not a certificate\n").unwrap();
        let e = TlsConfig::in_dir(&dir, "x").client_config().unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
