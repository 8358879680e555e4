//! Cost of the idle-connection census (issue 3): one socket-diagnostics
//! dump and count, as the agent does once per window, with N established
//! loopback connections (2N established sockets plus a listener).
//!
//!   cargo bench -p edge-agent --bench tcp_idle
//!
//! Needs no root.

use edge_agent::config::TcpLifecycleConfig;
use edge_agent::probe::tcp_idle::{census, dump};
use edge_agent::probe::tcp_lifecycle::PortClasses;
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

const DUMPS: usize = 200;

fn main() {
    let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut held = Vec::new();
    println!("## Idle-connection census ({DUMPS} dumps per row, median)\n");
    println!("| established connections on the box (ours) | sockets in the dump | µs per dump + census |");
    println!("|---|---|---|");
    for n in [0usize, 100, 1000] {
        while held.len() < n {
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            held.push((c, l.accept().unwrap().0));
        }
        let mut times = Vec::new();
        let mut seen = 0;
        for _ in 0..DUMPS {
            let start = Instant::now();
            let (conns, listening) = dump().expect("sock_diag dump");
            let c = census(&conns, &listening, &classes, 300_000);
            times.push(start.elapsed().as_secs_f64() * 1e6);
            seen = conns.len() + listening.len();
            std::hint::black_box(c);
        }
        times.sort_by(f64::total_cmp);
        println!("| {n} | {seen} | {:.0} |", times[DUMPS / 2]);
    }
}
