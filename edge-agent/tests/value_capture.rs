//! The protocol probe's value capture on the real kernel, read directly
//! from its ring (docs/process-values.md): a Modbus/TCP server and client
//! in this test, hand-written ADUs. Only mapped registers and coils leave
//! the kernel (the others are zero, their mask bits clear); unmapped
//! requests make no event at all; writes come with their outcome; a reply
//! split across two TCP segments is refused and counted.

use edge_agent::config::ProtocolsConfig;
use edge_agent::probe::protocols::{ProtocolsProbe, VALUE_READ, VALUE_WRITE, VALUE_WRITE_FAILED, VALUE_WRITE_OK};
use edge_agent::values::tags::{Context, TagConfig, TagMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "probe tests need root (eBPF)");
    eprintln!("SKIPPED (not in CI): probe tests need root (eBPF)");
    false
}

fn tags(port: u16) -> TagMap {
    #[derive(serde::Deserialize)]
    struct F {
        tags: Vec<TagConfig>,
    }
    let text = format!(
        r#"
[[tags]]
name = "a"
source = "modbus_tcp"
port = {port}
table = "holding"
address = 5
[[tags]]
name = "b"
source = "modbus_tcp"
port = {port}
table = "holding"
address = 7
type = "f32"
[[tags]]
name = "run"
source = "modbus_tcp"
port = {port}
table = "coil"
address = 3
type = "bool"
[[tags]]
name = "far"
source = "modbus_tcp"
port = {port}
table = "input"
address = 1000
"#
    );
    let f: F = toml::from_str(&text).unwrap();
    TagMap::build(&f.tags, &Context { modbus_ports: &[port], peers: &Default::default() }).unwrap()
}

fn read_adu(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 6];
    c.read_exact(&mut h)?;
    let mut adu = h.to_vec();
    adu.resize(6 + usize::from(u16::from_be_bytes([h[4], h[5]])), 0);
    c.read_exact(&mut adu[6..])?;
    Ok(adu)
}

fn adu(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut a = tid.to_be_bytes().to_vec();
    a.extend_from_slice(&[0, 0]);
    a.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    a.push(unit);
    a.extend_from_slice(pdu);
    a
}

/// A server: holding register i holds 0x1000 + i, every coil is on; writes
/// are echoed, except the value 0xDEAD (exception 3, illegal data value);
/// unit 9 answers exception 2; a request for input register 1000 gets its
/// reply in two segments.
fn serve(l: TcpListener) {
    let (mut c, _) = l.accept().unwrap();
    c.set_nodelay(true).unwrap();
    while let Ok(req) = read_adu(&mut c) {
        let (tid, unit, f) = (u16::from_be_bytes([req[0], req[1]]), req[6], req[7]);
        let start = u16::from_be_bytes([req[8], req[9]]);
        let qty = u16::from_be_bytes([req[10], req[11]]);
        let pdu: Vec<u8> = if unit == 9 {
            vec![f | 0x80, 2]
        } else if f == 6 && req[10..12] == [0xde, 0xad] {
            vec![f | 0x80, 3]
        } else {
            match f {
                3 | 4 => {
                    let mut p = vec![f, (qty * 2) as u8];
                    for i in 0..qty {
                        p.extend_from_slice(&(0x1000 + start + i).to_be_bytes());
                    }
                    p
                }
                1 => {
                    let n = usize::from(qty).div_ceil(8);
                    let mut p = vec![f, n as u8];
                    p.extend(std::iter::repeat_n(0xff, n));
                    p
                }
                5 | 6 => req[7..12].to_vec(),
                _ => req[7..12].to_vec(), // 15, 16: function, address, quantity
            }
        };
        let reply = adu(tid, unit, &pdu);
        if f == 4 && start == 1000 {
            // Two segments: the kernel sees the ADU cut.
            c.write_all(&reply[..9]).unwrap();
            c.flush().unwrap();
            std::thread::sleep(Duration::from_millis(30));
            c.write_all(&reply[9..]).unwrap();
        } else {
            c.write_all(&reply).unwrap();
        }
    }
}

