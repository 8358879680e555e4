//! Harness for end-to-end tests with the real parts: the kernel, mosquitto,
//! Prometheus, and the `edge-agent` and `fleet-bridge` binaries of this
//! workspace (build them first: `cargo build --workspace --bins`).
//!
//! Every process is started on free loopback ports with configs from
//! `configs/`, in a temporary directory, and killed when its handle drops.
//! Waits are on conditions with deadlines, never fixed sleeps.

use std::fmt::Debug;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod nats;
pub mod pump;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Whether the tests may run here. In CI (`CI` set) a missing requirement is
/// a failure; elsewhere the test is skipped with the reason printed.
pub fn require_root_and_tools() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (eBPF programs need CAP_BPF and CAP_PERFMON)".to_string());
    }
    for tool in ["mosquitto", "prometheus"] {
        if which(tool).is_none() {
            missing.push(format!("{tool} (scripts/setup.sh installs it)"));
        }
    }
    for bin in ["edge-agent", "fleet-bridge"] {
        if !bin_dir().join(bin).exists() {
            missing.push(format!("{bin} binary in {} (cargo build --workspace --bins)", bin_dir().display()));
        }
    }
    require("end-to-end test", &missing)
}

/// Whether a test may run, given what it lacks: in CI (`CI` set) anything
/// missing fails the test; elsewhere the test is skipped with the reason
/// printed.
pub fn require<S: AsRef<str>>(test: &str, missing: &[S]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let list: Vec<&str> = missing.iter().map(AsRef::as_ref).collect();
    let msg = format!("{test} needs: {}", list.join("; "));
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED (not in CI): {msg}");
    false
}

/// [`require`] for programs on PATH (`nats-server`, `faketime`): each
/// missing one is named with how to get it.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<String> =
        tools.iter().filter(|t| which(t).is_none()).map(|t| format!("{t} (scripts/setup.sh installs it)")).collect();
    require(test, &missing)
}

/// Where `tool` is on PATH (or in /usr/sbin, /sbin).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

/// The uid and gid of a system user, made (`useradd --system`, no home,
/// no shell) when it does not exist: what a package's sysusers entry does
/// on a device. Needs root.
pub fn system_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").arg(flag).arg(name).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok().filter(|_| o.status.success())
    };
    if id("-u").is_none() {
        let ok = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .status()
            .expect("useradd");
        assert!(ok.success(), "useradd {name} failed");
    }
    (id("-u").expect("uid"), id("-g").expect("gid"))
}

