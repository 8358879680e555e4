//! The TCP probe's own metrics on the agent's `/metrics` (docs/metrics.md):
//! its counts by direction and port class (and peer group), moved forward
//! from each window's cumulative reading, and its kernel table's health.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Kind, PortClasses, TcpCounters, CLASSES, DIRS, DIR_NAMES, PEERS, PEER_METRICS};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: String,
    pub port_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub direction: String,
    pub peer: String,
}

/// The TCP probe's (tcp_lifecycle).
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    /// By [`Kind`], in `Kind::ALL` order.
    pub counts: Vec<Family<TcpLabels, Counter>>,
    pub sock_map_full: Counter,
    pub tracked: Gauge,
    pub close_wait: Family<TcpLabels, Gauge>,
    /// Per peer group, by PEER_METRICS order.
    pub peers: Vec<Family<PeerLabels, Counter>>,
    pub tracked_capacity: Gauge,
}

impl Default for TcpMetrics {
    fn default() -> Self {
        TcpMetrics {
            counts: Kind::ALL.iter().map(|_| Family::default()).collect(),
            sock_map_full: Counter::default(),
            tracked: Gauge::default(),
            close_wait: Family::default(),
            peers: PEER_METRICS.iter().map(|_| Family::default()).collect(),
            tracked_capacity: Gauge::default(),
        }
    }
}

impl TcpMetrics {
    pub fn register(&self, r: &mut Registry) {
        for kind in Kind::ALL.into_iter().filter(|k| k.is_counter()) {
            let help = match kind {
                Kind::Opened => "TCP connections established, by direction and port class",
                Kind::Failed => "TCP connection attempts that failed during the handshake (refused included)",
                Kind::Closed => "Established TCP connections closed",
                Kind::Refused => "Outbound TCP connection attempts answered with a reset",
                Kind::Retransmits => "TCP segments retransmitted",
                Kind::ResetsSent => "TCP resets sent",
                Kind::ResetsReceived => "TCP resets received",
                Kind::CloseWaitEntered | Kind::CloseWaitLeft => continue,
            };
            let name = kind.metric().trim_end_matches("_total");
            r.register(name, help, self.counts[kind as usize].clone());
        }
        let peer_help = [
            "TCP connections established, by direction and peer group",
            "TCP connection attempts that failed during the handshake, by direction and peer group",
            "Outbound TCP connection attempts answered with a reset, by peer group",
            "Established TCP connections closed, by direction and peer group",
        ];
        for (i, metric) in PEER_METRICS.iter().enumerate() {
            r.register(metric.trim_end_matches("_total"), peer_help[i], self.peers[i].clone());
        }
        r.register(
            "edge_tcp_connections_close_wait",
            "TCP connections the peer closed and our application has not (CLOSE_WAIT) now",
            self.close_wait.clone(),
        );
        r.register(
            "edge_agent_tcp_connections_tracked",
            "Connections the kernel's connection map holds now (map fill)",
            self.tracked.clone(),
        );
        r.register(
            "edge_agent_tcp_connections_tracked_capacity",
            "Capacity of the kernel's connection map",
            self.tracked_capacity.clone(),
        );
        r.register(
            "edge_agent_tcp_sock_map_full",
            "Connections whose open the kernel map could not remember",
            self.sock_map_full.clone(),
        );
    }

    /// Moves the TCP counters forward to a new cumulative reading.
    pub fn observe(&self, prev: &TcpCounters, now: &TcpCounters, classes: &PortClasses) {
        for (was, e) in prev.entries().zip(now.entries()) {
            let Some(name) = classes.name(e.class) else {
                continue;
            };
            if e.kind == Kind::CloseWaitEntered && e.value > 0 {
                let dir = e.index / CLASSES % DIRS;
                let l = TcpLabels { direction: e.direction.into(), port_class: name.into() };
                self.close_wait.get_or_create(&l).set(now.close_wait(dir, e.class) as i64);
            }
            if e.value <= was.value || !e.kind.is_counter() {
                continue;
            }
            let fam = &self.counts[e.kind as usize];
            let l = TcpLabels { direction: e.direction.into(), port_class: name.into() };
            fam.get_or_create(&l).inc_by(e.value - was.value);
        }
        if let Some(p) = &now.peers {
            for (slot, values) in p.values.iter().enumerate() {
                let (dir, group) = (slot / PEERS, slot % PEERS);
                let Some(name) = p.names.get(group) else { continue };
                for (kind, &v) in values.iter().enumerate() {
                    let was = prev.peers.as_ref().map_or(0, |q| q.values[slot][kind]);
                    if v > was {
                        let l = PeerLabels { direction: DIR_NAMES[dir].into(), peer: name.clone() };
                        self.peers[kind].get_or_create(&l).inc_by(v - was);
                    }
                }
            }
        }
        self.sock_map_full.inc_by(now.sock_map_full.saturating_sub(prev.sock_map_full));
        self.tracked.set(now.socks_tracked as i64);
        self.tracked_capacity.set(crate::probe::tcp_lifecycle::MAX_SOCKS as i64);
    }
}
