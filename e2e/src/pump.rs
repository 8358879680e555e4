//! A pump as a PLC sees it: the process model behind the simulated PLC
//! (`pump_sim`), its register map (the shipped tag map
//! `configs/tags/pump.toml` names the mapped ones), and labelled faults.
//!
//! The process: a centrifugal pump driven at a speed setpoint. Flow follows
//! speed (and the valve); discharge pressure follows speed squared; motor
//! current follows flow and pressure; bearing temperature creeps towards an
//! equilibrium set by load; vibration RMS has a floor plus load. Every
//! sensor has noise of its own size and a slow drift (a random walk pulled
//! back to zero), seeded, so a run is reproducible.
//!
//! Faults (each with a start and an end, logged as labels): bearing wear
//! (vibration creeps up, temperature follows), cavitation (pressure and
//! flow oscillate, vibration jumps), valve closure (flow falls, pressure
//! rises), sensor drift (pressure reads high, growing), stuck sensor
//! (temperature frozen), sensor dropout (flow reads 0).

/// Registers of the PLC: (table, address) -> what is there. Tables as in
/// the tag map: input registers hold measurements; holding registers
/// counters and setpoints; a coil the run command; a discrete input the
/// motor's ready signal. Inputs 10..16 hold raw, unmapped diagnostics:
/// read in the same requests, they must never leave the box.
pub mod map {
    /// Input registers.
    pub const VIBRATION: u16 = 0; // u16, 0.01 mm/s
    pub const CURRENT: u16 = 1; // i16, 0.1 A
    pub const PRESSURE: u16 = 2; // f32 ABCD, bar
    pub const TEMPERATURE: u16 = 4; // f32 CDAB, degC
    pub const FLOW: u16 = 6; // u32 BADC, 0.001 m3/h
    pub const POWER: u16 = 8; // i32 DCBA, W
    pub const UNMAPPED: u16 = 10; // 10..16: raw diagnostics, no tag
    pub const INPUTS: u16 = 16;
    /// Holding registers.
    pub const SPEED_SETPOINT: u16 = 0; // u16, rpm (written by the HMI, fn 6)
    pub const PRESSURE_LIMIT: u16 = 1; // f32 BADC, bar (written by the HMI, fn 16)
    pub const RUN_SECONDS: u16 = 4; // u64 ABCD
    pub const EFFICIENCY: u16 = 8; // f64 CDAB
    pub const ENERGY_DELTA: u16 = 12; // i64 DCBA, J since the last poll (signed)
    pub const HOLDINGS: u16 = 16;
    /// Coils and discrete inputs.
    pub const RUN: u16 = 0;
    /// The e-stop: set, the pump stands still (a `modbus_write` action's
    /// target in the tests).
    pub const ESTOP: u16 = 7;
    pub const MOTOR_READY: u16 = 0;
    pub const BITS: u16 = 8;
}

/// The bearing's temperature follows its equilibrium with this time
/// constant (seconds).
pub const TEMPERATURE_TIME_CONSTANT_S: f64 = 120.0;

/// The bearing temperature the load and vibration settle it at.
fn equilibrium_temperature(current_a: f64, vibration_mm_s: f64) -> f64 {
    38.0 + 0.6 * current_a + 4.0 * (vibration_mm_s - 3.0).max(0.0)
}

/// The shipped tag map's (configs/tags/pump.toml) Modbus/TCP tags, their
/// server on loopback at `port` (a test's or a benchmark's simulator).
pub fn tcp_tag_map(port: u16) -> Result<String, String> {
    // e2e/ or, where a bench includes this file, edge-agent/: both one
    // level under the repository.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tags/pump.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tags: Vec<String> = text
        .split("[[tags]]")
        .skip(1)
        .filter(|t| t.contains("source = \"modbus_tcp\""))
        .map(|t| {
            let body: String = t.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
            format!("[[tags]]{}\nport = {port}\n", body.trim_end())
        })
        .collect();
    if tags.is_empty() {
        return Err(format!("{}: no modbus_tcp tags", path.display()));
    }
    Ok(tags.join("\n"))
}