/// target/<profile>/, where cargo put the workspace's binaries: a test
/// runs from target/<profile>/deps/, a binary (the fleet simulator) from
/// target/<profile>/ itself.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        return dir.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    dir
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A loopback port free now, for a server a test starts (mosquitto,
/// Prometheus, /metrics). Picked below the kernel's ephemeral range, which
/// the kernel hands to outgoing connections and to port-0 binds: a port
/// from that range could be taken by some test's connect() between this
/// pick and the server's bind (a broker failed to start so once). Never
/// the same port twice in one process: the tests of a binary run in
/// parallel, and two random picks made before either server bound its
/// port could be the same (mosquitto failed to start so once, "Address
/// already in use").
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static PICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    for _ in 0..1000 {
        // Random per process and per call (std's hasher keys are random).
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(PICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h.write_u32(std::process::id());
        let port = low + (h.finish() % u64::from(high - low)) as u16;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port between {low} and {high}")
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with the last
/// value it saw described.
pub fn wait_for<T, D: Debug>(what: &str, timeout: Duration, mut f: impl FnMut() -> std::result::Result<T, D>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A child process killed (SIGKILL) on drop, with its output in a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    cmd: Vec<String>,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, program: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut full = vec![program.display().to_string()];
        full.extend(args.iter().cloned());
        Proc { name: name.into(), child: Some(child), log, cmd: full }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&mut self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGSTOP / SIGCONT: the process hangs, holding its connections.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL: no chance to clean up, as in a crash or power cut.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn assert_running(&mut self) {
        if let Some(c) = &mut self.child {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("{} exited ({status}); log {}:\n{}", self.name, self.log.display(), self.log_text());
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn command(&self) -> String {
        self.cmd.join(" ")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// mosquitto with configs/mosquitto/mosquitto.conf (TLS, ACL) on free
/// loopback ports, with a fresh PKI from scripts/fleet-certs.sh.
pub struct Broker {
    /// Devices with client certificates (8883 in the shipped config).
    pub port: u16,
    /// Devices with user name and password (8884).
    pub password_port: u16,
    /// Bridges (8885).
    pub bridge_port: u16,
    /// Certificates and keys: ca.crt, bridge.{crt,key}, devices/<id>.{crt,key}.
    pub pki: PathBuf,
    dir: PathBuf,
    pub proc: Option<Proc>,
}

/// Who an MQTT client of a test authenticates as.
#[derive(Clone, Copy, Debug)]
pub enum Who<'a> {
    /// A device with its client certificate (CN = the id).
    Device(&'a str),
    /// A fleet bridge (certificate from the bridge CA, CN fleet-bridge).
    Bridge,
    /// An operator (certificate from the bridge CA, CN fleet-admin):
    /// publishes models on the central listener.
    Admin,
    /// User name and password on the password listener (no client
    /// certificate); see [`Broker::add_password`].
    User(&'a str, &'a str),
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::start_as(dir, "localhost", [free_port(), free_port(), free_port()])
    }

    /// A broker whose certificate names `server_name` (and localhost),
    /// listening on `ports` (devices with certificates, with passwords,
    /// bridges): the shipped ports 8883-8885 in a test's own network
    /// namespace, for a device that uses its default config.
    pub fn start_as(dir: &Path, server_name: &str, ports: [u16; 3]) -> Broker {
        let dir = dir.join("mosquitto");
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("broker dir");
        certs_in(&pki, &["ca"]);
        certs_in(&pki, &["server", server_name]);
        certs_in(&pki, &["bridge"]);
        certs_in(&pki, &["admin"]);
        for acl in ["acl", "acl-central"] {
            std::fs::copy(repo_dir().join("configs/mosquitto").join(acl), pki.join(acl)).expect("acl");
        }
        std::fs::write(pki.join("passwd"), "").expect("passwd");
        let [port, password_port, bridge_port] = ports;
        let mut b = Broker { port, password_port, bridge_port, pki, dir, proc: None };
        give_to_user(&b.dir, "mosquitto");
        b.restart();
        b
    }

    /// A device's certificate (made on first use): (cert, key) paths.
    pub fn device_cert(&self, id: &str) -> (PathBuf, PathBuf) {
        let base = self.pki.join("devices").join(id);
        if !base.with_extension("crt").exists() {
            certs_in(&self.pki, &["device", id]);
        }
        (base.with_extension("crt"), base.with_extension("key"))
    }

    /// Adds a user name and password for the password listener (a running
    /// broker reloads its password file on SIGHUP).
    pub fn add_password(&mut self, user: &str, password: &str) {
        let file = self.pki.join("passwd");
        let ok = Command::new("mosquitto_passwd")
            .args(["-b", &file.display().to_string(), user, password])
            .status()
            .expect("mosquitto_passwd");
        assert!(ok.success(), "mosquitto_passwd failed");
        let _ = Command::new("chown").args(["mosquitto:", &file.display().to_string()]).status();
        if let Some(p) = &mut self.proc {
            p.signal(libc::SIGHUP);
        }
    }

    /// `[mqtt]`-table TOML (keys, then the `[mqtt.tls]` table) for an agent
    /// or bridge connecting as `who`.
    pub fn client_toml(&self, who: Who) -> String {
        let (port, cert, key, auth) = match who {
            Who::Device(id) => {
                let (c, k) = self.device_cert(id);
                (self.port, c, k, String::new())
            }
            Who::Bridge => (self.bridge_port, self.pki.join("bridge.crt"), self.pki.join("bridge.key"), String::new()),
            Who::Admin => (self.bridge_port, self.pki.join("admin.crt"), self.pki.join("admin.key"), String::new()),
            Who::User(user, password) => {
                let file = self.pki.join(format!("{user}.password"));
                std::fs::write(&file, format!("{password}\n")).expect("password file");
                let auth = format!("[mqtt.auth]\nusername = \"{user}\"\npassword_file = \"{}\"\n", file.display());
                (self.password_port, PathBuf::new(), PathBuf::new(), auth)
            }
        };
        format!(
            "port = {port}\n[mqtt.tls]\nenabled = true\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{auth}",
            self.pki.join("ca.crt").display(),
            cert.display(),
            key.display()
        )
    }

    /// MQTT options for a test's own client, authenticated as `who`.
    pub fn mqtt_options(&self, client_id: &str, who: Who) -> rumqttc::MqttOptions {
        let ca_file = self.pki.join("ca.crt");
        let (tls, port) = match who {
            Who::Device(id) => {
                let (cert_file, key_file) = self.device_cert(id);
                (edge_wire::tls::TlsConfig { enabled: true, ca_file, cert_file, key_file }, self.port)
            }
            Who::Bridge => (edge_wire::tls::TlsConfig::in_dir(&self.pki, "bridge"), self.bridge_port),
            Who::Admin => (edge_wire::tls::TlsConfig::in_dir(&self.pki, "admin"), self.bridge_port),
            Who::User(..) => {
                (edge_wire::tls::TlsConfig { enabled: true, ca_file, ..Default::default() }, self.password_port)
            }
        };
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        if let Who::User(user, password) = who {
            o.set_credentials(user, password);
        }
        let cfg = tls.client_config().expect("test TLS files");
        o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg)));
        o
    }

    /// Starts it again on the same ports with the same persistence directory.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "broker already running");
        let base = std::fs::read_to_string(repo_dir().join("configs/mosquitto/mosquitto.conf"))
            .expect("configs/mosquitto/mosquitto.conf");
        let conf = self.dir.join("mosquitto.conf");
        let text = base
            .replace("/etc/mosquitto/edge/", &format!("{}/", self.pki.display()))
            .replace("\nlistener 8883\n", &format!("\nlistener {} 127.0.0.1\n", self.port))
            .replace("\nlistener 8884\n", &format!("\nlistener {} 127.0.0.1\n", self.password_port))
            .replace("\nlistener 8885\n", &format!("\nlistener {} 127.0.0.1\n", self.bridge_port));
        assert_eq!(text.matches(" 127.0.0.1\n").count(), 3, "listeners of the shipped config not found");
        std::fs::write(&conf, format!("persistence_location {}/\n{text}", self.dir.display()))
            .expect("write broker config");
        let bin = which("mosquitto").expect("mosquitto");
        let mut proc = Proc::spawn("mosquitto", &self.dir, &bin, &["-c".into(), conf.display().to_string()], &[]);
        for port in [self.port, self.password_port, self.bridge_port] {
            wait_for("mosquitto to listen", Duration::from_secs(10), || {
                proc.assert_running();
                std::net::TcpStream::connect(("127.0.0.1", port))
            });
        }
        self.proc = Some(proc);
    }

    /// SIGKILL: whatever mosquitto had not yet saved is gone.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Clean stop (SIGTERM): mosquitto saves its persistence file.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

/// Certificates for every device of `ids` in `pki` (made by
/// scripts/fleet-certs.sh, four at a time; existing ones kept).
pub fn device_certs(pki: &Path, ids: &[String]) {
    let script = repo_dir().join("scripts/fleet-certs.sh");
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(id) = ids.get(k) else { break };
                if pki.join("devices").join(format!("{id}.crt")).exists() {
                    continue;
                }
                let ok = Command::new(&script).arg(pki).args(["device", id]).status().expect("scripts/fleet-certs.sh");
                assert!(ok.success(), "fleet-certs.sh device {id} failed");
            });
        }
    });
}

