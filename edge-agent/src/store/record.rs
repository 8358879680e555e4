//! Byte layout of store records and segment headers (docs/store-format.md).
//! Pure functions: no I/O.

use crc::{Crc, CRC_32_ISCSI};

pub const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// Record flag: this record starts a block (its payload is a start frame).
pub const FLAG_BLOCK_START: u8 = 0x01;

/// Version byte of records written by this build.
pub const RECORD_VERSION: u8 = 2;
/// Bytes before the payload.
pub const RECORD_HEADER: usize = 28;
/// Largest payload a record may carry.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

pub const SEGMENT_MAGIC: [u8; 4] = *b"EASG";
pub const SEGMENT_VERSION: u8 = 1;
pub const SEGMENT_HEADER: usize = 16;

/// Appends one record to `out`:
///
/// ```text
/// 0   u8      version (2)
/// 1   u8      flags (bit 0: starts a block)
/// 2   u16     reserved, 0
/// 4   u32 LE  payload length N
/// 8   u64 LE  sequence number
/// 16  i64 LE  time of the record (ms since the epoch, newest sample)
/// 24  u32 LE  CRC-32C of bytes 0..24 and the payload
/// 28  N bytes payload
/// ```
pub fn encode_record(seq: u64, time_ms: i64, flags: u8, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut head = [0u8; 24];
    head[0] = RECORD_VERSION;
    head[1] = flags;
    head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[8..16].copy_from_slice(&seq.to_le_bytes());
    head[16..24].copy_from_slice(&time_ms.to_le_bytes());
    let mut d = CRC32C.digest();
    d.update(&head);
    d.update(payload);
    out.extend_from_slice(&head);
    out.extend_from_slice(&d.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// What starts at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, intact record of `total` bytes whose payload is
    /// `buf[RECORD_HEADER..total]`.
    Record { seq: u64, time_ms: i64, flags: u8, total: usize },
    /// The buffer ends inside a record (a torn write at the tail).
    Incomplete,
    /// The bytes are not a record this build can read.
    Corrupt(&'static str),
}

pub fn decode_record(buf: &[u8]) -> Decoded {
    if buf.len() < RECORD_HEADER {
        return Decoded::Incomplete;
    }
    if buf[0] != RECORD_VERSION {
        return Decoded::Corrupt("unknown record version");
    }
    // Reserved bytes are 0 in every record this version writes: set ones
    // are damage (or a forged record), even under a matching checksum.
    if buf[2..4] != [0, 0] {
        return Decoded::Corrupt("reserved bytes set");
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Decoded::Corrupt("length over the limit");
    }
    let total = RECORD_HEADER + len;
    if buf.len() < total {
        return Decoded::Incomplete;
    }
    let stored = u32::from_le_bytes([buf[24], buf[25], buf[26], buf[27]]);
    let mut d = CRC32C.digest();
    d.update(&buf[..24]);
    d.update(&buf[RECORD_HEADER..total]);
    if d.finalize() != stored {
        return Decoded::Corrupt("checksum mismatch");
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
    let time_ms = i64::from_le_bytes(buf[16..24].try_into().unwrap_or([0; 8]));
    Decoded::Record { seq, time_ms, flags: buf[1], total }
}

/// `EASG`, version, 3 reserved bytes, first sequence number (u64 LE).
pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[..4].copy_from_slice(&SEGMENT_MAGIC);
    h[4] = SEGMENT_VERSION;
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    h
}

pub fn decode_segment_header(buf: &[u8]) -> Result<u64, &'static str> {
    if buf.len() < SEGMENT_HEADER {
        return Err("segment shorter than its header");
    }
    if buf[..4] != SEGMENT_MAGIC {
        return Err("not a segment (bad magic)");
    }
    if buf[4] != SEGMENT_VERSION {
        return Err("unknown segment version");
    }
    Ok(u64::from_le_bytes(buf[8..16].try_into().unwrap_or([0; 8])))
}

/// The send-position file: what the uplink had acknowledged.
///
/// ```text
/// 0   u8      version (1)
/// 1   7 bytes reserved, 0
/// 8   u64 LE  last acknowledged sequence number (0: none)
/// 16  u32 LE  CRC-32C of bytes 0..16
/// ```
pub const CURSOR_LEN: usize = 20;
pub const CURSOR_VERSION: u8 = 1;

pub fn encode_cursor(acked: u64) -> [u8; CURSOR_LEN] {
    let mut b = [0u8; CURSOR_LEN];
    b[0] = CURSOR_VERSION;
    b[8..16].copy_from_slice(&acked.to_le_bytes());
    let crc = CRC32C.checksum(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_cursor(b: &[u8]) -> Result<u64, &'static str> {
    if b.len() != CURSOR_LEN {
        return Err("wrong length");
    }
    if b[0] != CURSOR_VERSION {
        return Err("unknown version");
    }
    if CRC32C.checksum(&b[..16]).to_le_bytes() != b[16..20] {
        return Err("checksum mismatch");
    }
    Ok(u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8])))
}

