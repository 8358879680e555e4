//! The TCP probe's window samples (docs/metrics.md, "TCP"): connection
//! counts by direction and port class, their latency histograms, per peer
//! group, and the idle census's gauges.

use super::{
    Hist, Kind, PeerCounters, PortClasses, TcpCounters, TcpHists, TcpReading, CLASSES, DIRS, DIR_NAMES, PEERS,
    PEER_METRICS,
};
use crate::probe::series::{histogram, Samples};
use crate::probe::tcp_idle::IdleCensus;
use edge_wire::{Label, SeriesKey};
use std::collections::BTreeSet;

/// Which series have ever been non-zero, so that once a series exists it
/// gets a sample every window (no gaps for Prometheus to read as
/// staleness) while never-seen label combinations cost nothing.
#[derive(Debug, Default)]
pub struct TcpSeen {
    live_tcp: BTreeSet<usize>,
    live_hist: BTreeSet<usize>,
    /// (metric, direction, class) of the connection gauges once non-zero.
    live_conns: BTreeSet<(usize, usize, usize)>,
    /// (kind, direction, group) of the peer counters, and the groups whose
    /// connect latency histogram, once non-zero.
    live_peers: BTreeSet<(usize, usize, usize)>,
    live_peer_hist: BTreeSet<usize>,
}

impl TcpSeen {
    /// The reading's samples.
    pub fn series(&mut self, r: &TcpReading, out: &mut Samples) {
        self.counter_series(&r.counters, &r.classes, out);
        if let Some(c) = &r.idle {
            self.conn_series(c, &r.classes, out);
        }
    }

    fn counter_series(&mut self, c: &TcpCounters, classes: &PortClasses, out: &mut Samples) {
        for e in c.entries() {
            if e.value == 0 && !self.live_tcp.contains(&e.index) {
                continue;
            }
            let Some(class_name) = classes.name(e.class) else {
                continue;
            };
            self.live_tcp.insert(e.index);
            let labels = vec![Label::new("direction", e.direction), Label::new("port_class", class_name)];
            // CLOSE_WAIT: one gauge from the entries (sent with them) and exits.
            let value = match e.kind {
                Kind::CloseWaitLeft => continue,
                Kind::CloseWaitEntered => c.close_wait(e.index / CLASSES % DIRS, e.class),
                _ => e.value,
            };
            out.push((SeriesKey::new(e.kind.metric(), labels), value as f64));
        }
        self.hist_series(&c.hists, classes, out);
        if let Some(p) = &c.peers {
            self.peer_series(p, out);
        }
    }

    /// Per peer group: connections opened, failed, refused (outbound) and
    /// closed by direction, and the outbound connect latency. At most 15
    /// named groups plus "other" (the config's cap): a bounded number of
    /// series whatever the box talks to.
    fn peer_series(&mut self, p: &PeerCounters, out: &mut Samples) {
        for (kind, metric) in PEER_METRICS.iter().enumerate() {
            for (dir, direction) in DIR_NAMES.iter().enumerate().take(2) {
                for group in 0..PEERS {
                    let v = p.values[dir * PEERS + group][kind];
                    if v == 0 && !self.live_peers.contains(&(kind, dir, group)) {
                        continue;
                    }
                    let Some(name) = p.names.get(group) else { continue };
                    self.live_peers.insert((kind, dir, group));
                    let labels = vec![Label::new("direction", *direction), Label::new("peer", name)];
                    out.push((SeriesKey::new(*metric, labels), v as f64));
                }
            }
        }
        for (group, slot) in p.connect.iter().enumerate() {
            if slot.count() == 0 && !self.live_peer_hist.contains(&group) {
                continue;
            }
            let Some(name) = p.names.get(group) else { continue };
            self.live_peer_hist.insert(group);
            let labels = [Label::new("direction", "outbound"), Label::new("peer", name)];
            histogram("edge_tcp_peer_connect_latency_seconds", &labels, &slot.buckets, slot.sum, 1e-6, out);
        }
    }

    /// Gauges of established and idle connections: a series once non-zero
    /// is sent every window after, 0 included (a gauge that vanished would
    /// read as "no data", not as "none idle").
    fn conn_series(&mut self, c: &IdleCensus, classes: &PortClasses, out: &mut Samples) {
        let metrics = [("edge_tcp_connections_established", &c.established), ("edge_tcp_connections_idle", &c.idle)];
        for (m, (name, values)) in metrics.iter().enumerate() {
            for (dir, row) in values.iter().enumerate() {
                for (class, &v) in row.iter().enumerate() {
                    if v == 0 && !self.live_conns.contains(&(m, dir, class)) {
                        continue;
                    }
                    let Some(class_name) = classes.name(class) else { continue };
                    self.live_conns.insert((m, dir, class));
                    let labels = vec![Label::new("direction", DIR_NAMES[dir]), Label::new("port_class", class_name)];
                    out.push((SeriesKey::new(*name, labels), v as f64));
                }
            }
        }
    }

    /// Prometheus histograms: cumulative `_bucket{le}` (log2 bounds), `_sum`
    /// in seconds, `_count`.
    fn hist_series(&mut self, h: &TcpHists, classes: &PortClasses, out: &mut Samples) {
        for hist in Hist::ALL {
            for (dir, direction) in DIR_NAMES.iter().enumerate().take(2) {
                for class in 0..CLASSES {
                    let i = TcpHists::index(hist, dir, class);
                    let slot = &h.slots[i];
                    let count = slot.count();
                    if count == 0 && !self.live_hist.contains(&i) {
                        continue;
                    }
                    let Some(class_name) = classes.name(class) else { continue };
                    self.live_hist.insert(i);
                    let labels = [Label::new("direction", *direction), Label::new("port_class", class_name)];
                    histogram(hist.metric(), &labels, &slot.buckets, slot.sum, hist.unit(), out);
                }
            }
        }
    }
}
