//! Modbus RTU on a serial line, from the bytes a process read from and
//! wrote to the device file: reassembled into frames (a frame may come in
//! several reads, several frames in one), CRC-checked, each reply paired
//! with the request before it by position, unit and function, then
//! decoded into accesses for the tag map. Pure: bytes in, accesses and
//! refusals out.
//!
//! The box is the master (`side = "client"`: it writes requests and reads
//! replies) or a slave (`side = "server"`: it reads requests and writes
//! replies); the link is told which.

use super::tags::Table;
use super::Refusal;

/// The Modbus RTU frame check: CRC-16, polynomial 0xA001 reflected,
/// initial 0xFFFF, sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xffffu16;
    for b in data {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xa001 } else { crc >> 1 };
        }
    }
    crc
}

/// Longest RTU frame (address, PDU of up to 253 bytes, CRC).
pub const MAX_FRAME: usize = 256;

/// A request as the reply needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub time_ms: i64,
    pub unit: u8,
    pub function: u8,
    pub start: u16,
    pub quantity: u16,
    /// A write's data (registers or coil bits as on the wire).
    pub data: Vec<u8>,
}

/// What a completed exchange gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub time_ms: i64,
    /// A write (functions 5, 6, 15, 16) the slave took.
    pub written: bool,
    pub unit: u8,
    pub table: Table,
    pub start: u16,
    pub quantity: u16,
    pub data: Vec<u8>,
}

/// The length of the frame at the start of `b` if it is a request, or
/// None when more bytes are needed; Err when it cannot be one.
fn request_len(b: &[u8]) -> Result<Option<usize>, ()> {
    if b.len() < 2 {
        return Ok(None);
    }
    match b[1] {
        1..=6 => Ok(Some(8)),
        15 | 16 => Ok(if b.len() < 7 { None } else { Some(9 + usize::from(b[6])) }),
        _ => Err(()),
    }
}

fn reply_len(b: &[u8]) -> Result<Option<usize>, ()> {
    if b.len() < 3 {
        return Ok(None);
    }
    match b[1] {
        1..=4 => Ok(Some(5 + usize::from(b[2]))),
        5 | 6 | 15 | 16 => Ok(Some(8)),
        f if f & 0x80 != 0 && matches!(f & 0x7f, 1..=6 | 15 | 16) => Ok(Some(5)),
        _ => Err(()),
    }
}

/// One direction's bytes, reassembled into frames.
#[derive(Debug, Default)]
struct Framer {
    buf: Vec<u8>,
    /// When the bytes at the start of `buf` arrived.
    time_ms: i64,
}

impl Framer {
    /// Appends bytes and returns the complete, CRC-checked frames (with
    /// the time their first byte arrived); refusals counted in `refused`.
    fn push(
        &mut self,
        time_ms: i64,
        bytes: &[u8],
        is_request: bool,
        refused: &mut Vec<Refusal>,
    ) -> Vec<(i64, Vec<u8>)> {
        if self.buf.is_empty() {
            self.time_ms = time_ms;
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if self.buf.is_empty() {
                break;
            }
            let len = if is_request { request_len(&self.buf) } else { reply_len(&self.buf) };
            let n = match len {
                Ok(None) => break,
                Ok(Some(n)) if n <= MAX_FRAME && self.buf.len() < n => break,
                Ok(Some(n)) if n <= MAX_FRAME => n,
                // Not a frame start: requests look again one byte on;
                // a reply is one frame, and the rest of it is dropped.
                _ => {
                    refused.push(Refusal::Length);
                    self.skip(if is_request { 1 } else { self.buf.len() }, time_ms);
                    continue;
                }
            };
            let (body, crc) = self.buf[..n].split_at(n - 2);
            if crc16(body).to_le_bytes() != crc {
                refused.push(Refusal::Crc);
                self.skip(if is_request { 1 } else { self.buf.len() }, time_ms);
                continue;
            }
            out.push((self.time_ms, self.buf[..n].to_vec()));
            self.skip(n, time_ms);
        }
        if self.buf.len() > 2 * MAX_FRAME {
            refused.push(Refusal::Length);
            self.buf.clear();
        }
        out
    }

    fn skip(&mut self, n: usize, now_ms: i64) {
        self.buf.drain(..n.min(self.buf.len()));
        self.time_ms = now_ms;
    }
}

