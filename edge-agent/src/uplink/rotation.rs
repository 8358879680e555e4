//! Client certificate rotation (docs/configuration.md, "Certificate
//! rotation"). A new certificate and key dropped in `<state_dir>/tls-drop/`
//! (`device.crt`, `device.key`) are checked first: the key fits, the
//! certificate chains to `mqtt.tls.ca_file`, is valid now, and names this
//! device (CN = `device_id`: a rotation never changes the identity). Then
//! they are tried: the next connection uses them (a connection up with the
//! old identity is ended for it). Once the broker accepts that connection
//! they are installed as `<state_dir>/tls/identity.pem` (chain and key in
//! one file, replaced atomically; the one before kept as
//! `identity.pem.old`) and used from then on, in place of the configured
//! files. If the broker refuses them (a TLS alert, not authorized) the agent
//! goes back to the identity it had. Refused candidates move to
//! `tls-drop/refused/`. Every decision is a line in `<state_dir>/tls/audit.log`
//! (fsynced) and in the log (target `edge_agent::audit`), and counted
//! (`edge_agent_tls_rotations_total{result}`).
//!
//! While the network is down nothing is decided: the candidate is tried on
//! every attempt until a broker answers. So a box whose certificate expired
//! while it was offline is recovered by dropping a new one in (README,
//! "Certificate rotation").

use std::path::{Path, PathBuf};

use edge_wire::tls::TlsConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::ResultLabels;

/// The candidate's file names in the drop directory.
pub const CANDIDATE_CERT: &str = "device.crt";
pub const CANDIDATE_KEY: &str = "device.key";

/// How a connection that used [`Rotation::identity`] ended, as far as the
/// identity is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The broker accepted the connection (CONNACK): it takes the identity.
    Accepted,
    /// The broker refused it: a TLS alert about our certificate, or the
    /// login (not authorized).
    Refused(&'static str),
    /// Nothing learned: no broker reached, the network broke, or stopping.
    Unknown,
}

impl Outcome {
    /// From a failed attempt's reasons (`edge_wire::tls::connection_failure`
    /// and `handshake_failure`).
    pub fn of_failure(reason: &'static str, tls: Option<&'static str>) -> Outcome {
        match (reason, tls) {
            (_, Some(why @ ("client_certificate_refused" | "client_certificate_expired"))) => Outcome::Refused(why),
            ("not_authorized", _) => Outcome::Refused("not_authorized"),
            _ => Outcome::Unknown,
        }
    }
}

pub struct Rotation {
    drop_dir: PathBuf,
    dir: PathBuf,
    /// The candidate under trial (its files stay in the drop directory).
    trial: bool,
    /// The modification time of a refused candidate that could not be
    /// moved aside: not checked (and counted) again.
    refused_at: Option<std::time::SystemTime>,
    /// The audit trail each decision also goes to.
    pub trail: Option<std::sync::Arc<crate::audit::Audit>>,
    results: Family<ResultLabels, Counter>,
}

impl Rotation {
    /// Makes the drop directory (in the state directory, so it is the
    /// agent's own user's after the privilege drop).
    pub fn new(state_dir: &Path, results: Family<ResultLabels, Counter>) -> Rotation {
        let r = Rotation {
            drop_dir: state_dir.join("tls-drop"),
            dir: state_dir.join("tls"),
            trial: false,
            refused_at: None,
            trail: None,
            results,
        };
        if let Err(e) = std::fs::create_dir_all(&r.drop_dir) {
            tracing::warn!(error = %e, dir = %r.drop_dir.display(), "no certificate drop directory");
        }
        r
    }

