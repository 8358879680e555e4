//! The driver of `edge-agent tags discover`: attaches the protocol probe
//! in discovery mode (every register reaches the ring) and the device
//! probe capturing the bytes of every watched serial device, for a while,
//! and feeds what they see to [`Discovery`].

use super::discover::{Discovery, Place, SourceKeys};
use super::rtu::Link;
use super::tags::Table;
use crate::config::Config;
use crate::probe::device_io::DeviceIoProbe;
use crate::probe::protocols::{ProtocolsProbe, VALUE_READ, VALUE_WRITE};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn address(a: &[u8; 16]) -> String {
    let v6 = std::net::Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

/// Watches for `seconds`; errors name what could not attach.
pub fn discover(cfg: &Config, seconds: u64) -> Result<Discovery, String> {
    let mut tcp = ProtocolsProbe::attach_discovering(&cfg.probes.protocols)
        .map_err(|e| format!("the protocol probe (Modbus/TCP): {e}"))?;
    let mut serial = if cfg.probes.devices.watch.is_empty() {
        None
    } else {
        let root = crate::probe::tracefs::ensure_mounted().map_err(|e| format!("tracefs: {e}"))?;
        Some(
            DeviceIoProbe::load_capturing(&root, &cfg.probes.devices, &cfg.probes.devices.watch)
                .map_err(|e| format!("the device probe (Modbus RTU): {e}"))?,
        )
    };
    let mut d = Discovery::default();
    // Both ways a box can sit on a serial line; the side that pairs wins.
    let mut links: HashMap<(String, u32, bool), Link> = HashMap::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut last_refresh = Instant::now();
    while Instant::now() < end {
        let offset = super::wall_minus_mono_ns();
        let ms = |ts: u64| (ts as i64).saturating_add(offset).div_euclid(1_000_000);
        tcp.drain_values(|ev| {
            let Some(table) = Table::of_function(ev.function) else { return };
            if ev.kind != VALUE_READ && ev.kind != VALUE_WRITE {
                return;
            }
            let side = if ev.side == 0 { "client" } else { "server" };
            let server = address(&ev.server);
            let place =
                Place { source: format!("modbus_tcp {server}:{} ({side})", ev.server_port), unit: ev.unit, table };
            let keys = SourceKeys::Tcp { server, port: ev.server_port, side };
            d.observe(place, keys, ev.start, ev.quantity, ev.data, ev.kind == VALUE_WRITE, ms(ev.ts_ns));
        });
        if let Some(s) = serial.as_mut() {
            if last_refresh.elapsed() >= Duration::from_secs(1) {
                s.refresh();
                last_refresh = Instant::now();
            }
            s.drain_bytes(|ev| {
                for master in [true, false] {
                    let link =
                        links.entry((ev.device.to_string(), ev.tgid, master)).or_insert_with(|| Link::new(master));
                    for x in link.bytes(ms(ev.ts_ns), ev.written, ev.data) {
                        let side = if master { "client" } else { "server" };
                        let place = Place {
                            source: format!("modbus_rtu {} ({})", ev.device, if master { "master" } else { "slave" }),
                            unit: x.unit,
                            table: x.table,
                        };
                        let keys = SourceKeys::Rtu { device: ev.device.to_string(), side };
                        d.observe(place, keys, x.start, x.quantity, &x.data, x.written, x.time_ms);
                    }
                    link.take_refusals();
                }
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(d)
}
