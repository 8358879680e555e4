//! The fleet simulator (`fleet_sim`, docs/scaling.md): many simulated
//! devices in a few processes, each device the agent's own store and
//! uplink ([`device::SimDevice`]), against the real central side (the
//! broker, bridges and remote-write store the e2e tests start).
//!
//! The driver (`fleet_sim run`) starts the central side, makes every
//! device's certificate, splits the devices over host processes
//! (`fleet_sim devices`, [`host::run`]), starts them together and, when
//! they are done, counts what landed per device. A host process runs its
//! devices' timeline ([`Plan`]) and reports what each stored, when each
//! live window was confirmed and when each backlog drained.

pub mod device;
pub mod direct;
pub mod host;
pub mod report;

use serde::{Deserialize, Serialize};

/// What a host process runs: written by the driver as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostSpec {
    /// Where this host writes `ready`, `status` and `report` files.
    pub run_dir: String,
    pub host: usize,
    pub window_ms: i64,
    pub series: usize,
    /// Windows are made for this long after the start.
    pub live_ms: i64,
    /// After that, how long to wait for every device to drain at most.
    pub drain_ms: i64,
    pub devices: Vec<DeviceSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub id: String,
    pub seed: u64,
    /// The device's agent config (TOML), as a file.
    pub config: String,
    /// Windows of outage stored before the start (the storm's backlog).
    pub backfill: u64,
    /// Whether its live windows count as "steady" (a device without a
    /// backlog of its own) in the lag figures.
    pub group: Group,
    pub plan: Plan,
}

/// Which figures a device's lag goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Connected throughout, no backlog of its own.
    Steady,
    /// Reconnects with a backlog (the storm).
    Backlog,
    /// Appears late, leaves and comes back, or flaps.
    Churn,
}

/// A device's timeline, in ms after the common start: when it begins
/// making windows and when its uplink connects and disconnects. After
/// the live phase every device is connected until it drained.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub begin_ms: i64,
    /// (at, connected after it), in time order.
    pub links: Vec<(i64, bool)>,
}

impl Plan {
    /// Connected from the start to the end.
    pub fn steady() -> Plan {
        Plan { begin_ms: 0, links: vec![(0, true)] }
    }
}

/// Scenario names (`--scenario`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Every device live and connected throughout.
    Live,
    /// `--backlog-devices` of them were cut off for `--backlog-hours` and
    /// all reconnect at the start; the others stay live.
    Storm,
    /// A quarter each: steady; appearing a third into the run; leaving a
    /// quarter in and coming back at three quarters; flapping (down and
    /// up every few windows).
    Churn,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "live" => Ok(Scenario::Live),
            "storm" => Ok(Scenario::Storm),
            "churn" => Ok(Scenario::Churn),
            other => Err(format!("unknown scenario {other:?}: live, storm or churn")),
        }
    }
}

/// Device `k` of `n`'s group and plan in a scenario of `live_ms` with
/// windows of `window_ms`.
pub fn plan(scenario: Scenario, k: usize, backlog_devices: usize, live_ms: i64, window_ms: i64) -> (Group, Plan) {
    match scenario {
        Scenario::Live => (Group::Steady, Plan::steady()),
        Scenario::Storm if k < backlog_devices => (Group::Backlog, Plan::steady()),
        Scenario::Storm => (Group::Steady, Plan::steady()),
        Scenario::Churn => match k % 4 {
            0 => (Group::Steady, Plan::steady()),
            1 => {
                let at = live_ms / 3;
                (Group::Churn, Plan { begin_ms: at, links: vec![(at, true)] })
            }
            2 => (
                Group::Churn,
                Plan { begin_ms: 0, links: vec![(0, true), (live_ms / 4, false), (live_ms * 3 / 4, true)] },
            ),
            _ => {
                // Down for two windows, up for three, over and over, each
                // device at its own phase.
                let period = 5 * window_ms;
                let phase = (device::mix(k as u64) % period as u64) as i64;
                let mut links = vec![(0, true)];
                let mut t = phase + 3 * window_ms;
                while t + 2 * window_ms < live_ms {
                    links.push((t, false));
                    links.push((t + 2 * window_ms, true));
                    t += period;
                }
                (Group::Churn, Plan { begin_ms: 0, links })
            }
        },
    }
}

/// The device's own id: `sim-00042`.
pub fn device_id(k: usize) -> String {
    format!("sim-{k:05}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    e2e::now_ms()
}
