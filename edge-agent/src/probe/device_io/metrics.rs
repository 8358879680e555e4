//! The device-file probe's own metrics on the agent's `/metrics`
//! (docs/metrics.md): devices and files watched, and what its bounded
//! kernel tables could not hold.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::advance_to;
use crate::probe::metrics::MapLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabels {
    pub how: String,
}

/// The device probe's (device_io).
#[derive(Clone, Debug, Default)]
pub struct DeviceMetrics {
    pub watched: Gauge,
    pub over_cap: Gauge,
    pub files_open: Gauge,
    pub files_found: Family<HowLabels, Counter>,
    pub map_full: Family<MapLabels, Counter>,
    pub inflight_stale: Counter,
    pub inflight_spilled: Counter,
}

impl DeviceMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edge_agent_devices_watched",
            "Watched devices present now (probes.devices.watch matches)",
            self.watched.clone(),
        );
        r.register(
            "edge_agent_devices_over_cap",
            "Devices matched past the probe's cap of 128, not watched",
            self.over_cap.clone(),
        );
        r.register(
            "edge_agent_device_files_open",
            "Watched device files open now, over all processes (kernel table entries)",
            self.files_open.clone(),
        );
        r.register(
            "edge_agent_device_files_found",
            "Watched open files registered, by how: open (the open hook) or scan (/proc)",
            self.files_found.clone(),
        );
        r.register(
            "edge_agent_device_map_full",
            "Device events a bounded kernel table could not hold, by map: files, inflight, series, errors",
            self.map_full.clone(),
        );
        r.register(
            "edge_agent_device_inflight_stale",
            "Device operations dropped: the exit's thread held the record of another call, whose exit was never seen",
            self.inflight_stale.clone(),
        );
        r.register(
            "edge_agent_device_inflight_spilled",
            "Device operations timed in the overflow table: another thread held the thread's slot",
            self.inflight_spilled.clone(),
        );
    }

    /// The device probe's own health: devices and open files watched, and
    /// what its bounded kernel tables could not hold (cumulative counts).
    pub fn observe(&self, d: &crate::probe::device_io::DeviceReading) {
        self.watched.set(d.devices_present as i64);
        self.over_cap.set(d.devices_over_cap as i64);
        self.files_open.set(d.files_open as i64);
        advance_to(&self.files_found.get_or_create(&HowLabels { how: "open".into() }), d.files_from_open);
        advance_to(&self.files_found.get_or_create(&HowLabels { how: "scan".into() }), d.files_from_scan);
        for (map, v) in
            [("files", d.fds_full), ("inflight", d.inflight_full), ("series", d.series_full), ("errors", d.errors_full)]
        {
            advance_to(&self.map_full.get_or_create(&MapLabels { map: map.into() }), v);
        }
        advance_to(&self.inflight_stale, d.stale_records);
        advance_to(&self.inflight_spilled, d.spilled);
    }
}