/// What a test's own MQTT client saw ([`watched_client`]).
#[derive(Debug)]
pub enum Seen {
    ConnAck,
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    PubAck,
    /// Topic and payload.
    Publish(String, Vec<u8>),
    Error(String),
}

/// An MQTT 3.1.1 client whose connection's events come on the receiver
/// (until its first error).
pub fn watched_client(opts: rumqttc::MqttOptions) -> (rumqttc::Client, std::sync::mpsc::Receiver<Seen>) {
    use rumqttc::{Event, Packet};
    let (client, mut conn) = rumqttc::Client::new(opts, 16);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let seen = match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::ConnAck,
                Ok(Event::Incoming(Packet::SubAck(a))) => Seen::SubAck(a.return_codes),
                Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(p.topic.clone(), p.payload.to_vec()),
                Ok(_) => continue,
                Err(e) => Seen::Error(e.to_string()),
            };
            let stop = matches!(seen, Seen::Error(_));
            if tx.send(seen).is_err() || stop {
                return;
            }
        }
    });
    (client, rx)
}

/// scripts/fleet-certs.sh <dir> <args>.
pub(crate) fn certs_in(dir: &Path, args: &[&str]) {
    let ok = Command::new(repo_dir().join("scripts/fleet-certs.sh"))
        .arg(dir)
        .args(args)
        .status()
        .expect("scripts/fleet-certs.sh");
    assert!(ok.success(), "scripts/fleet-certs.sh {args:?} failed");
    // mosquitto drops root before it reads some of these.
    if which("mosquitto").is_some() {
        let _ = Command::new("chown").args(["-R", "mosquitto:", &dir.display().to_string()]).status();
    }
}

/// mosquitto started as root drops to its own user, which must be able to
/// write the persistence file.
fn give_to_user(dir: &Path, user: &str) {
    let name = std::ffi::CString::new(user).expect("user name");
    // SAFETY: getpwnam returns null or a pointer to a static passwd entry.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return; // no such user: mosquitto keeps running as us
    }
    // SAFETY: non-null pointer from getpwnam, read immediately.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown broker dir");
}

/// Prometheus with configs/prometheus.yml and the remote-write receiver.
pub struct Prom {
    pub port: u16,
    pub proc: Proc,
    http: ureq::Agent,
    dir: PathBuf,
    kind: Tsdb,
}

/// Which remote-write store a [`Prom`] runs: both answer Prometheus's
/// query API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tsdb {
    /// Debian's prometheus with configs/prometheus.yml.
    Prometheus,
    /// Debian's victoria-metrics (single node), query results uncached and
    /// visible at once.
    VictoriaMetrics,
}

impl Prom {
    pub fn start(dir: &Path) -> Prom {
        Self::start_on(dir, free_port(), Tsdb::Prometheus)
    }

    /// VictoriaMetrics in place of Prometheus: the same write and query
    /// paths.
    pub fn start_victoria(dir: &Path) -> Prom {
        Self::start_on(dir, free_port(), Tsdb::VictoriaMetrics)
    }

