//! The scenario runner's box: normal factory-floor activity and labelled
//! faults, generated for real on this machine and seen by the agent's
//! probes like any other program's.
//!
//! Normal activity (its load drifts slowly, a sine of 10 minutes between
//! 0.6 and 1.4 of nominal, with random jitter on every interval):
//! * a Modbus TCP server on 127.0.0.1:502 polled by three persistent
//!   clients (5 requests/s each) and an HMI that connects every 3 s for
//!   three requests;
//! * a web HMI on 127.0.0.1:8080: short HTTP requests, about 1 per second;
//! * a serial sensor: a Modbus RTU slave on a pseudo-terminal (linked as
//!   [`SENSOR_LINK`]), replying in 8 to 14 ms like a 9600-baud line,
//!   polled 10 times a second by a reader that reads with a 0.5 s line
//!   timeout (VTIME) and drains the line after a bad frame (a non-blocking
//!   read until EAGAIN) before retrying, as serial masters do.
//!
//! Faults (each switched on and off by [`Box::set_fault`]):
//! * `packet_loss`: nftables drops 20% of the packets to port 502;
//! * `connection_storm`: 100 extra connections a second to the web HMI;
//! * `refused`: 20 connections a second to 8081, where nothing listens;
//! * `sensor_stall`: the sensor stops answering;
//! * `sensor_errors`: half of the sensor's replies fail their CRC;
//! * `read_rate_drop`: the reader polls once a second instead of ten times.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub const FAULTS: [&str; 6] =
    ["packet_loss", "connection_storm", "refused", "sensor_stall", "sensor_errors", "read_rate_drop"];

pub const MODBUS_PORT: u16 = 502;
pub const WEB_PORT: u16 = 8080;
pub const CLOSED_PORT: u16 = 8081;
const NFT_TABLE: &str = "edge_scenarios";
/// The sensor's name, the same in every run: the device features of a
/// model trained on one run are named by it (`dev_ops_per_s{<link>}`).
pub const SENSOR_LINK: &str = "/run/edge-scenarios/ttyRS485-0";

/// xorshift64*: the runner's randomness, seeded, no dependency.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// `d` scaled by a uniform factor in [1 - spread, 1 + spread].
    pub fn jitter(&mut self, d: Duration, spread: f64) -> Duration {
        d.mul_f64(1.0 - spread + 2.0 * spread * self.unit())
    }
    /// An exponential interval with mean `mean` (Poisson arrivals).
    pub fn exp(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-(1.0 - self.unit()).ln()).min(mean * 10)
    }
}

/// What every generator thread shares.
struct Shared {
    stop: AtomicBool,
    started: Instant,
    stall: AtomicBool,
    bad_crc: AtomicBool,
    slow_reader: AtomicBool,
    storm: AtomicBool,
    refused: AtomicBool,
    /// Requests the reader gave up on, replies with a bad CRC (for the log).
    timeouts: AtomicU64,
    bad_frames: AtomicU64,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    /// The slow drift of load: a factor between 0.6 and 1.4 (period 10 min).
    fn load(&self) -> f64 {
        let t = self.started.elapsed().as_secs_f64();
        1.0 + 0.4 * (t * std::f64::consts::TAU / 600.0).sin()
    }
    /// Sleeps `d` divided by the load, in slices so that stop is prompt.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d.div_f64(self.load());
        while !self.stopped() {
            let now = Instant::now();
            if now >= end {
                return;
            }
            thread::sleep((end - now).min(Duration::from_millis(100)));
        }
    }
}

/// The running box: generators on threads, the sensor's pty link, faults.
pub struct Box {
    shared: Arc<Shared>,
    threads: Vec<thread::JoinHandle<()>>,
    pub sensor_link: PathBuf,
    nft: bool,
}

fn modbus_crc16(data: &[u8]) -> u16 {
    e2e::modbus_crc16(data)
}