/// The drop counters file (`dropped`), so that what a box lost stays
/// visible across restarts (`store inspect`):
///
/// ```text
/// 0   u8      version (1)
/// 1   7 bytes reserved, 0
/// 8   u64 LE  records dropped for capacity
/// 16  u64 LE  records dropped for age
/// 24  u64 LE  records dropped because the disk was full
/// 32  u64 LE  of those, never acknowledged
/// 40  u64 LE  bytes dropped
/// 48  u32 LE  CRC-32C of bytes 0..48
/// ```
pub const DROPS_LEN: usize = 52;

pub fn encode_drops(v: [u64; 5]) -> [u8; DROPS_LEN] {
    let mut b = [0u8; DROPS_LEN];
    b[0] = 1;
    for (i, x) in v.iter().enumerate() {
        b[8 + i * 8..16 + i * 8].copy_from_slice(&x.to_le_bytes());
    }
    let crc = CRC32C.checksum(&b[..48]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_drops(b: &[u8]) -> Result<[u64; 5], &'static str> {
    if b.len() != DROPS_LEN || b[0] != 1 {
        return Err("wrong length or version");
    }
    if CRC32C.checksum(&b[..48]).to_le_bytes() != b[48..52] {
        return Err("checksum mismatch");
    }
    let mut v = [0u64; 5];
    for (i, x) in v.iter_mut().enumerate() {
        *x = u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap_or([0; 8]));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn drops_round_trip() {
        let v = [1, 2, 3, 4, 5];
        assert_eq!(super::decode_drops(&super::encode_drops(v)), Ok(v));
        let mut b = super::encode_drops(v);
        b[20] ^= 4;
        assert!(super::decode_drops(&b).is_err());
    }

    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // RFC 3720 B.4 check value.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn record_round_trip_and_layout() {
        let mut buf = Vec::new();
        encode_record(7, -3, 0, b"hello", &mut buf);
        assert_eq!(buf.len(), RECORD_HEADER + 5);
        assert_eq!(buf[0], RECORD_VERSION);
        assert_eq!(&buf[4..8], &5u32.to_le_bytes());
        assert_eq!(&buf[8..16], &7u64.to_le_bytes());
        assert_eq!(&buf[16..24], &(-3i64).to_le_bytes());
        assert_eq!(decode_record(&buf), Decoded::Record { seq: 7, time_ms: -3, flags: 0, total: 33 });
        assert_eq!(&buf[RECORD_HEADER..], b"hello");
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let mut buf = Vec::new();
        encode_record(1, 1_700_000_000_000, 0, b"payload bytes", &mut buf);
        for n in 0..buf.len() {
            assert_eq!(decode_record(&buf[..n]), Decoded::Incomplete, "prefix {n}");
        }
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    !matches!(decode_record(&b), Decoded::Record { .. }),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    /// Found by fuzz/record: a record whose reserved bytes were set, with a
    /// checksum that matched them, decoded; it re-encoded differently.
    #[test]
    fn set_reserved_bytes_are_corrupt_even_under_a_matching_checksum() {
        let mut head = [0u8; 24];
        head[0] = RECORD_VERSION;
        head[3] = 0xfb;
        head[4] = 1;
        let mut d = CRC32C.digest();
        d.update(&head);
        d.update(b"x");
        let mut buf = head.to_vec();
        buf.extend_from_slice(&d.finalize().to_le_bytes());
        buf.push(b'x');
        assert_eq!(decode_record(&buf), Decoded::Corrupt("reserved bytes set"));
        buf[3] = 0;
        assert!(matches!(decode_record(&buf), Decoded::Corrupt("checksum mismatch")));
    }

    #[test]
    fn cursor_round_trip_and_corruption() {
        let b = encode_cursor(123);
        assert_eq!(decode_cursor(&b), Ok(123));
        let mut c = b;
        c[9] ^= 1;
        assert!(decode_cursor(&c).is_err());
        assert!(decode_cursor(&b[..10]).is_err());
    }

    #[test]
    fn segment_header_round_trip() {
        let h = encode_segment_header(99);
        assert_eq!(decode_segment_header(&h), Ok(99));
        assert!(decode_segment_header(b"nope").is_err());
    }
}