    /// Stops it (SIGTERM) and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.proc.stop();
        let again = Self::start_on(&self.dir, self.port, self.kind);
        *self = again;
    }

    /// Stops it (SIGTERM); `restart` brings it back.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    fn start_on(dir: &Path, port: u16, kind: Tsdb) -> Prom {
        let (name, ready) = match kind {
            Tsdb::Prometheus => ("prometheus", "/-/ready"),
            Tsdb::VictoriaMetrics => ("victoria-metrics", "/health"),
        };
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("tsdb dir");
        let bin = which(name).unwrap_or_else(|| panic!("{name} (scripts/setup.sh installs it)"));
        let args = match kind {
            Tsdb::Prometheus => vec![
                format!("--config.file={}", repo_dir().join("configs/prometheus.yml").display()),
                format!("--storage.tsdb.path={}", data.display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--web.enable-remote-write-receiver".into(),
            ],
            Tsdb::VictoriaMetrics => vec![
                format!("-storageDataPath={}", data.display()),
                format!("-httpListenAddr=127.0.0.1:{port}"),
                // Samples visible as soon as written, queries never cached:
                // the tests look for exact counts of what just arrived.
                "-search.latencyOffset=0s".into(),
                "-search.disableCache".into(),
                "-retentionPeriod=100y".into(),
            ],
        };
        let proc = Proc::spawn(name, dir, &bin, &args, &[]);
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let p = Prom { port, proc, http, dir: dir.to_owned(), kind };
        wait_for(&format!("{name} to be ready"), Duration::from_secs(60), || {
            p.get(ready).and_then(|(s, _)| if s == 200 { Ok(()) } else { Err(format!("status {s}").into()) })
        });
        p
    }

    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// The base URL (for the query API).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut r = self.http.get(&format!("http://127.0.0.1:{}{path}", self.port)).call()?;
        let s = r.status().as_u16();
        Ok((s, r.body_mut().read_to_string()?))
    }

    /// The value of an instant query that yields one number (e.g.
    /// `sum(count_over_time(m[2h]))`); `None` when it yields nothing.
    pub fn scalar(&self, query: &str) -> Result<Option<f64>> {
        let path = format!("/api/v1/query?query={}&time={:.3}", urlencode(query), now_ms() as f64 / 1000.0);
        let (status, body) = self.get(&path)?;
        if status != 200 {
            return Err(format!("query {query}: HTTP {status}: {body}").into());
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        match v["data"]["result"].as_array().and_then(|r| r.first()) {
            None => Ok(None),
            Some(r) => Ok(Some(r["value"][1].as_str().ok_or("bad value")?.parse()?)),
        }
    }

    /// Raw samples `(timestamp_ms, value)` of every series matching
    /// `selector` over the last `range_s` seconds, as stored (no
    /// interpolation): `selector[range]` evaluated now.
    pub fn raw_samples(&self, selector: &str, range_s: u64) -> Result<Vec<(i64, f64)>> {
        let q = format!("{selector}[{range_s}s]");
        let path = format!("/api/v1/query?query={}&time={:.3}", urlencode(&q), now_ms() as f64 / 1000.0);
        let (status, body) = self.get(&path)?;
        if status != 200 {
            return Err(format!("query {q}: HTTP {status}: {body}").into());
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let result = v["data"]["result"].as_array().ok_or("no result array")?;
        if result.len() > 1 {
            return Err(format!("selector {selector} matched {} series", result.len()).into());
        }
        let mut out = Vec::new();
        for r in result {
            for pair in r["values"].as_array().ok_or("no values")? {
                let ts = pair[0].as_f64().ok_or("bad timestamp")?;
                let val: f64 = pair[1].as_str().ok_or("bad value")?.parse()?;
                out.push(((ts * 1000.0).round() as i64, val));
            }
        }
        Ok(out)
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET a local `/metrics` and return the value of one exact series line
/// (`name{labels}` as printed), if present.
pub fn scrape(port: u16, series: &str) -> Result<Option<f64>> {
    let mut r = ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call()?;
    let body = r.body_mut().read_to_string()?;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix(series) {
            if let Some(v) = rest.strip_prefix(' ') {
                return Ok(Some(v.trim().parse()?));
            }
        }
    }
    Ok(None)
}

pub fn bridge(dir: &Path, broker: &Broker, write_url: &str, client_id: &str) -> (Proc, u16) {
    bridge_with(dir, broker, write_url, client_id, "")
}

/// A bridge with more `[mqtt]` settings (TOML lines).
pub fn bridge_with(dir: &Path, broker: &Broker, write_url: &str, client_id: &str, mqtt: &str) -> (Proc, u16) {
    bridge_full(dir, broker, write_url, client_id, mqtt, "")
}

/// A bridge with more `[mqtt]` and `[remote_write]` settings (TOML lines).
pub fn bridge_full(
    dir: &Path,
    broker: &Broker,
    write_url: &str,
    client_id: &str,
    mqtt: &str,
    remote_write: &str,
) -> (Proc, u16) {
    bridge_logged(dir, broker, write_url, client_id, mqtt, remote_write, "info,fleet_bridge=debug")
}

/// [`bridge_full`] logging at `log` (`FLEET_BRIDGE_LOG`): the fleet
/// simulator's bridges log at info, not a line per message. The binary is
/// the workspace's, or `FLEET_BRIDGE_BIN` (a benchmark's before/after).
pub fn bridge_logged(
    dir: &Path,
    broker: &Broker,
    write_url: &str,
    client_id: &str,
    mqtt: &str,
    remote_write: &str,
    log: &str,
) -> (Proc, u16) {
    let source = format!("[mqtt]\nclient_id = \"{client_id}\"\n{mqtt}\n{}", broker.client_toml(Who::Bridge));
    spawn_bridge(dir, client_id, &source, write_url, remote_write, log)
}

/// A bridge taking the devices' messages from a NATS cluster's JetStream
/// (`[jetstream]`, with `jetstream` keys), logging at `log`.
pub fn bridge_on_nats(
    dir: &Path,
    cluster: &nats::NatsCluster,
    write_url: &str,
    client_id: &str,
    jetstream: &str,
    remote_write: &str,
    log: &str,
) -> (Proc, u16) {
    let source = format!("[mqtt]\nclient_id = \"{client_id}\"\n{}", cluster.bridge_toml(jetstream));
    spawn_bridge(dir, client_id, &source, write_url, remote_write, log)
}

/// An Ed25519 key pair made by openssl in `dir`: (`<name>.key`, the
/// private key, PKCS#8 PEM; `<name>.pub`, its public key, PEM), as an
/// operator makes one to sign documents, models and program packs.
pub fn ed25519_key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let (k, p) = (key.display().to_string(), public.display().to_string());
    for args in [vec!["genpkey", "-algorithm", "ed25519", "-out", &k], vec!["pkey", "-in", &k, "-pubout", "-out", &p]] {
        let o = Command::new("openssl").args(&args).output().expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    (key, public)
}

/// `fleet-bridge rollout` to `group` with one canary, watching 10 s, with
/// `change` (the change's arguments: an overlay file, `--model FILE`,
/// `--programs FILE`): its exit code and everything it printed.
pub fn rollout(
    conf: &Path,
    prom: &Prom,
    group: &str,
    canary: &str,
    id: &str,
    change: &[&std::ffi::OsStr],
) -> (Option<i32>, String) {
    let o = Command::new(bin_dir().join("fleet-bridge"))
        .args(["rollout", "--config", &conf.display().to_string(), "--prometheus", &prom.url()])
        .args(["--group", group, "--canary", canary, "--id", id, "--watch-secs", "10"])
        .args(change)
        .output()
        .expect("fleet-bridge rollout");
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
}

/// The config of the operator's commands (`fleet-bridge rollout`,
/// `certificates sign`): the operator identity (fleet-admin) on the
/// broker's central listener, and `<dir>/audit` for their logs, beside the
/// bridges'. Written to `<dir>/operator.toml`.
pub fn operator_config(dir: &Path, broker: &Broker) -> PathBuf {
    let conf = dir.join("operator.toml");
    std::fs::write(
        &conf,
        format!(
            "[mqtt]\nclient_id = \"fleet-admin\"\n{}\n[audit]\ndir = \"{}\"\n",
            broker.client_toml(Who::Admin),
            dir.join("audit").display()
        ),
    )
    .expect("operator config");
    conf
}

/// `fleet-bridge certificates sign` with the operator config `conf` and
/// the device CA of `pki` (`ca.crt`, `ca.key`): its exit code and output.
pub fn certificates_sign(conf: &Path, pki: &Path) -> (Option<i32>, String) {
    let o = Command::new(bin_dir().join("fleet-bridge"))
        .args(["certificates", "sign", "--config"])
        .arg(conf)
        .arg("--ca-cert")
        .arg(pki.join("ca.crt"))
        .arg("--ca-key")
        .arg(pki.join("ca.key"))
        .output()
        .expect("fleet-bridge certificates sign");
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
}

/// A bridge with `source` (its `[mqtt]` or `[jetstream]` tables), once it
/// is subscribed (or pulling).
fn spawn_bridge(
    dir: &Path,
    client_id: &str,
    source: &str,
    write_url: &str,
    remote_write: &str,
    log: &str,
) -> (Proc, u16) {
    let metrics = free_port();
    let conf = dir.join(format!("{client_id}.toml"));
    std::fs::write(
        &conf,
        format!(
            "{source}\n[remote_write]\nurl = \"{write_url}\"\nretry_max_ms = 1000\n{remote_write}\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[audit]\ndir = \"{}\"\n",
            dir.join("audit").display()
        ),
    )
    .expect("bridge config");
    let p = Proc::spawn(
        "fleet-bridge",
        dir,
        &std::env::var_os("FLEET_BRIDGE_BIN").map_or_else(|| bin_dir().join("fleet-bridge"), PathBuf::from),
        &["--config".into(), conf.display().to_string()],
        &[("FLEET_BRIDGE_LOG", log)],
    );
    // Until the broker confirmed the subscription, messages for the bridge
    // would find no session to be queued for.
    let mut p = p;
    wait_for("the bridge's subscription", Duration::from_secs(30), || {
        p.assert_running();
        match scrape(metrics, "fleet_bridge_subscribed") {
            Ok(Some(1.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    (p, metrics)
}

/// Agent settings a test varies.
pub struct AgentSetup<'a> {
    pub device: &'a str,
    /// The broker to connect to with this device's certificate; `None`:
    /// a closed port, everything stays in the store.
    pub broker: Option<&'a Broker>,
    /// How the agent authenticates; `None`: its own device certificate.
    pub identity: Option<Who<'a>>,
    /// More `[mqtt]` keys (TOML lines), e.g. `protocol = "3.1.1"`.
    pub mqtt: &'a str,
    pub window_ms: u64,
    /// Ports put in the port class "e2e".
    pub class_ports: &'a [u16],
    /// Default: `<test dir>/agent-state`.
    pub state_dir: Option<&'a Path>,
    /// More TOML, appended after the other sections (e.g. a `[store]`).
    pub extra: &'a str,
    /// More top-level keys (TOML lines), before any table (e.g. `run_as`).
    pub top: &'a str,
    /// The `[mqtt]` connection keys and the `[mqtt.tls]` table in place of
    /// `broker`'s (a NATS node's: `NatsCluster::device_toml`).
    pub connection: Option<&'a str>,
}

impl<'a> AgentSetup<'a> {
    /// An agent with no broker (everything stays in its store), its own
    /// device certificate, 200 ms windows, no port class: `extra` says the rest.
    pub fn offline(device: &'a str, extra: &'a str) -> Self {
        AgentSetup {
            device,
            broker: None,
            identity: None,
            mqtt: "",
            window_ms: 200,
            class_ports: &[],
            state_dir: None,
            extra,
            top: "",
            connection: None,
        }
    }
}

/// `AgentSetup::extra` for an agent with every probe and detection off:
/// what it stores is its own health (in every window).
pub const QUIET: &str = "[probes.tcp_lifecycle]\nenabled = false\n[probes.devices]\nenabled = false\n\
                         [probes.protocols]\nenabled = false\n[probes.buses]\nenabled = false\n[detect]\n\
                         enabled = false\n";

/// Set (to anything): every agent the tests start runs with the kernel's
/// BTF hidden (`scripts/test.sh` runs the probe tests once more so).
pub const HIDE_BTF: &str = "EDGE_E2E_HIDE_BTF";

pub struct Agent {
    pub proc: Proc,
    pub metrics_port: u16,
    conf: PathBuf,
    dir: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, s: &AgentSetup) -> Agent {
        let mut a = Agent::launch(dir, s);
        a.wait_attached();
        a
    }

    /// Starts the agent without waiting for its probe (for agents run with
    /// `[probes.tcp_lifecycle] enabled = false`).
    pub fn launch(dir: &Path, s: &AgentSetup) -> Agent {
        let metrics_port = free_port();
        let conf = dir.join("agent.toml");
        let ports: Vec<String> = s.class_ports.iter().map(u16::to_string).collect();
        std::fs::write(
            &conf,
            format!(
                "device_id = \"{}\"\nstate_dir = \"{}\"\n{}\n[window]\nmillis = {}\n\
                 [mqtt]\nreconnect_max_ms = 500\ndelivery_timeout_ms = 2000\nkeep_alive_secs = 5\n{}\n{}\
                 [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
                 [probes.tcp_lifecycle.port_classes]\ne2e = [{}]\n{}\n",
                s.device,
                s.state_dir.map_or_else(|| dir.join("agent-state"), Path::to_path_buf).display(),
                s.top,
                s.window_ms,
                s.mqtt,
                match (s.connection, s.broker) {
                    (Some(keys), _) => keys.to_owned(),
                    (None, Some(b)) => b.client_toml(s.identity.unwrap_or(Who::Device(s.device))),
                    (None, None) => format!("port = {}\n[mqtt.tls]\nenabled = false\n", free_port()),
                },
                ports.join(", "),
                s.extra,
            ),
        )
        .expect("agent config");
        Agent { proc: Agent::spawn(dir, &conf, &[]), metrics_port, conf, dir: dir.to_owned() }
    }

    fn spawn(dir: &Path, conf: &Path, more_env: &[(&str, &str)]) -> Proc {
        let bin = bin_dir().join("edge-agent");
        let args = ["--config".to_string(), conf.display().to_string()];
        let mut env = vec![("EDGE_AGENT_LOG", "info,edge_agent=debug")];
        env.extend_from_slice(more_env);
        if std::env::var_os(HIDE_BTF).is_none() {
            return Proc::spawn("edge-agent", dir, &bin, &args, &env);
        }
        // The no-BTF baseline on this kernel: the agent runs in a private
        // mount namespace where /sys/kernel/btf is an empty tmpfs (unshare
        // execs, so the pid is the agent's). It does not start if hiding
        // failed.
        let mut wrapped = vec![
            "--mount".to_string(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            "mount -t tmpfs none /sys/kernel/btf && test ! -e /sys/kernel/btf/vmlinux && exec \"$0\" \"$@\"".into(),
            bin.display().to_string(),
        ];
        wrapped.extend(args);
        Proc::spawn("edge-agent", dir, Path::new("unshare"), &wrapped, &env)
    }

    fn wait_attached(&mut self) {
        let port = self.metrics_port;
        let attached = wait_for("the agent's probe to attach", Duration::from_secs(30), || {
            self.proc.assert_running();
            scrape(port, "edge_agent_probe_attached{probe=\"tcp_lifecycle\"}")
                .and_then(|v| v.ok_or_else(|| "no metric".into()))
        });
        assert_eq!(attached, 1.0, "probe not attached; agent log:\n{}", self.proc.log_text());
    }

    /// The agent's config file (tests rewrite it before a SIGHUP).
    pub fn config_path(&self) -> &Path {
        &self.conf
    }

    /// Starts the agent again with the same config and state directory.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Starts the agent again with more environment (e.g. libfaketime's).
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.proc = Agent::spawn(&self.dir, &self.conf, env);
        self.wait_attached();
    }

    /// Starts the agent again without waiting for its probe (as
    /// [`Agent::launch`] to [`Agent::start`]).
    pub fn relaunch(&mut self) {
        self.proc = Agent::spawn(&self.dir, &self.conf, &[]);
    }

    pub fn metric(&self, series: &str) -> Option<f64> {
        scrape(self.metrics_port, series).ok().flatten()
    }
}

/// Posts every remote-write body (encoded, snappy) to `url` with `senders`
/// requests at once, each answered 2xx or the caller panics: the direct
/// loads the bridge's throughput is compared with. `headers`: the
/// remote-write headers (fleet_bridge::remote_write::HEADERS).
pub fn post_all(url: &str, bodies: &[Vec<u8>], senders: usize, headers: &[(&str, &str)]) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..senders {
            s.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { return };
                    let mut req = agent.post(url);
                    for (k, v) in headers {
                        req = req.header(*k, *v);
                    }
                    let status = req.send(body.as_slice()).map(|r| r.status().as_u16()).unwrap_or(0);
                    assert!((200..300).contains(&status), "direct remote write: status {status}");
                }
            });
        }
    });
}

