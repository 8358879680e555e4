//! A simulated serial sensor for the device-probe tests: a Modbus RTU slave
//! (address 1, function 3 "read holding registers", registers 0..16) on the
//! master side of a pseudo-terminal. Prints the slave side's path, then
//! answers requests until killed.
//!
//! `rtu_sensor <stall-request> <stall-ms>`: the reply to request number
//! `stall-request` (counting from 1) comes `stall-ms` late, like a sensor
//! that hangs for a moment. Requests for registers past 16 get exception 2
//! (illegal data address).

use std::io::Write;

fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let c = e2e::modbus_crc16(&frame);
    frame.extend_from_slice(&c.to_le_bytes());
    frame
}

fn check(rc: i32, what: &str) -> i32 {
    if rc < 0 {
        eprintln!("rtu_sensor: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    rc
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let stall_at: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stall_ms: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: plain libc calls on descriptors this process owns.
    unsafe {
        let master = check(libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY), "posix_openpt");
        check(libc::grantpt(master), "grantpt");
        check(libc::unlockpt(master), "unlockpt");
        let mut name = [0 as libc::c_char; 64];
        check(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), "ptsname_r");
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        // Hold the slave open (a line nobody holds reads as hung up) and
        // make the line raw: no echo, no line editing, 8 bits.
        let slave = check(libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY), "open slave");
        let mut t: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(slave, &mut t), "tcgetattr");
        libc::cfmakeraw(&mut t);
        check(libc::tcsetattr(slave, libc::TCSANOW, &t), "tcsetattr");
        println!("{path}");
        std::io::stdout().flush().ok();

        let mut buf = Vec::new();
        let mut requests = 0u64;
        loop {
            let mut chunk = [0u8; 256];
            let n = libc::read(master, chunk.as_mut_ptr().cast(), chunk.len());
            if n <= 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            buf.extend_from_slice(&chunk[..n as usize]);
            while buf.len() >= 8 {
                let req: Vec<u8> = buf.drain(..8).collect();
                requests += 1;
                if e2e::modbus_crc16(&req[..6]).to_le_bytes() != [req[6], req[7]] || req[0] != 1 {
                    continue; // not for us: a real slave stays silent
                }
                let (start, count) = (u16::from_be_bytes([req[2], req[3]]), u16::from_be_bytes([req[4], req[5]]));
                let reply = if req[1] != 3 {
                    with_crc(vec![1, req[1] | 0x80, 1])
                } else if count == 0 || u32::from(start) + u32::from(count) > 16 {
                    with_crc(vec![1, 0x83, 2])
                } else {
                    let mut r = vec![1, 3, (count * 2) as u8];
                    for reg in start..start + count {
                        r.extend_from_slice(&(1000 + reg).to_be_bytes());
                    }
                    with_crc(r)
                };
                if requests == stall_at {
                    std::thread::sleep(std::time::Duration::from_millis(stall_ms));
                }
                libc::write(master, reply.as_ptr().cast(), reply.len());
            }
        }
    }
}
