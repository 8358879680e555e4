//! A simulated PLC serving a pump (e2e::pump) over Modbus/TCP, polled by an
//! HMI-like client in the same process, for the process-value tests and the
//! demo. The Modbus encoding on both ends is rmodbus's, not the agent's.
//!
//! ```text
//! pump_sim [--port P] [--hz H] [--unit U] [--seed S] [--log FILE]
//!          [--seconds N] [--fault KIND:FROM_S:TO_S]... [--no-poll]
//!          [--rtu LINK] [--wait-file F] [--writes-log FILE]
//! ```
//!
//! `--writes-log FILE`: every write request (functions 5, 6, 15, 16) the
//! server accepted from a TCP client is a JSON line `{"t": ms, "function":
//! f, "address": a, "values": [...]}` (a coil as 0 or 1): what a test's
//! `modbus_write` action did to the PLC. Coil 7 is the pump's e-stop: while
//! it is set the pump stands still.
//!
//! `--wait-file F`: the HMI starts polling once F exists (a test lets the
//! agent see the serial line first).
//!
//! `--extra-inputs N`: N more input registers from address 100 (a slow,
//! noisy reading each), polled every cycle in requests of 100 (the load
//! benchmark's 200 tags).
//!
//! With `--rtu LINK` the same PLC is also a Modbus RTU slave (the same
//! unit) on a pseudo-terminal whose slave side is linked at LINK (a serial
//! device as the HMI sees it); the HMI polls it too, in the same way, and
//! logs its values as `rtu_<tag>`.
//!
//! Prints `listening <port>` once the server accepts connections. The HMI
//! polls every 1/H s: input registers 0..16 (measurements and unmapped
//! diagnostics, one request), holding registers 0..16, coils 0..8 and
//! discrete inputs 0..8; every 10th poll it writes the speed setpoint (fn
//! 6), the pressure limit (fn 16) and the run coil (fn 5), every 25th
//! coils 0..4 (fn 15). With `--log`, every value it read or wrote (and the
//! server accepted) is a JSON line `{"t": ms, "tag": name, "value": v,
//! "bits": the f64's bits}`, the
//! value computed as the tag map does (number × scale + offset), and every
//! second a line `{"t": ms, "labels": [...]}` with the faults active.

use e2e::pump::{self, map, Fault, FaultKind, Pump};
use rmodbus::client::ModbusRequest;
use rmodbus::server::context::ModbusContext;
use rmodbus::server::storage::ModbusStorageFull;
use rmodbus::server::ModbusFrame;
use rmodbus::ModbusProto;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Storage = Arc<Mutex<ModbusStorageFull>>;

/// A tag as the simulator knows it (configs/tags/pump.toml must agree: a
/// test compares them).
pub struct SimTag {
    pub name: &'static str,
    pub table: &'static str,
    pub address: u16,
    pub kind: &'static str,
    pub order: &'static str,
    pub scale: f64,
}

const TAGS: &[SimTag] = &[
    SimTag { name: "vibration_rms", table: "input", address: map::VIBRATION, kind: "u16", order: "ABCD", scale: 0.01 },
    SimTag { name: "motor_current", table: "input", address: map::CURRENT, kind: "i16", order: "ABCD", scale: 0.1 },
    SimTag {
        name: "discharge_pressure",
        table: "input",
        address: map::PRESSURE,
        kind: "f32",
        order: "ABCD",
        scale: 1.0,
    },
    SimTag {
        name: "bearing_temperature",
        table: "input",
        address: map::TEMPERATURE,
        kind: "f32",
        order: "CDAB",
        scale: 1.0,
    },
    SimTag { name: "flow", table: "input", address: map::FLOW, kind: "u32", order: "BADC", scale: 0.001 },
    SimTag { name: "motor_power", table: "input", address: map::POWER, kind: "i32", order: "DCBA", scale: 1.0 },
    SimTag {
        name: "speed_setpoint",
        table: "holding",
        address: map::SPEED_SETPOINT,
        kind: "u16",
        order: "ABCD",
        scale: 1.0,
    },
    SimTag {
        name: "pressure_limit",
        table: "holding",
        address: map::PRESSURE_LIMIT,
        kind: "f32",
        order: "BADC",
        scale: 1.0,
    },
    SimTag { name: "run_seconds", table: "holding", address: map::RUN_SECONDS, kind: "u64", order: "ABCD", scale: 1.0 },
    SimTag { name: "efficiency", table: "holding", address: map::EFFICIENCY, kind: "f64", order: "CDAB", scale: 1.0 },
    SimTag {
        name: "energy_delta",
        table: "holding",
        address: map::ENERGY_DELTA,
        kind: "i64",
        order: "DCBA",
        scale: 1.0,
    },
    SimTag { name: "pump_run", table: "coil", address: map::RUN, kind: "bool", order: "ABCD", scale: 1.0 },
    SimTag {
        name: "motor_ready",
        table: "discrete_input",
        address: map::MOTOR_READY,
        kind: "bool",
        order: "ABCD",
        scale: 1.0,
    },
];