/// A TCP proxy on a free loopback port that delivers every byte `delay`
/// after it arrived, both ways, bandwidth unlimited: a long link (a
/// cellular or satellite hop) where netem is not available. Runs until the
/// test process ends.
pub struct LatencyProxy {
    pub port: u16,
}

impl LatencyProxy {
    pub fn start(upstream: u16, delay: Duration) -> LatencyProxy {
        let port = free_port();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("proxy bind");
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    if let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) {
                        LatencyProxy::pump(from, to, delay);
                    }
                }
            }
        });
        LatencyProxy { port }
    }

    /// Reads `from` as bytes come and writes each chunk to `to` once it is
    /// `delay` old; a close travels the same way.
    fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
        use std::io::{Read, Write};
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = from.read(&mut buf).unwrap_or(0);
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() || n == 0 {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for (due, chunk) in rx {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if chunk.is_empty() || to.write_all(&chunk).is_err() {
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
        });
    }
}

/// A TCP server on a free port that accepts and closes connections.
pub struct Server {
    pub port: u16,
    listener: TcpListener,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        Server { port, listener }
    }

    /// Makes `n` complete connections: connect, accept, close both ends.
    pub fn connections(&self, n: usize) {
        for _ in 0..n {
            let c = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
            let (a, _) = self.listener.accept().expect("accept");
            drop(c);
            drop(a);
        }
    }
}

