//! Established TCP connections and the idle ones among them, once per
//! window, from the kernel's socket diagnostics (NETLINK_SOCK_DIAG, the
//! interface `ss` uses).
//!
//! Idleness is the absence of events, which no event hook sees without
//! stamping every packet of every connection; the kernel already keeps the
//! time since each connection last sent and received data (`tcp_info`
//! `tcpi_last_data_sent`/`tcpi_last_data_recv`, ms). One dump per window
//! reads them for every established connection: no eBPF, no per-packet cost.
//! Available on every kernel the agent targets (inet_diag with tcp_info:
//! 2.6.x), needs no capability for the dump itself.

use super::tcp_lifecycle::{PortClasses, CLASSES};
use std::collections::BTreeSet;
use std::io;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_INFO: u16 = 2;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;
/// inet_diag_msg: family, state, timer, retrans, then the socket id
/// (sport, dport big-endian at 4 and 6), ..., 72 bytes in all.
const DIAG_MSG_LEN: usize = 72;
/// tcp_info: tcpi_last_data_sent at 44, tcpi_last_data_recv at 52 (ms).
const LAST_DATA_SENT: usize = 44;
const LAST_DATA_RECV: usize = 52;

/// Connections by (direction 0 outbound / 1 inbound, port class).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdleCensus {
    pub established: [[u64; CLASSES]; 2],
    /// Established and neither sent nor received data for the limit.
    pub idle: [[u64; CLASSES]; 2],
}

/// One established connection as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub local_port: u16,
    pub remote_port: u16,
    /// Milliseconds since the connection last sent / received data.
    pub last_sent_ms: u32,
    pub last_recv_ms: u32,
}

/// Counts `conns` by direction and class: inbound when the local port is a
/// listening port (the connection was accepted there), classed by the local
/// port; otherwise outbound, classed by the remote port (as the TCP probe
/// does). Idle: no data either way for `idle_ms`.
pub fn census(conns: &[Conn], listening: &BTreeSet<u16>, classes: &PortClasses, idle_ms: u64) -> IdleCensus {
    let mut c = IdleCensus::default();
    for k in conns {
        let (dir, port) = if listening.contains(&k.local_port) { (1, k.local_port) } else { (0, k.remote_port) };
        let class = classes.class_of(port);
        c.established[dir][class] += 1;
        if u64::from(k.last_sent_ms.min(k.last_recv_ms)) >= idle_ms {
            c.idle[dir][class] += 1;
        }
    }
    c
}

/// Every established TCP connection and listening port of the box (IPv4
/// and IPv6) in this network namespace.
pub fn dump() -> io::Result<(Vec<Conn>, BTreeSet<u16>)> {
    let mut conns = Vec::new();
    let mut listening = BTreeSet::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump_family(family, &mut conns, &mut listening)?;
    }
    Ok((conns, listening))
}

struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closes a descriptor this struct owns.
        unsafe { libc::close(self.0) };
    }
}

fn dump_family(family: u8, conns: &mut Vec<Conn>, listening: &mut BTreeSet<u16>) -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(fd);
    // nlmsghdr (16) + inet_diag_req_v2 (56).
    let mut req = [0u8; 72];
    req[0..4].copy_from_slice(&72u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    req[18] = 1 << (INET_DIAG_INFO - 1); // ask for tcp_info
    req[20..24].copy_from_slice(&((1u32 << TCP_ESTABLISHED) | (1u32 << TCP_LISTEN)).to_ne_bytes());
    // SAFETY: sends a buffer we own; the kernel is the destination (a
    // netlink socket with no address bound sends to it).
    if unsafe { libc::send(fd.0, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receives into a buffer we own, at most its length.
        let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_messages(&buf[..n as usize], conns, listening)? {
            return Ok(());
        }
    }
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one datagram of netlink messages; true at the end of the dump.
fn parse_messages(mut b: &[u8], conns: &mut Vec<Conn>, listening: &mut BTreeSet<u16>) -> io::Result<bool> {
    while b.len() >= 16 {
        let len = u32_ne(b, 0) as usize;
        let kind = u16_ne(b, 4);
        if len < 16 || len > b.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated sock_diag message"));
        }
        let msg = &b[16..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if msg.len() >= 4 { -(u32_ne(msg, 0) as i32) } else { libc::EINVAL };
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY if msg.len() >= DIAG_MSG_LEN => {
                let state = u32::from(msg[1]);
                let sport = u16::from_be_bytes([msg[4], msg[5]]);
                let dport = u16::from_be_bytes([msg[6], msg[7]]);
                if state == TCP_LISTEN {
                    listening.insert(sport);
                } else if state == TCP_ESTABLISHED {
                    if let Some(info) = attribute(&msg[DIAG_MSG_LEN..], INET_DIAG_INFO) {
                        if info.len() >= LAST_DATA_RECV + 4 {
                            conns.push(Conn {
                                local_port: sport,
                                remote_port: dport,
                                last_sent_ms: u32_ne(info, LAST_DATA_SENT),
                                last_recv_ms: u32_ne(info, LAST_DATA_RECV),
                            });
                        }
                    }
                }
            }
            _ => {}
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(false)
}

/// The payload of the first netlink attribute of `kind` in `attrs`.
fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16_ne(attrs, 0) as usize;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if u16_ne(attrs, 2) == kind {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TcpLifecycleConfig;

    #[test]
    fn census_by_direction_class_and_idleness() {
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let modbus = (1..CLASSES).find(|&c| classes.name(c) == Some("modbus")).unwrap();
        let listening: BTreeSet<u16> = [502, 8080].into();
        let conns = [
            // Accepted on our Modbus server, quiet for 10 minutes.
            Conn { local_port: 502, remote_port: 40001, last_sent_ms: 600_000, last_recv_ms: 600_000 },
            // Accepted, busy one way only: not idle.
            Conn { local_port: 502, remote_port: 40002, last_sent_ms: 600_000, last_recv_ms: 10 },
            // Our client of someone's Modbus server, idle.
            Conn { local_port: 40003, remote_port: 502, last_sent_ms: 400_000, last_recv_ms: 300_000 },
            // Our client of an unclassed port.
            Conn { local_port: 40004, remote_port: 9999, last_sent_ms: 0, last_recv_ms: 0 },
        ];
        let c = census(&conns, &listening, &classes, 300_000);
        assert_eq!(c.established[1][modbus], 2);
        assert_eq!(c.idle[1][modbus], 1);
        assert_eq!((c.established[0][modbus], c.idle[0][modbus]), (1, 1));
        assert_eq!((c.established[0][0], c.idle[0][0]), (1, 0));
    }
}