/// A fault and when it is active (seconds since the simulation began).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    pub from_s: f64,
    pub to_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    BearingWear,
    Cavitation,
    ValveClosure,
    SensorDrift,
    StuckSensor,
    SensorDropout,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::BearingWear,
        FaultKind::Cavitation,
        FaultKind::ValveClosure,
        FaultKind::SensorDrift,
        FaultKind::StuckSensor,
        FaultKind::SensorDropout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::BearingWear => "bearing_wear",
            FaultKind::Cavitation => "cavitation",
            FaultKind::ValveClosure => "valve_closure",
            FaultKind::SensorDrift => "sensor_drift",
            FaultKind::StuckSensor => "stuck_sensor",
            FaultKind::SensorDropout => "sensor_dropout",
        }
    }

    /// Whether the fault changes the process (the pump's flow, pressure,
    /// load, vibration and so its bearing's heat), not only a sensor's
    /// reading.
    pub fn changes_the_process(self) -> bool {
        matches!(self, FaultKind::BearingWear | FaultKind::Cavitation | FaultKind::ValveClosure)
    }

    /// How long the process takes to return to normal after this fault
    /// was on for `duration_s`, in seconds: the bearing's heat decays with
    /// its time constant from the excess the fault left (simulated here,
    /// at nominal speed) until it is within `tolerance_c` of where it would
    /// be without the fault; 0 for a fault of a sensor only.
    pub fn recovery_s(self, duration_s: f64, tolerance_c: f64) -> f64 {
        if !self.changes_the_process() {
            return 0.0;
        }
        let (mut with, mut without) = (Pump::new(1), Pump::new(1));
        with.faults.push(Fault { kind: self, from_s: 0.0, to_s: duration_s + 1.0 });
        for _ in 0..(duration_s * 10.0).round() as u64 {
            with.step(0.1);
            without.step(0.1);
        }
        let excess = (with.temperature - without.temperature).abs();
        if excess <= tolerance_c {
            0.0
        } else {
            TEMPERATURE_TIME_CONSTANT_S * (excess / tolerance_c).ln()
        }
    }

    pub fn from_name(s: &str) -> Option<FaultKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A small seeded generator (xorshift64*) with a normal deviate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-12);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The pump's state and its sensors.
#[derive(Debug, Clone)]
pub struct Pump {
    rng: Rng,
    pub t_s: f64,
    pub speed_rpm: f64,
    pub running: bool,
    pub faults: Vec<Fault>,
    temperature: f64,
    drift: [f64; 5],
    stuck_temperature: Option<f64>,
    energy_j: f64,
    last_energy_j: f64,
    pub pressure_limit: f32,
}

/// One reading of the sensors (engineering units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub vibration_mm_s: f64,
    pub current_a: f64,
    pub pressure_bar: f64,
    pub temperature_c: f64,
    pub flow_m3_h: f64,
    pub power_w: f64,
    pub efficiency: f64,
}

impl Pump {
    pub fn new(seed: u64) -> Pump {
        Pump {
            rng: Rng::new(seed),
            t_s: 0.0,
            speed_rpm: 1450.0,
            running: true,
            faults: Vec::new(),
            // In production from the start: the bearing at its running
            // temperature (nominal speed, no fault).
            temperature: equilibrium_temperature(4.0 + 0.21 * 42.0 + 0.9 * 6.2, 3.0),
            drift: [0.0; 5],
            stuck_temperature: None,
            energy_j: 0.0,
            last_energy_j: 0.0,
            pressure_limit: 8.5,
        }
    }

    fn active(&self, k: FaultKind) -> Option<f64> {
        self.faults
            .iter()
            .find(|f| f.kind == k && self.t_s >= f.from_s && self.t_s < f.to_s)
            .map(|f| self.t_s - f.from_s)
    }