/// A serial line as one process sees it through one device file.
#[derive(Debug, Default)]
pub struct Link {
    /// The box writes the requests (master) or reads them (slave).
    pub box_is_master: bool,
    requests: Framer,
    replies: Framer,
    pending: Option<Request>,
    /// Refusals since the last `take_refusals`.
    refused: Vec<Refusal>,
}

impl Link {
    pub fn new(box_is_master: bool) -> Self {
        Link { box_is_master, ..Default::default() }
    }

    /// Bytes the process read (`written` false) or wrote at `time_ms`.
    /// Returns the exchanges they completed.
    pub fn bytes(&mut self, time_ms: i64, written: bool, bytes: &[u8]) -> Vec<Exchange> {
        let requests = written == self.box_is_master;
        let mut out = Vec::new();
        if requests {
            // A new request ends the exchange before it: a reply still
            // incomplete will not be completed.
            if !self.replies.buf.is_empty() {
                self.refused.push(Refusal::Length);
                self.replies.buf.clear();
            }
            for (t, f) in self.requests.push(time_ms, bytes, true, &mut self.refused) {
                if self.pending.is_some() {
                    // The previous request got no reply (timeout, broadcast).
                    self.refused.push(Refusal::Unpaired);
                }
                self.pending = parse_request(t, &f, &mut self.refused);
            }
        } else {
            let before = self.refused.len();
            let frames = self.replies.push(time_ms, bytes, false, &mut self.refused);
            if self.refused.len() > before {
                // A damaged reply still answered the request.
                self.pending = None;
            }
            for (t, f) in frames {
                let Some(req) = self.pending.take() else {
                    self.refused.push(Refusal::Unpaired);
                    continue;
                };
                if f[0] != req.unit || f[1] & 0x7f != req.function {
                    self.refused.push(Refusal::Unpaired);
                    continue;
                }
                if f[1] & 0x80 != 0 {
                    self.refused.push(Refusal::Exception);
                    continue;
                }
                if let Some(x) = exchange(t, &req, &f, &mut self.refused) {
                    out.push(x);
                }
            }
        }
        out
    }

    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.refused)
    }
}

fn parse_request(t: i64, f: &[u8], refused: &mut Vec<Refusal>) -> Option<Request> {
    let (unit, function) = (f[0], f[1]);
    let start = u16::from_be_bytes([f[2], f[3]]);
    let word = u16::from_be_bytes([f[4], f[5]]);
    let (quantity, data) = match function {
        1 | 2 => (word, vec![]),
        3 | 4 => (word, vec![]),
        5 => match word {
            0xff00 => (1, vec![1]),
            0x0000 => (1, vec![0]),
            _ => {
                refused.push(Refusal::CoilValue);
                return None;
            }
        },
        6 => (1, f[4..6].to_vec()),
        15 | 16 => {
            let n = usize::from(f[6]);
            let want = if function == 15 { usize::from(word).div_ceil(8) } else { usize::from(word) * 2 };
            if n != want || word == 0 {
                refused.push(Refusal::Length);
                return None;
            }
            (word, f[7..7 + n].to_vec())
        }
        _ => return None,
    };
    let max = match function {
        1 | 2 => 2000,
        3 | 4 => 125,
        15 => 1968,
        16 => 123,
        _ => 1,
    };
    if quantity == 0 || quantity > max {
        refused.push(Refusal::Length);
        return None;
    }
    Some(Request { time_ms: t, unit, function, start, quantity, data })
}