/// A port with nothing listening: connections to it are refused.
pub fn refused(port: u16, n: usize) {
    for _ in 0..n {
        let r = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(r.is_err(), "connection to {port} unexpectedly succeeded");
    }
}

pub fn tempdir(name: &str) -> PathBuf {
    let base = std::env::var_os("E2E_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("edge-e2e-{name}-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A pseudo-terminal pair in raw mode (no echo, no line editing, 8 bits):
/// the master side as a file, and the slave side's path (a serial line as
/// a process sees it). The slave is held open by a leaked descriptor so the
/// line never reads as hung up.
pub fn pty_pair() -> std::io::Result<(std::fs::File, String)> {
    use std::os::fd::FromRawFd;
    let check = |rc: i32| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) };
    // SAFETY: plain libc calls on descriptors this process owns; the
    // master descriptor is handed to the File exactly once.
    unsafe {
        let master = check(libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY))?;
        check(libc::grantpt(master))?;
        check(libc::unlockpt(master))?;
        let mut name = [0 as libc::c_char; 64];
        check(libc::ptsname_r(master, name.as_mut_ptr(), name.len()))?;
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let slave = check(libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY))?;
        let mut t: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(slave, &mut t))?;
        libc::cfmakeraw(&mut t);
        check(libc::tcsetattr(slave, libc::TCSANOW, &t))?;
        Ok((std::fs::File::from_raw_fd(master), path))
    }
}