    /// The fault labels active now.
    pub fn labels(&self) -> Vec<&'static str> {
        FaultKind::ALL.into_iter().filter(|k| self.active(*k).is_some()).map(FaultKind::name).collect()
    }

    /// Advances the process by `dt_s` and reads the sensors.
    pub fn step(&mut self, dt_s: f64) -> Reading {
        self.t_s += dt_s;
        for d in &mut self.drift {
            *d = *d * (1.0 - dt_s / 600.0) + self.rng.normal() * 0.002 * dt_s.sqrt();
        }
        let n = if self.running { self.speed_rpm / 1450.0 } else { 0.0 };
        let mut valve = 1.0;
        if let Some(a) = self.active(FaultKind::ValveClosure) {
            valve = (1.0 - a / 60.0).max(0.35);
        }
        let mut flow = 42.0 * n * valve.sqrt();
        let mut pressure = 6.2 * n * n * (1.0 + 0.6 * (1.0 - valve));
        let mut vibration = 1.8 + 1.2 * n;
        if let Some(a) = self.active(FaultKind::Cavitation) {
            let osc = (2.0 * std::f64::consts::PI * 0.7 * self.t_s).sin();
            flow *= 1.0 + 0.12 * osc;
            pressure *= 1.0 - 0.18 * (0.5 + 0.5 * osc) - 0.05 * (a / 30.0).min(1.0);
            vibration += 1.5 + 0.8 * self.rng.normal().abs();
        }
        if let Some(a) = self.active(FaultKind::BearingWear) {
            vibration += 0.04 * a;
        }
        let current = 4.0 + 0.21 * flow + 0.9 * pressure;
        let power = 560.0 * current;
        let hydraulic = flow / 3600.0 * pressure * 1e5;
        let efficiency = if power > 0.0 { (hydraulic / power).min(1.0) } else { 0.0 };
        let equilibrium = equilibrium_temperature(current, vibration);
        self.temperature += (equilibrium - self.temperature) * (dt_s / TEMPERATURE_TIME_CONSTANT_S).min(1.0);
        self.energy_j += power * dt_s;
        let mut r = Reading {
            vibration_mm_s: (vibration + self.drift[0] + self.rng.normal() * 0.05).max(0.0),
            current_a: current + self.drift[1] + self.rng.normal() * 0.08,
            pressure_bar: pressure + self.drift[2] + self.rng.normal() * 0.02,
            temperature_c: self.temperature + self.drift[3] + self.rng.normal() * 0.03,
            flow_m3_h: (flow + self.drift[4] + self.rng.normal() * 0.15).max(0.0),
            power_w: power + self.rng.normal() * 20.0,
            efficiency: efficiency + self.rng.normal() * 0.002,
        };
        if let Some(a) = self.active(FaultKind::SensorDrift) {
            r.pressure_bar += 0.01 * a;
        }
        match (self.active(FaultKind::StuckSensor), self.stuck_temperature) {
            (Some(_), None) => self.stuck_temperature = Some(r.temperature_c),
            (None, Some(_)) => self.stuck_temperature = None,
            _ => {}
        }
        if let Some(t) = self.stuck_temperature {
            r.temperature_c = t;
        }
        if self.active(FaultKind::SensorDropout).is_some() {
            r.flow_m3_h = 0.0;
        }
        r
    }

    /// Joules since the previous call (the ENERGY_DELTA register), signed:
    /// the meter's correction is negative now and then.
    pub fn energy_delta(&mut self) -> i64 {
        let d = (self.energy_j - self.last_energy_j) as i64 - if self.rng.unit() < 0.1 { 5000 } else { 0 };
        self.last_energy_j = self.energy_j;
        d
    }

    pub fn run_seconds(&self) -> u64 {
        self.t_s as u64 + 3_000_000_000
    }

    /// Raw diagnostics nobody mapped (inputs 10..16).
    pub fn diagnostics(&mut self) -> [u16; 6] {
        let mut d = [0u16; 6];
        for v in &mut d {
            *v = (self.rng.next_u64() >> 48) as u16;
        }
        d
    }
}

/// A reading as the PLC's input registers hold it (16 registers from 0).
pub fn input_registers(r: &Reading, diagnostics: [u16; 6]) -> [u16; map::INPUTS as usize] {
    let mut regs = [0u16; map::INPUTS as usize];
    regs[map::VIBRATION as usize] = (r.vibration_mm_s * 100.0).round().clamp(0.0, 65535.0) as u16;
    regs[map::CURRENT as usize] = ((r.current_a * 10.0).round() as i64).clamp(-32768, 32767) as i16 as u16;
    put32(&mut regs, map::PRESSURE, (r.pressure_bar as f32).to_bits(), "ABCD");
    put32(&mut regs, map::TEMPERATURE, (r.temperature_c as f32).to_bits(), "CDAB");
    put32(&mut regs, map::FLOW, (r.flow_m3_h * 1000.0).round().max(0.0) as u32, "BADC");
    put32(&mut regs, map::POWER, (r.power_w.round() as i32) as u32, "DCBA");
    regs[map::UNMAPPED as usize..].copy_from_slice(&diagnostics);
    regs
}

