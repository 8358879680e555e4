//! The process that reads the simulated sensor (rtu_sensor) the way a
//! factory application reads a Modbus RTU device on a serial port, and
//! counts exactly what it did to the device file: every open, ioctl, read
//! and write system call, bytes, errors by errno, and how many reads took
//! longer than a threshold. Prints the counts as one JSON object.
//!
//! `rtu_reader <tty> <polls> <slow-us>`: `polls` requests for registers
//! 0..4, then one for a register that does not exist (an exception reply),
//! then one non-blocking read with nothing to read (EAGAIN).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::ffi::CString::new(args[1].clone()).unwrap();
    let polls: u32 = args[2].parse().unwrap();
    let slow_us: u128 = args[3].parse().unwrap();
    let mut c = Counts::default();
    // SAFETY: plain libc calls on a descriptor this process owns, with
    // buffers that outlive them.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        c.opens += 1;
        assert!(fd >= 0, "open {:?}: {}", args[1], std::io::Error::last_os_error());
        // Raw mode, as a serial application sets its port up: two ioctls.
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::ioctl(fd, libc::TCGETS, &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::ioctl(fd, libc::TCSETS, &t), 0);
        c.ioctls += 2;

        for i in 0..=polls {
            // The last request asks for registers past the end.
            let (start, count): (u16, u16) = if i < polls { (0, 4) } else { (14, 4) };
            let mut req = vec![1u8, 3];
            req.extend_from_slice(&start.to_be_bytes());
            req.extend_from_slice(&count.to_be_bytes());
            let crc = e2e::modbus_crc16(&req);
            req.extend_from_slice(&crc.to_le_bytes());
            let n = libc::write(fd, req.as_ptr().cast(), req.len());
            c.writes += 1;
            assert_eq!(n, req.len() as isize);
            c.write_bytes += n as u64;
            let want = if i < polls { 5 + 2 * count as usize } else { 5 };
            let mut got = Vec::new();
            while got.len() < want {
                let mut buf = [0u8; 64];
                let t0 = std::time::Instant::now();
                let n = libc::read(fd, buf.as_mut_ptr().cast(), want - got.len());
                let took = t0.elapsed().as_micros();
                c.reads += 1;
                assert!(n > 0, "read: {}", std::io::Error::last_os_error());
                c.read_bytes += n as u64;
                if took > slow_us {
                    c.slow_reads += 1;
                }
                got.extend_from_slice(&buf[..n as usize]);
            }
            if got[1] & 0x80 != 0 {
                c.exceptions += 1;
            }
        }

        // Nothing more to read: a non-blocking read fails with EAGAIN.
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        let mut buf = [0u8; 8];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        c.reads += 1;
        assert_eq!(n, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN));
        c.eagain += 1;
        libc::close(fd);
    }
    println!(
        "{{\"opens\":{},\"ioctls\":{},\"reads\":{},\"read_bytes\":{},\"writes\":{},\"write_bytes\":{},\"eagain\":{},\"slow_reads\":{},\"exceptions\":{}}}",
        c.opens, c.ioctls, c.reads, c.read_bytes, c.writes, c.write_bytes, c.eagain, c.slow_reads, c.exceptions
    );
}

#[derive(Default)]
struct Counts {
    opens: u64,
    ioctls: u64,
    reads: u64,
    read_bytes: u64,
    writes: u64,
    write_bytes: u64,
    eagain: u64,
    slow_reads: u64,
    exceptions: u64,
}