/// The Modbus RTU frame check (CRC-16, polynomial 0xA001, initial 0xFFFF),
/// sent low byte first.
pub fn modbus_crc16(data: &[u8]) -> u16 {
    let mut crc = 0xffffu16;
    for b in data {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xa001 } else { crc >> 1 };
        }
    }
    crc
}

/// The newest stored value of a series the agent keeps in its windows (not
/// on /metrics, like histograms): `edge-agent store export` of its store.
/// `labels`: `name="value"` pairs the series must carry.
pub fn stored(dir: &std::path::Path, metric: &str, labels: &[&str]) -> Option<f64> {
    stored_rows(dir, metric, labels).into_iter().map(|(_, v)| v).next_back()
}

/// The newest stored value of every series of `metric` with `labels`,
/// summed (a metric split by a label the caller does not name).
pub fn stored_sum(dir: &std::path::Path, metric: &str, labels: &[&str]) -> f64 {
    let newest: std::collections::BTreeMap<String, f64> = stored_rows(dir, metric, labels).into_iter().collect();
    newest.values().sum()
}

/// `(timestamp_ms, value)` of every stored sample of the one series of
/// `metric` with `labels`, oldest first: what Prometheus must hold of it
/// once everything is delivered.
pub fn stored_samples(dir: &std::path::Path, metric: &str, labels: &[&str]) -> Vec<(i64, f64)> {
    stored_export(dir, metric, labels).into_iter().map(|(t, _, v)| (t, v)).collect()
}

/// Waits until the agent has stored `n` windows that ended after this
/// call: whatever the kernel counted before it is in the store then. Tests
/// that check exact counts ("and nothing more arrived") synchronise on
/// the agent's own windows this way, not on time.
pub fn settled(dir: &std::path::Path, n: usize) {
    let since = now_ms();
    wait_for(&format!("{n} more windows stored"), Duration::from_secs(60 + n as u64), || {
        let ends: std::collections::BTreeSet<i64> =
            export_csv(dir).lines().filter_map(|l| l.split(',').next()?.parse().ok()).filter(|&t| t > since).collect();
        (ends.len() >= n).then_some(()).ok_or(format!("{} of {n}", ends.len()))
    });
}

/// Waits until thread `tid` of this process is inside system call `nr`
/// (`/proc/self/task/<tid>/syscall`), e.g. blocked in read(2).
pub fn in_syscall(tid: u32, nr: libc::c_long) {
    let path = format!("/proc/self/task/{tid}/syscall");
    wait_for(&format!("thread {tid} in system call {nr}"), Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        (text.split(' ').next() == Some(nr.to_string().as_str())).then_some(()).ok_or(text)
    });
}

