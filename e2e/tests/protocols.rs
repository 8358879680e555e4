//! The industrial-protocol probe against ground truth: a small Modbus/TCP
//! server and client in the test (normal replies, exception replies, a
//! stalled reply, two requests pipelined in one segment, a function code
//! the server does not know, a request never answered whose transaction id
//! the client then uses again), a client that speaks HTTP to the Modbus
//! port, and MQTT, TLS and OPC UA openings to their ports. Both ends run
//! on this box, so each count appears once on the client side and once on
//! the server side, and must equal what the test did.

use e2e::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Requests the server read and did not answer (function 8).
static UNANSWERED: AtomicUsize = AtomicUsize::new(0);

/// What the server does with a request's PDU: the reply PDU and how long
/// to wait before sending it; `None`: no reply (a hung diagnostics call).
fn answer(pdu: &[u8]) -> Option<(Vec<u8>, Duration)> {
    let (fc, addr, qty) = (pdu[0], u16::from_be_bytes([pdu[1], pdu[2]]), u16::from_be_bytes([pdu[3], pdu[4]]));
    Some(match fc {
        8 => return None,
        3 | 4 if addr >= 100 => (vec![fc | 0x80, 2], Duration::ZERO), // illegal data address
        3 | 4 => {
            let mut r = vec![fc, (qty * 2) as u8];
            r.extend((0..qty).flat_map(|i| (addr + i).to_be_bytes()));
            (r, Duration::ZERO)
        }
        6 => (pdu.to_vec(), Duration::ZERO),
        // Register 42 sits behind a slow gateway: a 400 ms stall.
        16 => (pdu[..5].to_vec(), if addr == 42 { Duration::from_millis(400) } else { Duration::ZERO }),
        _ => (vec![fc | 0x80, 1], Duration::ZERO), // illegal function
    })
}

/// A Modbus/TCP server: one thread per connection; a connection whose
/// bytes are not MBAP is read to its end, then closed (closing with bytes
/// unread would reset it, and the client's half-close could fail).
fn modbus_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            s.set_nodelay(true).unwrap();
            std::thread::spawn(move || {
                let mut head = [0u8; 7];
                while s.read_exact(&mut head).is_ok() {
                    let len = u16::from_be_bytes([head[4], head[5]]) as usize;
                    if head[2..4] != [0, 0] || !(2..=254).contains(&len) {
                        let _ = std::io::copy(&mut s, &mut std::io::sink());
                        return;
                    }
                    let mut pdu = vec![0; len - 1];
                    if s.read_exact(&mut pdu).is_err() {
                        return;
                    }
                    let Some((reply, delay)) = answer(&pdu) else {
                        UNANSWERED.fetch_add(1, Ordering::SeqCst);
                        continue;
                    };
                    std::thread::sleep(delay);
                    let mut adu = head[..4].to_vec();
                    adu.extend(((reply.len() + 1) as u16).to_be_bytes());
                    adu.push(head[6]);
                    adu.extend(reply);
                    if s.write_all(&adu).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

struct Client {
    s: TcpStream,
    tid: u16,
    /// Payload bytes written and read, for the TCP byte counters.
    bytes: usize,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s, tid: 0x1200, bytes: 0 }
    }

    fn adu(&mut self, pdu: &[u8]) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let mut adu = self.tid.to_be_bytes().to_vec();
        adu.extend([0, 0]);
        adu.extend(((pdu.len() + 1) as u16).to_be_bytes());
        adu.push(7); // unit
        adu.extend(pdu);
        adu
    }

    /// The reply's PDU.
    fn reply(&mut self) -> Vec<u8> {
        let mut head = [0u8; 7];
        self.s.read_exact(&mut head).unwrap();
        let mut pdu = vec![0; u16::from_be_bytes([head[4], head[5]]) as usize - 1];
        self.s.read_exact(&mut pdu).unwrap();
        self.bytes += head.len() + pdu.len();
        pdu
    }

    /// Sends a request and expects no reply.
    fn send(&mut self, pdu: &[u8]) {
        let adu = self.adu(pdu);
        self.s.write_all(&adu).unwrap();
        self.bytes += adu.len();
    }

    /// Sends the requests in one write (one segment), then reads a reply
    /// to each; returns the reply PDUs.
    fn call(&mut self, pdus: &[&[u8]]) -> Vec<Vec<u8>> {
        let bytes: Vec<u8> = pdus.iter().flat_map(|p| self.adu(p)).collect();
        self.s.write_all(&bytes).unwrap();
        self.bytes += bytes.len();
        pdus.iter().map(|_| self.reply()).collect()
    }
}