impl Box {
    /// Starts every normal generator.
    pub fn start(seed: u64) -> Result<Box, String> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            started: Instant::now(),
            stall: AtomicBool::new(false),
            bad_crc: AtomicBool::new(false),
            slow_reader: AtomicBool::new(false),
            storm: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            timeouts: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
        });
        let modbus = TcpListener::bind(("127.0.0.1", MODBUS_PORT))
            .map_err(|e| format!("cannot listen on 127.0.0.1:{MODBUS_PORT} for the Modbus TCP server: {e} (run as root, with the port free)"))?;
        let web = TcpListener::bind(("127.0.0.1", WEB_PORT))
            .map_err(|e| format!("cannot listen on 127.0.0.1:{WEB_PORT} for the web HMI: {e} (free the port)"))?;
        if TcpStream::connect(("127.0.0.1", CLOSED_PORT)).is_ok() {
            return Err(format!("something listens on 127.0.0.1:{CLOSED_PORT}; the refused fault needs it closed"));
        }
        let (master, pts) = open_pty()?;
        let sensor_link = PathBuf::from(SENSOR_LINK);
        let dir = sensor_link.parent().expect("an absolute path");
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::remove_file(&sensor_link);
        std::os::unix::fs::symlink(&pts, &sensor_link)
            .map_err(|e| format!("cannot link {} to {pts}: {e}", sensor_link.display()))?;
        let mut b = Box { shared, threads: Vec::new(), sensor_link: sensor_link.clone(), nft: false };
        let mut rng = Rng::new(seed);
        b.spawn("modbus-server", move |s| modbus_server(s, modbus));
        b.spawn("web-server", move |s| web_server(s, web));
        for i in 0..3 {
            let r = Rng::new(rng.next_u64() + i);
            b.spawn("modbus-poller", move |s| modbus_poller(s, r));
        }
        let r = Rng::new(rng.next_u64());
        b.spawn("modbus-hmi", move |s| modbus_hmi(s, r));
        let r = Rng::new(rng.next_u64());
        b.spawn("web-clients", move |s| web_clients(s, r));
        let r = Rng::new(rng.next_u64());
        b.spawn("sensor", move |s| sensor(s, master, r));
        let r = Rng::new(rng.next_u64());
        b.spawn("reader", move |s| reader(s, &sensor_link, r));
        b.spawn("storm", storm);
        b.spawn("refused", refused);
        Ok(b)
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce(&Shared) + Send + 'static) {
        let s = self.shared.clone();
        let h = thread::Builder::new().name(name.into()).spawn(move || f(&s)).expect("spawn a generator");
        self.threads.push(h);
    }

    /// Switches a fault (one of [`FAULTS`]) on or off.
    pub fn set_fault(&mut self, fault: &str, on: bool) -> Result<(), String> {
        let s = &self.shared;
        match fault {
            "packet_loss" => {
                if on {
                    nft(&format!(
                        "add table inet {NFT_TABLE}\n\
                         add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n\
                         add rule inet {NFT_TABLE} out ip daddr 127.0.0.1 tcp dport {MODBUS_PORT} numgen random mod 100 < 20 drop\n"
                    ))?;
                    self.nft = true;
                } else {
                    nft_remove();
                    self.nft = false;
                }
            }
            "connection_storm" => s.storm.store(on, Ordering::Relaxed),
            "refused" => s.refused.store(on, Ordering::Relaxed),
            "sensor_stall" => s.stall.store(on, Ordering::Relaxed),
            "sensor_errors" => s.bad_crc.store(on, Ordering::Relaxed),
            "read_rate_drop" => s.slow_reader.store(on, Ordering::Relaxed),
            other => return Err(format!("unknown fault {other:?}: one of {FAULTS:?}")),
        }
        Ok(())
    }

    /// Reader timeouts and bad frames so far.
    pub fn serial_trouble(&self) -> (u64, u64) {
        (self.shared.timeouts.load(Ordering::Relaxed), self.shared.bad_frames.load(Ordering::Relaxed))
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if self.nft {
            nft_remove();
            self.nft = false;
        }
        // Wake the servers blocked in accept.
        let _ = TcpStream::connect(("127.0.0.1", MODBUS_PORT));
        let _ = TcpStream::connect(("127.0.0.1", WEB_PORT));
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.sensor_link);
    }
}

impl Drop for Box {
    fn drop(&mut self) {
        self.halt();
    }
}

fn nft(script: &str) -> Result<(), String> {
    let mut c = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft (apt-get install nftables): {e}"))?;
    c.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    let st = c.wait().map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("nft failed ({st}) on:\n{script}"))
    }
}

/// Removes the runner's nftables table (also one a killed run left).
pub fn nft_remove() {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", NFT_TABLE])
        .stderr(std::process::Stdio::null())
        .status();
}