/// Puts a 32-bit value at `at` in a word and byte order.
pub fn put32(regs: &mut [u16], at: u16, v: u32, order: &str) {
    let words = order_words(u64::from(v), 2, order);
    regs[at as usize..at as usize + 2].copy_from_slice(&words);
}

/// Puts a 64-bit value at `at` in a word and byte order.
pub fn put64(regs: &mut [u16], at: u16, v: u64, order: &str) {
    let words = order_words(v, 4, order);
    regs[at as usize..at as usize + 4].copy_from_slice(&words);
}

/// The registers (address order) of an `n`-word value in an order
/// (ABCD: most significant word first, bytes high first; CDAB: words
/// swapped; BADC: bytes swapped; DCBA: both).
pub fn order_words(v: u64, n: usize, order: &str) -> Vec<u16> {
    let mut words: Vec<u16> = (0..n).rev().map(|i| (v >> (16 * i)) as u16).collect();
    if order == "CDAB" || order == "DCBA" {
        words.reverse();
    }
    if order == "BADC" || order == "DCBA" {
        for w in &mut words {
            *w = w.swap_bytes();
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pump_is_reproducible_and_faults_show() {
        let (mut a, mut b) = (Pump::new(3), Pump::new(3));
        for _ in 0..100 {
            assert_eq!(a.step(0.1), b.step(0.1));
        }
        let mut p = Pump::new(1);
        let normal: f64 = (0..600).map(|_| p.step(0.1).vibration_mm_s).sum::<f64>() / 600.0;
        p.faults.push(Fault { kind: FaultKind::BearingWear, from_s: p.t_s, to_s: p.t_s + 1000.0 });
        for _ in 0..1200 {
            p.step(0.1);
        }
        let worn: f64 = (0..600).map(|_| p.step(0.1).vibration_mm_s).sum::<f64>() / 600.0;
        assert!(worn > normal + 4.0, "{normal} -> {worn}");
        assert_eq!(p.labels(), vec!["bearing_wear"]);
    }

    #[test]
    fn a_fault_of_the_process_leaves_heat_that_takes_time_to_go() {
        let worn = FaultKind::BearingWear.recovery_s(120.0, 0.05);
        let cavitation = FaultKind::Cavitation.recovery_s(120.0, 0.05);
        let valve = FaultKind::ValveClosure.recovery_s(120.0, 0.05);
        // Several of the bearing's time constants after two minutes of wear.
        assert!(worn > 3.0 * TEMPERATURE_TIME_CONSTANT_S && worn < 8.0 * TEMPERATURE_TIME_CONSTANT_S, "{worn}");
        assert!(cavitation > TEMPERATURE_TIME_CONSTANT_S, "{cavitation}");
        assert!(valve > 0.0 && valve < worn, "{valve}");
        assert!(FaultKind::BearingWear.recovery_s(10.0, 0.05) < worn);
        for sensor in [FaultKind::SensorDrift, FaultKind::StuckSensor, FaultKind::SensorDropout] {
            assert_eq!(sensor.recovery_s(120.0, 0.05), 0.0);
        }
    }

    #[test]
    fn the_tcp_tag_map_has_the_tcp_tags_at_the_port() {
        let t = tcp_tag_map(1502).unwrap();
        assert_eq!(t.matches("[[tags]]").count(), 13);
        assert_eq!(t.matches("port = 1502").count(), 13);
        assert!(!t.contains("modbus_rtu"));
    }

    #[test]
    fn orders_lay_out_words() {
        assert_eq!(order_words(0x1122_3344, 2, "ABCD"), vec![0x1122, 0x3344]);
        assert_eq!(order_words(0x1122_3344, 2, "CDAB"), vec![0x3344, 0x1122]);
        assert_eq!(order_words(0x1122_3344, 2, "BADC"), vec![0x2211, 0x4433]);
        assert_eq!(order_words(0x1122_3344, 2, "DCBA"), vec![0x4433, 0x2211]);
    }
}