/// Opens a connection to `port`, sends `bytes`, and closes once the server
/// (a sink: it reads to the end, then closes) has taken them.
fn say(port: u16, bytes: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// A server that takes anything and answers nothing.
fn sink_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

fn agent(dir: &Path, modbus: u16, mqtt: u16, opcua: u16) -> Agent {
    let extra = format!(
        "[probes.devices]\nenabled = false\n[probes.protocols]\nmodbus_ports = [{modbus}]\n\
         mqtt_ports = [{mqtt}]\nopcua_ports = [{opcua}]\n"
    );
    // The Modbus port is also the TCP probe's port class "e2e" (bytes).
    let ports = [modbus];
    let a = Agent::start(dir, &AgentSetup { class_ports: &ports, ..AgentSetup::offline("protocols", &extra) });
    assert_eq!(
        a.metric("edge_agent_probe_attached{probe=\"protocols\"}"),
        Some(1.0),
        "protocol probe not attached:\n{}",
        a.proc.log_text()
    );
    a
}

fn listen() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn modbus_latency_exceptions_and_protocol_openings_match_the_test() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("protocols");
    let ((ml, modbus), (ql, mqtt), (ol, opcua)) = (listen(), listen(), listen());
    modbus_server(ml);
    sink_server(ql);
    sink_server(ol);
    let a = agent(&dir, modbus, mqtt, opcua);

    // Ground truth, by function: requests sent and exception replies.
    let mut c = Client::connect(modbus);
    for _ in 0..10 {
        assert_eq!(c.call(&[&[3, 0, 0, 0, 2]])[0][0], 3);
    }
    for _ in 0..3 {
        assert_eq!(c.call(&[&[3, 0, 200, 0, 1]])[0], vec![0x83, 2]);
    }
    for i in 0..5u8 {
        assert_eq!(c.call(&[&[6, 0, i, 0, 9]])[0][0], 6);
    }
    let started = std::time::Instant::now();
    assert_eq!(c.call(&[&[16, 0, 42, 0, 1, 2, 0, 1]])[0][0], 16);
    assert!(started.elapsed() >= Duration::from_millis(400));
    for _ in 0..2 {
        assert_eq!(c.call(&[&[16, 0, 1, 0, 1, 2, 0, 1]])[0][0], 16);
    }
    for _ in 0..2 {
        assert_eq!(c.call(&[&[65, 0, 0, 0, 0]])[0], vec![0xc1, 1]);
    }
    // A diagnostics request that never gets its reply; once the server has
    // it (so the two never share a segment), the client gives up and uses
    // the transaction id again for a read (answered).
    let unanswered = UNANSWERED.load(Ordering::SeqCst);
    c.send(&[8, 0, 0, 0x12, 0x34]);
    wait_for("the server read the unanswered request", Duration::from_secs(10), || {
        match UNANSWERED.load(Ordering::SeqCst) {
            n if n > unanswered => Ok(()),
            n => Err(n),
        }
    });
    c.tid -= 1;
    assert_eq!(c.call(&[&[3, 0, 0, 0, 1]])[0][0], 3);
    // A second connection pipelines two requests in one segment.
    let mut c2 = Client::connect(modbus);
    let replies = c2.call(&[&[4, 0, 1, 0, 1], &[4, 0, 2, 0, 1]]);
    assert_eq!((replies[0][0], replies[1][0]), (4, 4));
    let modbus_bytes = c.bytes + c2.bytes;
    drop((c, c2));
    // Not Modbus on the Modbus port: recognised as other, no requests.
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    say(modbus, http);
    let port_bytes = (modbus_bytes + http.len()) as f64;
    // MQTT 3.1.1 CONNECT (client id "e2e"), and a TLS ClientHello opening.
    say(mqtt, &[0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 3, b'e', b'2', b'e']);
    say(mqtt, &[0x16, 3, 1, 0, 0x2a, 1, 0, 0, 0x26, 3, 3, 0, 0, 0, 0, 0]);
    // OPC UA Hello: "HEL", 'F', message size, protocol version...
    say(opcua, &[b'H', b'E', b'L', b'F', 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);

    let requests = [
        ("read_holding_registers", 14.0),
        ("write_single_register", 5.0),
        ("write_multiple_registers", 3.0),
        ("function_65", 2.0),
        ("read_input_registers", 2.0),
    ];
    let get = |metric: &str, side: &str, extra: &[&str]| {
        let side = format!("side=\"{side}\"");
        let mut l = vec![side.as_str()];
        l.extend_from_slice(extra);
        stored(&dir, metric, &l)
    };
    let func = |f: &str| format!("function=\"{f}\"");
    wait_for("every request and opening in a stored window", Duration::from_secs(20), || {
        let seen = |side| {
            get("edge_modbus_reply_seconds_count", side, &[&func("read_input_registers")]) == Some(2.0)
                && get("edge_protocol_connections_total", side, &["protocol=\"opcua\""]) == Some(1.0)
        };
        (seen("client") && seen("server")).then_some(()).ok_or("not yet")
    });
    e2e::settled(&dir, 2);
    for side in ["client", "server"] {
        for (f, n) in requests {
            assert_eq!(get("edge_modbus_requests_total", side, &[&func(f)]), Some(n), "{side} {f} requests");
            assert_eq!(get("edge_modbus_reply_seconds_count", side, &[&func(f)]), Some(n), "{side} {f} replies");
        }
        assert_eq!(get("edge_modbus_requests_total", side, &[&func("diagnostics")]), Some(1.0), "{side}");
        assert_eq!(get("edge_modbus_reply_seconds_count", side, &[&func("diagnostics")]), Some(0.0), "{side}");
        assert_eq!(get("edge_modbus_abandoned_requests_total", side, &[]), Some(1.0), "{side}: the hung request");
        let exc = |f: &str, code: &str| {
            let code = format!("code=\"{code}\"");
            get("edge_modbus_exceptions_total", side, &[&func(f), &code])
        };
        assert_eq!(exc("read_holding_registers", "illegal_data_address"), Some(3.0), "{side}");
        assert_eq!(exc("function_65", "illegal_function"), Some(2.0), "{side}");
        assert_eq!(get("edge_modbus_exceptions_total", side, &[&func("write_single_register")]), None);
        // The stalled reply: above 0.262144 s, within 0.524288 s.
        let bucket = |le: &str| {
            let le = format!("le=\"{le}\"");
            get("edge_modbus_reply_seconds_bucket", side, &[&func("write_multiple_registers"), &le])
        };
        assert_eq!(bucket("+Inf").unwrap() - bucket("0.262144").unwrap(), 1.0, "{side}: one slow reply");
        assert_eq!(bucket("0.524288"), bucket("+Inf"), "{side}");
        let fast = bucket("0.262144").unwrap();
        assert_eq!(fast, 2.0, "{side}: the other two replies were fast");
        let conns = |proto: &str, payload: &str| {
            let (p, y) = (format!("protocol=\"{proto}\""), format!("payload=\"{payload}\""));
            get("edge_protocol_connections_total", side, &[&p, &y])
        };
        assert_eq!(conns("modbus", "matched"), Some(2.0), "{side}");
        assert_eq!(conns("modbus", "other"), Some(1.0), "{side}");
        assert_eq!(conns("mqtt", "matched"), Some(1.0), "{side}");
        assert_eq!(conns("mqtt", "tls"), Some(1.0), "{side}");
        assert_eq!(conns("opcua", "matched"), Some(1.0), "{side}");
        assert_eq!(conns("opcua", "other"), None, "{side}");
        assert_eq!(get("edge_modbus_unmatched_replies_total", side, &[]), None, "{side}");
    }
    assert!(a.metric("edge_agent_probe_runs_total{probe=\"protocols\"}").unwrap_or(0.0) > 0.0);
    // TCP payload bytes of the Modbus port's class: every byte either end
    // wrote, sent once (by its writer) and received once (by its reader).
    for flow in ["sent", "received"] {
        let n = stored(&dir, &format!("edge_tcp_bytes_{flow}_total"), &["port_class=\"e2e\""]);
        assert_eq!(n, Some(port_bytes), "{flow}");
    }

    // SIGHUP moves Modbus to another port: the new programs count there
    // (from 0: new kernel objects), and no longer on the old one.
    let (ml2, modbus2) = listen();
    modbus_server(ml2);
    let conf = a.config_path().to_owned();
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace(&format!("modbus_ports = [{modbus}]"), &format!("modbus_ports = [{modbus2}]")))
        .unwrap();
    let mut a = a;
    a.proc.signal(libc::SIGHUP);
    wait_for("the probes reloaded", Duration::from_secs(10), || {
        a.proc.assert_running();
        a.proc.log_text().contains("probes reloaded").then_some(()).ok_or("not yet")
    });
    let (mut old, mut new) = (Client::connect(modbus), Client::connect(modbus2));
    for _ in 0..4 {
        assert_eq!(old.call(&[&[6, 0, 1, 0, 1]])[0][0], 6);
    }
    for _ in 0..3 {
        assert_eq!(new.call(&[&[6, 0, 1, 0, 1]])[0][0], 6);
    }
    wait_for("the new port's requests stored", Duration::from_secs(20), || {
        let n = get("edge_modbus_requests_total", "client", &[&func("write_single_register")]);
        (n == Some(3.0)).then_some(()).ok_or(n)
    });
    e2e::settled(&dir, 2);
    assert_eq!(get("edge_modbus_requests_total", "server", &[&func("write_single_register")]), Some(3.0));
}