/// The value a tag's registers (address order) stand for, decoded here
/// with the simulator's own code: number × scale + offset (0).
fn decode(t: &SimTag, regs: &[u16]) -> f64 {
    let n = match t.kind {
        "u16" | "i16" | "bool" => 1,
        "u32" | "i32" | "f32" => 2,
        _ => 4,
    };
    let mut words = regs[..n].to_vec();
    if t.order == "BADC" || t.order == "DCBA" {
        for w in &mut words {
            *w = w.swap_bytes();
        }
    }
    if t.order == "CDAB" || t.order == "DCBA" {
        words.reverse();
    }
    let bits = words.iter().fold(0u64, |a, w| a << 16 | u64::from(*w));
    let number = match t.kind {
        "bool" => (bits != 0) as u8 as f64,
        "u16" => bits as u16 as f64,
        "i16" => bits as u16 as i16 as f64,
        "u32" => bits as u32 as f64,
        "i32" => bits as u32 as i32 as f64,
        "u64" => bits as f64,
        "i64" => bits as i64 as f64,
        "f32" => f64::from(f32::from_bits(bits as u32)),
        _ => f64::from_bits(bits),
    };
    if t.scale == 1.0 {
        number
    } else {
        number * t.scale + 0.0
    }
}

fn now_ms() -> i64 {
    e2e::now_ms()
}