fn exchange(t: i64, req: &Request, f: &[u8], refused: &mut Vec<Refusal>) -> Option<Exchange> {
    let table = Table::of_function(req.function)?;
    let (time_ms, data) = match req.function {
        1..=4 => {
            let want =
                if req.function <= 2 { usize::from(req.quantity).div_ceil(8) } else { usize::from(req.quantity) * 2 };
            if usize::from(f[2]) != want {
                refused.push(Refusal::Length);
                return None;
            }
            (t, f[3..3 + want].to_vec())
        }
        // A write: its values as the request sent them, at the request's
        // time, now that the reply says they took. The reply echoes the
        // address (and value or quantity).
        _ => {
            if f[2..6] != [(req.start >> 8) as u8, req.start as u8, f[4], f[5]]
                || (matches!(req.function, 15 | 16) && u16::from_be_bytes([f[4], f[5]]) != req.quantity)
                || (req.function == 6 && f[4..6] != req.data[..])
                || (req.function == 5 && f[4..6] != [if req.data[0] == 1 { 0xff } else { 0 }, 0])
            {
                refused.push(Refusal::Unpaired);
                return None;
            }
            (req.time_ms, req.data.clone())
        }
    };
    Some(Exchange {
        time_ms,
        written: req.function >= 5,
        unit: req.unit,
        table,
        start: req.start,
        quantity: req.quantity,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_crc(mut f: Vec<u8>) -> Vec<u8> {
        let c = crc16(&f);
        f.extend_from_slice(&c.to_le_bytes());
        f
    }

    #[test]
    fn crc_of_the_specifications_example() {
        // Modbus over serial line, 6.2.2: 02 07 -> CRC 41 12 (sent 12 41?)
        // The common worked example: 01 03 00 00 00 0A -> C5 CD.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0a]).to_le_bytes(), [0xc5, 0xcd]);
    }

    #[test]
    fn frames_in_pieces_pair_into_exchanges() {
        let mut l = Link::new(true);
        let req = with_crc(vec![1, 3, 0, 10, 0, 2]);
        let rep = with_crc(vec![1, 3, 4, 0x12, 0x34, 0x56, 0x78]);
        assert!(l.bytes(100, true, &req).is_empty());
        // The reply in three reads.
        assert!(l.bytes(110, false, &rep[..2]).is_empty());
        assert!(l.bytes(111, false, &rep[2..5]).is_empty());
        let x = l.bytes(112, false, &rep[5..]);
        assert_eq!(
            x,
            vec![Exchange {
                time_ms: 110,
                written: false,
                unit: 1,
                table: Table::Holding,
                start: 10,
                quantity: 2,
                data: vec![0x12, 0x34, 0x56, 0x78]
            }]
        );
        assert!(l.take_refusals().is_empty());
    }

    #[test]
    fn bad_frames_never_give_values_and_say_why() {
        let mut l = Link::new(true);
        let req = with_crc(vec![1, 3, 0, 10, 0, 2]);
        let mut rep = with_crc(vec![1, 3, 4, 0x12, 0x34, 0x56, 0x78]);
        l.bytes(1, true, &req);
        rep[4] ^= 1;
        assert!(l.bytes(2, false, &rep).is_empty());
        assert!(l.take_refusals().contains(&Refusal::Crc));
        // Wrong byte count for the request's quantity.
        l.bytes(3, true, &req);
        assert!(l.bytes(4, false, &with_crc(vec![1, 3, 2, 0, 1])).is_empty());
        assert_eq!(l.take_refusals(), vec![Refusal::Length]);
        // Another unit answers.
        l.bytes(5, true, &req);
        assert!(l.bytes(6, false, &with_crc(vec![2, 3, 4, 0, 1, 0, 2])).is_empty());
        assert_eq!(l.take_refusals(), vec![Refusal::Unpaired]);
        // An exception reply.
        l.bytes(7, true, &req);
        assert!(l.bytes(8, false, &with_crc(vec![1, 0x83, 2])).is_empty());
        assert_eq!(l.take_refusals(), vec![Refusal::Exception]);
        // A reply with no request.
        assert!(l.bytes(9, false, &with_crc(vec![1, 3, 2, 0, 1])).is_empty());
        assert_eq!(l.take_refusals(), vec![Refusal::Unpaired]);
    }

    #[test]
    fn writes_count_when_echoed() {
        let mut l = Link::new(true);
        let req = with_crc(vec![1, 16, 0, 20, 0, 2, 4, 0, 7, 0, 8]);
        l.bytes(50, true, &req);
        let x = l.bytes(60, false, &with_crc(vec![1, 16, 0, 20, 0, 2]));
        assert_eq!(x.len(), 1);
        assert_eq!((x[0].time_ms, x[0].start, &x[0].data[..]), (50, 20, &[0, 7, 0, 8][..]));
        let req = with_crc(vec![1, 5, 0, 3, 0xff, 0]);
        l.bytes(70, true, &req);
        let x = l.bytes(80, false, &req);
        assert_eq!((x[0].table, x[0].data.clone()), (Table::Coil, vec![1]));
    }

    #[test]
    fn a_slave_box_reads_requests_and_writes_replies() {
        let mut l = Link::new(false);
        l.bytes(1, false, &with_crc(vec![9, 4, 0, 0, 0, 1]));
        let x = l.bytes(2, true, &with_crc(vec![9, 4, 2, 0xab, 0xcd]));
        assert_eq!((x[0].table, x[0].unit, &x[0].data[..]), (Table::Input, 9, &[0xab, 0xcd][..]));
    }
}
