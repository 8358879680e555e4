//! Measuring helpers shared by the probe benchmarks (each uses some).
#![allow(dead_code)]

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU seconds and resident bytes of a process.
pub fn cpu_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let (hz, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK) as f64, libc::sysconf(libc::_SC_PAGESIZE) as u64) };
    let cpu = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<f64>().ok()).sum::<f64>() / hz;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let rss = statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * page;
    (cpu, rss)
}

/// Runs the release agent with `conf` for `secs` seconds while `each_second`
/// makes one second's load (then sleeps out the second); returns the
/// agent's CPU as % of one core, and its resident bytes at the end.
pub fn agent_under_load(
    bin: &std::path::Path,
    conf: &std::path::Path,
    secs: u64,
    mut each_second: impl FnMut(),
) -> (f64, u64) {
    use std::time::{Duration, Instant};
    let mut agent = std::process::Command::new(bin)
        .args(["--config", &conf.display().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, _) = cpu_rss(agent.id());
    let start = Instant::now();
    for s in 0..secs {
        each_second();
        if let Some(wait) = Duration::from_secs(s + 1).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu1, rss) = cpu_rss(agent.id());
    let _ = agent.kill();
    let _ = agent.wait();
    (100.0 * (cpu1 - cpu0) / wall, rss)
}

/// One loopback TCP connection to `l`: connect, accept, close both ends.
pub fn lifecycle(l: &std::net::TcpListener, port: u16) {
    let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (a, _) = l.accept().unwrap();
    drop(c);
    drop(a);
}

/// ns per loopback connect + accept + close of both ends.
pub fn lifecycles(l: &std::net::TcpListener, n: usize) -> f64 {
    let port = l.local_addr().unwrap().port();
    let start = std::time::Instant::now();
    for _ in 0..n {
        lifecycle(l, port);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// ns per MiB streamed over one loopback connection to `l` (every segment
/// received passes tcp:tcp_probe).
pub fn stream(l: &std::net::TcpListener, mib: usize) -> f64 {
    use std::io::{Read, Write};
    let port = l.local_addr().unwrap().port();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k,
            }
        }
    });
    let chunk = vec![1u8; 16 << 10];
    let start = std::time::Instant::now();
    for _ in 0..mib * 64 {
        c.write_all(&chunk).unwrap();
    }
    drop(c);
    assert_eq!(reader.join().unwrap(), mib << 20);
    start.elapsed().as_nanos() as f64 / mib as f64
}