fn open_pty() -> Result<(i32, String), String> {
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain libc calls on descriptors this process owns, with
    // buffers that outlive them.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        if master < 0 || libc::grantpt(master) != 0 || libc::unlockpt(master) != 0 {
            return Err(err("cannot open a pseudo-terminal"));
        }
        let mut name = [0 as libc::c_char; 64];
        if libc::ptsname_r(master, name.as_mut_ptr(), name.len()) != 0 {
            return Err(err("ptsname_r"));
        }
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        Ok((master, path))
    }
}

/// The serial sensor: a Modbus RTU slave on the pty's master side.
fn sensor(s: &Shared, master: i32, mut rng: Rng) {
    let mut buf = Vec::new();
    while !s.stopped() {
        let mut pfd = libc::pollfd { fd: master, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let mut chunk = [0u8; 256];
        // SAFETY: reads into a buffer this thread owns.
        let n = unsafe { libc::read(master, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n <= 0 {
            // The reader has not opened the line yet (EIO): wait.
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        buf.extend_from_slice(&chunk[..n as usize]);
        while buf.len() >= 8 {
            let frame: Vec<u8> = buf.drain(..8).collect();
            if s.stall.load(Ordering::Relaxed) {
                continue;
            }
            let start = u16::from_be_bytes([frame[2], frame[3]]);
            let count = u16::from_be_bytes([frame[4], frame[5]]).min(16);
            let mut reply = vec![frame[0], 3, (2 * count) as u8];
            for r in 0..count {
                let v = 200u16.wrapping_add(start + r).wrapping_add((rng.next_u64() % 7) as u16);
                reply.extend_from_slice(&v.to_be_bytes());
            }
            let mut crc = modbus_crc16(&reply);
            if s.bad_crc.load(Ordering::Relaxed) && rng.unit() < 0.5 {
                crc ^= 0x5a5a;
            }
            reply.extend_from_slice(&crc.to_le_bytes());
            // A 9600-baud line: ~1 ms a byte, plus the sensor's own time.
            thread::sleep(Duration::from_micros(8_000 + rng.next_u64() % 6_000));
            // SAFETY: writes from a buffer this thread owns.
            unsafe { libc::write(master, reply.as_ptr().cast(), reply.len()) };
        }
    }
    // SAFETY: the master is this thread's.
    unsafe { libc::close(master) };
}

/// The serial master: polls registers 0..4 ten times a second.
fn reader(s: &Shared, link: &Path, mut rng: Rng) {
    let path = std::ffi::CString::new(link.as_os_str().as_encoded_bytes()).expect("no NUL in the link");
    // SAFETY: plain libc calls on a descriptor this thread owns, with
    // buffers that outlive them.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            eprintln!("reader: cannot open {}: {}", link.display(), std::io::Error::last_os_error());
            return;
        }
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(fd, &mut t);
        libc::cfmakeraw(&mut t);
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 5;
        libc::tcsetattr(fd, libc::TCSANOW, &t);
        let mut req = vec![1u8, 3, 0, 0, 0, 4];
        let crc = modbus_crc16(&req);
        req.extend_from_slice(&crc.to_le_bytes());
        while !s.stopped() {
            for _attempt in 0..3 {
                libc::write(fd, req.as_ptr().cast(), req.len());
                let mut got = Vec::new();
                while got.len() < 13 {
                    let mut b = [0u8; 32];
                    let n = libc::read(fd, b.as_mut_ptr().cast(), 13 - got.len());
                    if n <= 0 {
                        break;
                    }
                    got.extend_from_slice(&b[..n as usize]);
                }
                if got.len() < 13 {
                    s.timeouts.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if modbus_crc16(&got[..11]).to_le_bytes() == got[11..13] {
                    break;
                }
                // A bad frame: drain the line (non-blocking, until EAGAIN) and retry.
                s.bad_frames.fetch_add(1, Ordering::Relaxed);
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
                let mut b = [0u8; 64];
                while libc::read(fd, b.as_mut_ptr().cast(), b.len()) > 0 {}
                libc::fcntl(fd, libc::F_SETFL, fl);
            }
            let period = if s.slow_reader.load(Ordering::Relaxed) { 1000 } else { 100 };
            // The polling rate is the PLC's cycle, not the load's.
            thread::sleep(rng.jitter(Duration::from_millis(period), 0.2));
        }
        libc::close(fd);
    }
}

fn modbus_request(tid: u16, start: u16, count: u16) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[0..2].copy_from_slice(&tid.to_be_bytes());
    f[4..6].copy_from_slice(&6u16.to_be_bytes());
    f[6] = 1;
    f[7] = 3;
    f[8..10].copy_from_slice(&start.to_be_bytes());
    f[10..12].copy_from_slice(&count.to_be_bytes());
    f
}

fn modbus_server(s: &Shared, l: TcpListener) {
    for c in l.incoming() {
        if s.stopped() {
            return;
        }
        let Ok(mut c) = c else { continue };
        thread::spawn(move || {
            let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
            let mut req = [0u8; 12];
            while c.read_exact(&mut req).is_ok() {
                let count = u16::from_be_bytes([req[10], req[11]]).min(32);
                let mut reply = Vec::with_capacity(9 + 2 * count as usize);
                reply.extend_from_slice(&req[0..4]);
                reply.extend_from_slice(&(3 + 2 * count).to_be_bytes());
                reply.extend_from_slice(&[req[6], 3, (2 * count) as u8]);
                for r in 0..count {
                    reply.extend_from_slice(&(1000 + r).to_be_bytes());
                }
                if c.write_all(&reply).is_err() {
                    return;
                }
            }
        });
    }
}

fn modbus_exchange(c: &mut TcpStream, tid: u16) -> std::io::Result<()> {
    c.write_all(&modbus_request(tid, 0, 8))?;
    let mut reply = [0u8; 9 + 16];
    c.read_exact(&mut reply)
}

fn modbus_connect() -> Option<TcpStream> {
    let c = TcpStream::connect_timeout(&(std::net::Ipv4Addr::LOCALHOST, MODBUS_PORT).into(), Duration::from_secs(5));
    let c = c.ok()?;
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = c.set_nodelay(true);
    Some(c)
}

/// A PLC-like poller: one connection, 5 requests a second, reconnects.
fn modbus_poller(s: &Shared, mut rng: Rng) {
    let mut tid = 0u16;
    while !s.stopped() {
        let Some(mut c) = modbus_connect() else {
            s.pause(Duration::from_secs(1));
            continue;
        };
        while !s.stopped() {
            tid = tid.wrapping_add(1);
            if modbus_exchange(&mut c, tid).is_err() {
                break;
            }
            s.pause(rng.jitter(Duration::from_millis(200), 0.3));
        }
    }
}

/// An HMI panel: connects every 3 s, reads three times, disconnects.
fn modbus_hmi(s: &Shared, mut rng: Rng) {
    while !s.stopped() {
        if let Some(mut c) = modbus_connect() {
            for tid in 0..3 {
                if modbus_exchange(&mut c, tid).is_err() {
                    break;
                }
            }
        }
        s.pause(rng.exp(Duration::from_secs(3)));
    }
}

fn web_server(s: &Shared, l: TcpListener) {
    let page = vec![b'x'; 2048];
    for c in l.incoming() {
        if s.stopped() {
            return;
        }
        let Ok(mut c) = c else { continue };
        let page = page.clone();
        thread::spawn(move || {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut b = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", page.len());
            let _ = c.write_all(head.as_bytes()).and_then(|_| c.write_all(&page));
        });
    }
}

fn web_get() {
    let addr = (std::net::Ipv4Addr::LOCALHOST, WEB_PORT).into();
    if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = c.write_all(b"GET /status HTTP/1.1\r\nHost: hmi\r\n\r\n");
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    }
}

/// Operators' browsers: about one request a second (Poisson).
fn web_clients(s: &Shared, mut rng: Rng) {
    while !s.stopped() {
        web_get();
        s.pause(rng.exp(Duration::from_secs(1)));
    }
}

/// The connection storm fault: 100 connections a second while on.
fn storm(s: &Shared) {
    while !s.stopped() {
        if s.storm.load(Ordering::Relaxed) {
            web_get();
            thread::sleep(Duration::from_millis(10));
        } else {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The refused fault: 20 connection attempts a second to a closed port.
fn refused(s: &Shared) {
    while !s.stopped() {
        if s.refused.load(Ordering::Relaxed) {
            let _ = TcpStream::connect(("127.0.0.1", CLOSED_PORT));
            thread::sleep(Duration::from_millis(50));
        } else {
            thread::sleep(Duration::from_millis(100));
        }
    }
}