/// (series labels, value) of every stored row of `metric` with `labels`,
/// oldest first (`edge-agent store export --format csv`).
fn stored_rows(dir: &std::path::Path, metric: &str, labels: &[&str]) -> Vec<(String, f64)> {
    stored_export(dir, metric, labels).into_iter().map(|(_, s, v)| (s, v)).collect()
}

/// (timestamp_ms, series labels, value) of every stored row of `metric`
/// with `labels`, oldest first.
fn stored_export(dir: &std::path::Path, metric: &str, labels: &[&str]) -> Vec<(i64, String, f64)> {
    // CSV quotes double the label values' quotes.
    let wanted: Vec<String> = labels.iter().map(|l| l.replace('"', "\"\"")).collect();
    export_csv(dir)
        .lines()
        .filter_map(|l| {
            let mut cols = l.splitn(4, ',');
            let (t, _, name, rest) = (cols.next()?, cols.next()?, cols.next()?, cols.next()?);
            let (series, value) = rest.rsplit_once(',')?;
            (name == metric && wanted.iter().all(|w| series.contains(w.as_str())))
                .then(|| Some((t.parse().ok()?, series.to_owned(), value.trim().parse().ok()?)))?
        })
        .collect()
}

/// The agent's store in `dir` as CSV (`edge-agent store export --format csv`).
fn export_csv(dir: &std::path::Path) -> String {
    let out = Command::new(bin_dir().join("edge-agent"))
        .args(["store", "export", "--dir", &dir.join("agent-state/store").display().to_string(), "--format", "csv"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many of a process's descriptors are kernel objects whose link text
/// (`anon_inode:bpf-map`, `anon_inode:bpf_link`, `anon_inode:[perf_event]`,
/// ...) contains one of `kinds`.
pub fn kernel_objects(pid: i32, kinds: &[&str]) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| {
                    let t = t.to_string_lossy();
                    kinds.iter().any(|k| t.contains(k))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Fault injection in front of a real remote-write endpoint: a loopback
/// HTTP forwarder that answers `500 injected failure` to every request
/// whose body (snappy-decompressed protobuf) contains `marker`, e.g. a
/// label value, and passes every other request to `upstream` unchanged,
/// returning its answer. Stops with the test process.
pub struct FaultyStore {
    pub port: u16,
    /// Requests answered with the injected failure.
    pub injected: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultyStore {
    pub fn start(upstream: &str, marker: &str) -> FaultyStore {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let injected = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (upstream, marker, count) = (upstream.to_owned(), marker.as_bytes().to_vec(), injected.clone());
        std::thread::spawn(move || {
            let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                // Headers, then Content-Length bytes of body.
                let (head_len, body_len) = loop {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break (0, 0),
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                if head_len == 0 {
                    continue;
                }
                while buf.len() < head_len + body_len {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let body = &buf[head_len..];
                let raw = snap::raw::Decoder::new().decompress_vec(body).unwrap_or_default();
                let (status, text) = if raw.windows(marker.len()).any(|w| w == marker.as_slice()) {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (500, "injected failure".to_string())
                } else {
                    let mut req = http.post(&upstream);
                    for (k, v) in [
                        ("Content-Encoding", "snappy"),
                        ("Content-Type", "application/x-protobuf"),
                        ("X-Prometheus-Remote-Write-Version", "0.1.0"),
                    ] {
                        req = req.header(k, v);
                    }
                    match req.send(body) {
                        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
                        Err(e) => (502, e.to_string()),
                    }
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        FaultyStore { port, injected }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }
}

/// `edge-agent store export --format features` of a test's store: one map
/// per window row, column name -> value.
pub fn export_features(dir: &Path) -> Vec<std::collections::HashMap<String, f64>> {
    let out = std::process::Command::new(bin_dir().join("edge-agent"))
        .args([
            "store",
            "export",
            "--dir",
            &dir.join("agent-state/store").display().to_string(),
            "--format",
            "features",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<String> =
        lines.next().unwrap().split(',').map(|h| h.trim_matches('"').replace("\"\"", "\"")).collect();
    assert_eq!(&header[..4], ["timestamp_ms", "time", "feature_version", "window_s"]);
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .filter(|(h, _)| h.as_str() != "time")
                .map(|(h, v)| (h.clone(), v.parse().unwrap_or_else(|_| panic!("{h}={v}"))))
                .collect()
        })
        .collect()
}

/// A bridge's audit log (`<dir>`, docs/audit.md), as JSON values, in file
/// order.
pub fn audit_log(dir: &Path) -> Vec<serde_json::Value> {
    // The records' files, `<day>.<bridge>.jsonl`; not the operators' logs
    // beside them.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.ends_with(".jsonl") && name.starts_with(|c: char| c.is_ascii_digit())
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
        .map(|l| serde_json::from_str(&l).expect("a JSON line"))
        .collect()
}

/// (event, link) of a device's records in the audit log in `dir`.
pub fn audit_events(dir: &Path, device: &str) -> Vec<(String, String)> {
    audit_log(dir)
        .iter()
        .filter(|l| l["device"] == device)
        .map(|l| (l["event"].as_str().unwrap_or("").to_owned(), l["link"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    /// Ports handed out but not bound yet (the servers start later) are
    /// never handed out again: 5,000 picks from ~22,000 ports would
    /// repeat one with near certainty otherwise.
    #[test]
    fn a_port_is_handed_out_once_per_process() {
        let picks: Vec<u16> = (0..5000).map(|_| super::free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = picks.iter().copied().collect();
        assert_eq!(distinct.len(), picks.len());
    }
}