    /// The candidate certificate's modification time, if there is one.
    fn candidate_time(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.drop_dir.join(CANDIDATE_CERT)).and_then(|m| m.modified()).ok()
    }

    /// The installed identity, once a rotation installed one.
    pub fn installed(&self) -> PathBuf {
        self.dir.join("identity.pem")
    }

    /// Whether a candidate waits to be tried (looked at while connected:
    /// the connection is then ended to try it).
    pub fn waiting(&self) -> bool {
        !self.trial && self.candidate_time().is_some_and(|t| Some(t) != self.refused_at)
    }

    /// The TLS files for the next connection: the candidate under trial (a
    /// new one is checked first), else the installed identity, else the
    /// configured files.
    pub fn identity(&mut self, configured: &TlsConfig, device_id: &str, now_secs: u64) -> TlsConfig {
        if !configured.enabled || configured.cert_file.as_os_str().is_empty() {
            return configured.clone(); // no client certificate to rotate
        }
        let (cert, key) = (self.drop_dir.join(CANDIDATE_CERT), self.drop_dir.join(CANDIDATE_KEY));
        if self.waiting() {
            if !key.exists() {
                self.refuse("incomplete", &format!("{} without {CANDIDATE_KEY}", cert.display()));
            } else {
                match edge_wire::tls::check_client_identity(&configured.ca_file, &cert, &key, device_id, now_secs) {
                    Ok(expiry) => {
                        self.trial = true;
                        self.audit("trying", &format!("a new certificate (expires {expiry}) on the next connection"));
                    }
                    Err((reason, why)) => self.refuse(reason, &why),
                }
            }
        }
        let mut tls = configured.clone();
        if self.trial {
            (tls.cert_file, tls.key_file) = (cert, key);
        } else if self.installed().exists() {
            (tls.cert_file, tls.key_file) = (self.installed(), self.installed());
        }
        tls
    }

    /// What the connection that used [`Rotation::identity`] showed.
    pub fn after(&mut self, outcome: Outcome) {
        if !self.trial {
            return;
        }
        match outcome {
            Outcome::Unknown => {}
            Outcome::Accepted => {
                self.trial = false;
                match self.install() {
                    Ok(()) => {
                        // Audited before counted: the count says it is done.
                        self.audit("installed", "the broker accepted the new certificate; the old one is identity.pem.old or the configured files");
                        self.count("installed");
                    }
                    Err(e) => self.refuse("not_installed", &format!("accepted by the broker but not installed: {e}")),
                }
            }
            Outcome::Refused(why) => {
                self.trial = false;
                self.refuse(
                    "refused_by_broker",
                    &format!("the broker refused it ({why}); back to the identity before"),
                );
            }
        }
    }

    /// Chain and key into `identity.pem` (written beside it, synced,
    /// renamed over it: a crash leaves the old or the new, whole), then the
    /// candidate's files go.
    fn install(&self) -> std::io::Result<()> {
        let cert = std::fs::read(self.drop_dir.join(CANDIDATE_CERT))?;
        let key = std::fs::read(self.drop_dir.join(CANDIDATE_KEY))?;
        std::fs::create_dir_all(&self.dir)?;
        let target = self.installed();
        if target.exists() {
            std::fs::copy(&target, self.dir.join("identity.pem.old"))?;
        }
        let tmp = self.dir.join("identity.pem.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&cert)?;
            if !cert.ends_with(b"\n") {
                f.write_all(b"\n")?;
            }
            f.write_all(&key)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        std::fs::remove_file(self.drop_dir.join(CANDIDATE_KEY))?;
        std::fs::remove_file(self.drop_dir.join(CANDIDATE_CERT))?;
        Ok(())
    }

    /// Moves the candidate aside (`tls-drop/refused/<time>-device.*`),
    /// audited and counted.
    fn refuse(&mut self, reason: &str, why: &str) {
        self.trial = false;
        self.refused_at = self.candidate_time();
        let aside = self.drop_dir.join("refused");
        let stamp = crate::now_ms();
        let moved = std::fs::create_dir_all(&aside).and_then(|_| {
            for name in [CANDIDATE_CERT, CANDIDATE_KEY] {
                let from = self.drop_dir.join(name);
                if from.exists() {
                    std::fs::rename(&from, aside.join(format!("{stamp}-{name}")))?;
                }
            }
            Ok(())
        });
        if let Err(e) = moved {
            tracing::error!(error = %e, dir = %self.drop_dir.display(), "a refused certificate could not be moved aside");
        }
        self.audit("refused", &format!("{reason}: {why}"));
        self.count("refused");
    }

    /// One decision: a line in the local audit log, a record of the trail.
    fn audit(&self, event: &str, detail: &str) {
        if let Some(trail) = &self.trail {
            trail.record(&format!("certificate_{event}"), &[("detail", detail.to_owned())]);
        }
        audit(&self.dir, event, detail);
    }

    fn count(&self, result: &str) {
        self.results.get_or_create(&ResultLabels { result: result.into() }).inc();
    }
}

/// One line per decision, synced, and the same in the log.
fn audit(dir: &Path, event: &str, detail: &str) {
    let line = format!("{} certificate {event} detail={detail:?}\n", crate::store::tools::rfc3339(crate::now_ms()));
    tracing::warn!(target: "edge_agent::audit", "{}", line.trim_end());
    let path = dir.join("audit.log");
    let r = std::fs::create_dir_all(dir).and_then(|_| {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        std::io::Write::write_all(&mut f, line.as_bytes())?;
        f.sync_data()
    });
    if let Err(e) = r {
        tracing::error!(error = %e, path = %path.display(), "audit line not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_brokers_refusal_of_our_certificate_refuses_a_candidate() {
        assert_eq!(
            Outcome::of_failure("tls", Some("client_certificate_refused")),
            Outcome::Refused("client_certificate_refused")
        );
        assert_eq!(Outcome::of_failure("not_authorized", None), Outcome::Refused("not_authorized"));
        for (reason, tls) in
            [("refused", None), ("timeout", None), ("dns", None), ("tls", Some("unknown_ca")), ("closed", None)]
        {
            assert_eq!(Outcome::of_failure(reason, tls), Outcome::Unknown, "{reason} {tls:?}");
        }
    }
}