#[test]
fn only_mapped_registers_leave_the_kernel() {
    if !root_or_skip() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = ProtocolsConfig { modbus_ports: vec![port], ..Default::default() };
    let mut probe = ProtocolsProbe::attach(&cfg, None, &tags(port)).expect("protocol probe with capture");
    let server = std::thread::spawn(move || serve(l));
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    let mut call = |tid: u16, unit: u8, pdu: &[u8]| {
        c.write_all(&adu(tid, unit, pdu)).unwrap();
        read_adu(&mut c).unwrap()
    };
    // Holding 0..10: a (5) and b (7, 8) mapped, the rest not.
    call(1, 1, &[3, 0, 0, 0, 10]);
    // Holding 20..25: nothing mapped, no event.
    call(2, 1, &[3, 0, 20, 0, 5]);
    // Coils 0..16: only coil 3.
    call(3, 1, &[1, 0, 0, 0, 16]);
    // Write single register 5 = 0x4242: a write, then its outcome.
    call(4, 1, &[6, 0, 5, 0x42, 0x42]);
    // Write multiple registers 6..9 = 1, 2, 3 (b and one unmapped).
    call(5, 1, &[16, 0, 6, 0, 3, 6, 0, 1, 0, 2, 0, 3]);
    // Unit 9 is not mapped: no event.
    call(6, 9, &[6, 0, 5, 0, 1]);
    // A write the server refuses: the write, then its failure.
    call(7, 1, &[6, 0, 5, 0xde, 0xad]);
    // Input 1000 is mapped; its reply comes in two segments: no event.
    call(8, 1, &[4, 3, 0xe8, 0, 1]);
    drop(c);
    server.join().unwrap();

    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.len() < 8 && Instant::now() < deadline {
        probe.drain_values(|e| {
            events.push((
                e.kind,
                e.function,
                e.tid,
                e.start,
                e.quantity,
                e.data.to_vec(),
                e.mask.to_vec(),
                e.server_port,
            ))
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let kinds: Vec<(u8, u8, u16)> = events.iter().map(|e| (e.0, e.1, e.2)).collect();
    assert_eq!(
        kinds,
        vec![
            (VALUE_READ, 3, 1),
            (VALUE_READ, 1, 3),
            (VALUE_WRITE, 6, 4),
            (VALUE_WRITE_OK, 6, 4),
            (VALUE_WRITE, 16, 5),
            (VALUE_WRITE_OK, 16, 5),
            (VALUE_WRITE, 6, 7),
            (VALUE_WRITE_FAILED, 6, 7)
        ],
        "events (kind, function, tid)"
    );
    // The read of holding 0..10: registers 5, 7, 8 as served, all others 0.
    let (_, _, _, start, qty, data, mask, server_port) = &events[0];
    assert_eq!((*start, *qty, *server_port), (0, 10, port));
    let mut want = vec![0u8; 20];
    for r in [5u16, 7, 8] {
        want[usize::from(r) * 2..usize::from(r) * 2 + 2].copy_from_slice(&(0x1000 + r).to_be_bytes());
    }
    assert_eq!(data, &want, "unmapped registers are zero in the event");
    assert_eq!(mask, &vec![0b1010_0000, 0b0000_0001], "mask: registers 5, 7, 8");
    // Coils: only coil 3 set and masked.
    assert_eq!((&events[1].5, &events[1].6), (&vec![0b1000, 0], &vec![0b1000, 0]));
    // The single write: register 5's new value.
    assert_eq!(events[2].5, vec![0x42, 0x42]);
    // The multiple write: 6 (unmapped) zero, 7 and 8 (b) as written.
    assert_eq!(events[4].5, vec![0, 0, 0, 2, 0, 3]);
    assert_eq!(events[4].6, vec![0b110]);
    let r = probe.read().unwrap();
    assert_eq!(r.values_bad, [0, 1, 0], "the split reply: partial");
    assert_eq!(r.values_lost, 0);
}