struct Args {
    port: u16,
    hz: f64,
    unit: u8,
    seed: u64,
    log: Option<String>,
    seconds: Option<f64>,
    faults: Vec<Fault>,
    poll: bool,
    rtu: Option<String>,
    wait_file: Option<String>,
    extra_inputs: u16,
    writes_log: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        port: 0,
        hz: 1.0,
        unit: 1,
        seed: 1,
        log: None,
        seconds: None,
        faults: vec![],
        poll: true,
        rtu: None,
        wait_file: None,
        extra_inputs: 0,
        writes_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--port" => a.port = v().parse().expect("--port"),
            "--hz" => a.hz = v().parse().expect("--hz"),
            "--unit" => a.unit = v().parse().expect("--unit"),
            "--seed" => a.seed = v().parse().expect("--seed"),
            "--log" => a.log = Some(v()),
            "--seconds" => a.seconds = Some(v().parse().expect("--seconds")),
            "--fault" => {
                let s = v();
                let p: Vec<&str> = s.split(':').collect();
                let kind = FaultKind::from_name(p[0]).unwrap_or_else(|| panic!("unknown fault {}", p[0]));
                a.faults.push(Fault { kind, from_s: p[1].parse().expect("from"), to_s: p[2].parse().expect("to") });
            }
            "--no-poll" => a.poll = false,
            "--rtu" => a.rtu = Some(v()),
            "--wait-file" => a.wait_file = Some(v()),
            "--extra-inputs" => a.extra_inputs = v().parse().expect("--extra-inputs"),
            "--writes-log" => a.writes_log = Some(v()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn main() {
    let a = args();
    let storage: Storage = Arc::default();
    let mut pump = Pump::new(a.seed);
    pump.faults = a.faults.clone();
    let pump = Arc::new(Mutex::new(pump));
    update(&storage, &mut pump.lock().unwrap(), 0.0, a.extra_inputs);
    let listener = TcpListener::bind(("127.0.0.1", a.port)).expect("bind");
    let port = listener.local_addr().unwrap().port();
    {
        let storage = storage.clone();
        let unit = a.unit;
        let writes: WritesLog =
            a.writes_log.as_ref().map(|p| Arc::new(Mutex::new(std::fs::File::create(p).expect("writes log"))));
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let (storage, writes) = (storage.clone(), writes.clone());
                std::thread::spawn(move || serve(c, unit, storage, writes));
            }
        });
    }
    // The process at 10 Hz.
    {
        let (storage, pump, extra) = (storage.clone(), pump.clone(), a.extra_inputs);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut ticks = 0u64;
            loop {
                ticks += 1;
                let at = start + Duration::from_millis(100 * ticks);
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                update(&storage, &mut pump.lock().unwrap(), 0.1, extra);
            }
        });
    }
    // The RTU slave: the pty's master side, served like the TCP port.
    let serial = a.rtu.as_ref().map(|link| {
        let (master, path) = e2e::pty_pair().expect("pseudo-terminal");
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&path, link).expect("link to the pty");
        let (storage, unit) = (storage.clone(), a.unit);
        std::thread::spawn(move || serve_rtu(master, unit, storage));
        link.clone()
    });
    println!("listening {port}");
    std::io::stdout().flush().ok();
    let log = a.log.as_ref().map(|p| Mutex::new(std::fs::File::create(p).expect("log file")));
    let mut stop = a.seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    if !a.poll {
        loop {
            if stop.is_some_and(|s| Instant::now() >= s) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let serial = serial
        .map(|link| std::fs::OpenOptions::new().read(true).write(true).open(&link).expect("open the serial line"));
    if let Some(f) = &a.wait_file {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::path::Path::new(f).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop = a.seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    }
    let mut hmi = Hmi {
        stream: None,
        serial,
        port,
        unit: a.unit,
        tid: 0,
        log,
        pump: pump.clone(),
        polls: 0,
        extra: a.extra_inputs,
    };
    let period = Duration::from_secs_f64(1.0 / a.hz);
    let start = Instant::now();
    let mut last_label = 0i64;
    loop {
        if stop.is_some_and(|s| Instant::now() >= s) {
            return;
        }
        if let Err(e) = hmi.poll(false) {
            eprintln!("pump_sim: poll: {e}");
            hmi.stream = None;
        }
        if hmi.serial.is_some() {
            if let Err(e) = hmi.poll(true) {
                eprintln!("pump_sim: RTU poll: {e}");
            }
        }
        let t = now_ms();
        if t - last_label >= 1000 {
            last_label = t;
            let labels = pump.lock().unwrap().labels();
            hmi.line(&format!("{{\"t\":{t},\"labels\":{labels:?}}}"));
        }
        hmi.polls += 1;
        let at = start + period.mul_f64(hmi.polls as f64);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
}

/// The process model's sensors into the PLC's registers.
fn update(storage: &Storage, pump: &mut Pump, dt: f64, extra: u16) {
    let mut s = storage.lock().unwrap();
    if extra > 0 {
        let t = pump.t_s;
        let regs: Vec<u16> = (0..extra)
            .map(|i| {
                let base = 1000.0 + 40.0 * f64::from(i);
                let slow = 25.0 * (t / 60.0 + f64::from(i)).sin();
                (base + slow + 3.0 * ((t * 7.3 + f64::from(i) * 1.7).sin())).round() as u16
            })
            .collect();
        s.set_inputs_bulk(100, &regs).unwrap();
    }
    // What the HMI wrote drives the process.
    pump.speed_rpm = f64::from(s.get_holding(map::SPEED_SETPOINT).unwrap_or(1450)).clamp(0.0, 3000.0);
    if pump.speed_rpm == 0.0 {
        pump.speed_rpm = 1450.0;
    }
    pump.running = (s.get_coil(map::RUN).unwrap_or(true) || pump.t_s < 1.0) && !s.get_coil(map::ESTOP).unwrap_or(false);
    let r = pump.step(dt);
    let diag = pump.diagnostics();
    let inputs = pump::input_registers(&r, diag);
    s.set_inputs_bulk(0, &inputs).unwrap();
    let mut h = [0u16; 12];
    pump::put64(&mut h, 0, pump.run_seconds(), "ABCD");
    pump::put64(&mut h, 4, r.efficiency.to_bits(), "CDAB");
    pump::put64(&mut h, 8, pump.energy_delta() as u64, "DCBA");
    s.set_holdings_bulk(map::RUN_SECONDS, &h).unwrap();
    if s.get_holding(map::SPEED_SETPOINT).unwrap_or(0) == 0 {
        s.set_holding(map::SPEED_SETPOINT, 1450).unwrap();
        let mut l = [0u16; 2];
        pump::put32(&mut l, 0, pump.pressure_limit.to_bits(), "BADC");
        s.set_holdings_bulk(map::PRESSURE_LIMIT, &l).unwrap();
        s.set_coil(map::RUN, true).unwrap();
    }
    s.set_discrete(map::MOTOR_READY, r.current_a > 1.0).unwrap();
    // Unmapped coils and discrete inputs toggle.
    for b in 1..map::BITS {
        s.set_discrete(b, (pump.t_s as u64 + u64::from(b)).is_multiple_of(3)).unwrap();
    }
}

fn read_adu(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 6];
    c.read_exact(&mut h)?;
    let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let mut adu = h.to_vec();
    adu.resize(6 + len, 0);
    c.read_exact(&mut adu[6..])?;
    Ok(adu)
}

/// The PLC's answer to one request (TCP ADU or RTU frame), by rmodbus:
/// `Ok(None)` when it owes none (another unit, a broadcast), `Err` when the
/// request is malformed or cannot be processed.
fn answer(request: &[u8], proto: ModbusProto, unit: u8, storage: &Storage) -> Result<Option<Vec<u8>>, ()> {
    let mut buf = [0u8; 256];
    let n = request.len().min(256);
    buf[..n].copy_from_slice(&request[..n]);
    let mut response = Vec::new();
    let mut frame = ModbusFrame::new(unit, &buf, proto, &mut response);
    frame.parse().map_err(drop)?;
    if frame.processing_required {
        let r = if frame.readonly {
            frame.process_read(&*storage.lock().unwrap())
        } else {
            frame.process_write(&mut *storage.lock().unwrap())
        };
        r.map_err(drop)?;
    }
    if !frame.response_required {
        return Ok(None);
    }
    frame.finalize_response().map_err(drop)?;
    Ok(Some(response))
}

type WritesLog = Option<Arc<Mutex<std::fs::File>>>;

fn serve(mut c: TcpStream, unit: u8, storage: Storage, writes: WritesLog) {
    c.set_nodelay(true).ok();
    while let Ok(adu) = read_adu(&mut c) {
        match answer(&adu, ModbusProto::TcpUdp, unit, &storage) {
            Ok(Some(reply)) => {
                // Accepted (not an exception reply): logged before the
                // client hears of it.
                if let (Some(log), Some(line)) = (&writes, write_line(&adu)) {
                    if reply.get(7).is_some_and(|f| f & 0x80 == 0) {
                        let mut f = log.lock().unwrap();
                        writeln!(f, "{line}").and_then(|()| f.flush()).expect("writes log");
                    }
                }
                if c.write_all(&reply).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(()) => return,
        }
    }
}

/// A write request (TCP ADU) as a line of the writes log; None for others.
fn write_line(adu: &[u8]) -> Option<String> {
    let be = |i: usize| Some(u16::from_be_bytes([*adu.get(i)?, *adu.get(i + 1)?]));
    let (f, address) = (*adu.get(7)?, be(8)?);
    let values: Vec<u16> = match f {
        5 => vec![u16::from(be(10)? == 0xFF00)],
        6 => vec![be(10)?],
        15 => {
            let n = be(10)?;
            (0..n)
                .map(|i| adu.get(13 + usize::from(i / 8)).map(|b| u16::from(b >> (i % 8) & 1)))
                .collect::<Option<_>>()?
        }
        16 => (0..be(10)?).map(|i| be(13 + 2 * usize::from(i))).collect::<Option<_>>()?,
        _ => return None,
    };
    Some(format!("{{\"t\":{},\"function\":{f},\"address\":{address},\"values\":{values:?}}}", now_ms()))
}

/// The length of the RTU request at the start of `b`, once known.
fn rtu_request_len(b: &[u8]) -> Option<usize> {
    match *b.get(1)? {
        15 | 16 => Some(9 + usize::from(*b.get(6)?)),
        _ => Some(8),
    }
}

/// The length of the RTU reply at the start of `b`, once known.
fn rtu_reply_len(b: &[u8]) -> Option<usize> {
    let f = *b.get(1)?;
    match f {
        1..=4 => Some(5 + usize::from(*b.get(2)?)),
        f if f & 0x80 != 0 => Some(5),
        _ => Some(8),
    }
}

/// Reads one frame whose length `len_of` tells from its first bytes.
fn read_frame(f: &mut impl Read, len_of: fn(&[u8]) -> Option<usize>) -> std::io::Result<Vec<u8>> {
    let mut b = Vec::new();
    loop {
        if let Some(n) = len_of(&b) {
            if b.len() >= n {
                return Ok(b);
            }
        }
        let mut one = [0u8; 64];
        let want = len_of(&b).map_or(1, |n| n - b.len()).min(64);
        let got = f.read(&mut one[..want])?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        b.extend_from_slice(&one[..got]);
    }
}

fn serve_rtu(mut master: std::fs::File, unit: u8, storage: Storage) {
    while let Ok(req) = read_frame(&mut master, rtu_request_len) {
        if let Ok(Some(reply)) = answer(&req, ModbusProto::Rtu, unit, &storage) {
            if master.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

struct Hmi {
    stream: Option<TcpStream>,
    serial: Option<std::fs::File>,
    port: u16,
    unit: u8,
    tid: u16,
    log: Option<Mutex<std::fs::File>>,
    pump: Arc<Mutex<Pump>>,
    polls: u64,
    extra: u16,
}

impl Hmi {
    fn line(&self, s: &str) {
        if let Some(f) = &self.log {
            let mut f = f.lock().unwrap();
            writeln!(f, "{s}").ok();
            f.flush().ok();
        }
    }

    fn value(&self, t: i64, tag: &str, v: f64) {
        // JSON has no NaN: the pump never makes one. The bits too: JSON
        // readers may round a decimal by an ulp.
        self.line(&format!("{{\"t\":{t},\"tag\":\"{tag}\",\"value\":{v:?},\"bits\":{}}}", v.to_bits()));
    }

    /// One request and its reply; the reply and the time it arrived.
    fn call(
        &mut self,
        gen: impl FnOnce(&mut ModbusRequest, &mut Vec<u8>),
    ) -> std::io::Result<(ModbusRequest, Vec<u8>, i64, i64)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            self.stream = Some(s);
        }
        self.tid = self.tid.wrapping_add(1);
        let mut req = ModbusRequest::new_tcp_udp(self.unit, self.tid);
        let mut out = Vec::new();
        gen(&mut req, &mut out);
        let c = self.stream.as_mut().expect("connected");
        let sent = now_ms();
        c.write_all(&out)?;
        let reply = read_adu(c)?;
        Ok((req, reply, sent, now_ms()))
    }

    /// One request and its reply over Modbus/TCP, or RTU on the line.
    fn call_on(
        &mut self,
        rtu: bool,
        gen: impl FnOnce(&mut ModbusRequest, &mut Vec<u8>),
    ) -> std::io::Result<(ModbusRequest, Vec<u8>, i64, i64)> {
        if rtu {
            self.call_rtu(gen)
        } else {
            self.call(gen)
        }
    }

    /// One poll over TCP, or over the serial line (tags `rtu_<name>`): the
    /// four reads, and now and then the writes.
    fn poll(&mut self, rtu: bool) -> std::io::Result<()> {
        let bad = |e: rmodbus::ErrorKind| std::io::Error::other(format!("{e:?}"));
        let prefix = if rtu { "rtu_" } else { "" };
        let (req, reply, _, t) = self.call_on(rtu, |r, o| r.generate_get_inputs(0, map::INPUTS, o).unwrap())?;
        let mut regs = Vec::new();
        req.parse_u16(&reply, &mut regs).map_err(bad)?;
        self.log_registers_as(prefix, "input", t, &regs);
        let (req, reply, _, t) = self.call_on(rtu, |r, o| r.generate_get_holdings(0, map::HOLDINGS, o).unwrap())?;
        let mut regs = Vec::new();
        req.parse_u16(&reply, &mut regs).map_err(bad)?;
        self.log_registers_as(prefix, "holding", t, &regs);
        for (table, f) in [("coil", 1u8), ("discrete_input", 2)] {
            let (req, reply, _, t) = self.call_on(rtu, |r, o| {
                if f == 1 {
                    r.generate_get_coils(0, map::BITS, o).unwrap()
                } else {
                    r.generate_get_discretes(0, map::BITS, o).unwrap()
                }
            })?;
            let mut bits = Vec::new();
            req.parse_bool(&reply, &mut bits).map_err(bad)?;
            let regs: Vec<u16> = bits.iter().map(|b| u16::from(*b)).collect();
            self.log_registers_as(prefix, table, t, &regs);
        }
        // A tag read and then written in the same millisecond would have
        // two values at one time: the writes come a few ms after the reads.
        if self.polls.is_multiple_of(10) || self.polls % 25 == 12 {
            std::thread::sleep(Duration::from_millis(3));
        }
        if self.polls.is_multiple_of(10) {
            let speed = 1400 + (self.polls / 10 % 7) as u16 * 25;
            let (req, reply, sent, _) =
                self.call_on(rtu, |r, o| r.generate_set_holding(map::SPEED_SETPOINT, speed, o).unwrap())?;
            req.parse_ok(&reply).map_err(bad)?;
            self.value(sent, &format!("{prefix}speed_setpoint"), f64::from(speed));
            let limit = 8.0f32 + (self.polls / 10 % 5) as f32 * 0.25;
            let words = pump::order_words(u64::from(limit.to_bits()), 2, "BADC");
            let (req, reply, sent, _) =
                self.call_on(rtu, |r, o| r.generate_set_holdings_bulk(map::PRESSURE_LIMIT, &words, o).unwrap())?;
            req.parse_ok(&reply).map_err(bad)?;
            self.value(sent, &format!("{prefix}pressure_limit"), f64::from(limit));
            let (req, reply, sent, _) = self.call_on(rtu, |r, o| r.generate_set_coil(map::RUN, true, o).unwrap())?;
            req.parse_ok(&reply).map_err(bad)?;
            self.value(sent, &format!("{prefix}pump_run"), 1.0);
        }
        if self.polls % 25 == 12 && !rtu {
            let coils = [true, self.polls.is_multiple_of(2), true, false];
            let (req, reply, sent, _) = self.call_on(rtu, |r, o| r.generate_set_coils_bulk(0, &coils, o).unwrap())?;
            req.parse_ok(&reply).map_err(bad)?;
            self.value(sent, &format!("{prefix}pump_run"), 1.0);
        }
        let _ = &self.pump;
        let mut at = 0;
        while at < self.extra && !rtu {
            let n = (self.extra - at).min(100);
            let (req, reply, _, _) = self.call_on(rtu, |r, o| r.generate_get_inputs(100 + at, n, o).unwrap())?;
            req.parse_ok(&reply).map_err(bad)?;
            at += n;
        }
        Ok(())
    }

    fn log_registers_as(&self, prefix: &str, table: &str, t: i64, regs: &[u16]) {
        for tag in TAGS.iter().filter(|tag| tag.table == table) {
            let v = decode(tag, &regs[tag.address as usize..]);
            self.value(t, &format!("{prefix}{}", tag.name), v);
        }
    }

    /// One RTU request and its reply on the serial line.
    fn call_rtu(
        &mut self,
        gen: impl FnOnce(&mut ModbusRequest, &mut Vec<u8>),
    ) -> std::io::Result<(ModbusRequest, Vec<u8>, i64, i64)> {
        let mut req = ModbusRequest::new(self.unit, ModbusProto::Rtu);
        let mut out = Vec::new();
        gen(&mut req, &mut out);
        let f = self.serial.as_mut().expect("serial line");
        let sent = now_ms();
        f.write_all(&out)?;
        let reply = read_frame(f, rtu_reply_len)?;
        Ok((req, reply, sent, now_ms()))
    }
}
