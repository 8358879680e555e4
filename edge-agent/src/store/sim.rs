//! An in-memory [`Medium`] that behaves like flash under power loss, for
//! tests and for fault-injection runs of the store logic.
//!
//! Each segment keeps what was written and how much of it was made durable
//! (`flush`). [`SimMedium::power_cut`] throws away the process (every open
//! handle stops working) and, per segment, keeps the durable bytes plus a
//! random prefix of the unsynced tail whose last bytes may be garbage, as a
//! half-programmed flash page leaves them. Bit flips in durable data and a
//! capacity limit (disk full) can be injected too.

use super::medium::{Medium, SegmentIo};
use embedded_io::{ErrorKind, ErrorType, Read, Seek, SeekFrom, Write};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimError(pub ErrorKind);

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "simulated medium: {:?}", self.0)
    }
}

impl std::error::Error for SimError {}

impl embedded_io::Error for SimError {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}

#[derive(Debug, Default, Clone)]
struct SimFile {
    data: Vec<u8>,
    /// `data[..synced]` survives a power cut.
    synced: usize,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<u64, SimFile>,
    quarantined: BTreeMap<u64, Vec<u8>>,
    meta: HashMap<String, Vec<u8>>,
    /// Bumped by every power cut; handles of an older epoch are dead.
    epoch: u64,
    capacity: Option<u64>,
    rng: u64,
    bytes_written: u64,
    flushes: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn used(&self) -> u64 {
        self.files.values().map(|f| f.data.len() as u64).sum()
    }
}

/// Cheap to clone: clones share the same simulated device.
#[derive(Clone, Debug)]
pub struct SimMedium {
    state: Arc<Mutex<State>>,
}

pub struct SimSegment {
    state: Arc<Mutex<State>>,
    id: u64,
    pos: u64,
    epoch: u64,
}

impl SimMedium {
    pub fn new(seed: u64) -> SimMedium {
        let st = State { rng: seed | 1, ..Default::default() };
        SimMedium { state: Arc::new(Mutex::new(st)) }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process dies and power goes: unsynced tails are lost, wholly or
    /// in part, and what survives of them may end in garbage.
    pub fn power_cut(&self) {
        let mut st = self.st();
        st.epoch += 1;
        let ids: Vec<u64> = st.files.keys().copied().collect();
        for id in ids {
            let r1 = st.next();
            let r2 = st.next();
            let f = st.files.get_mut(&id).expect("listed");
            let tail = f.data.len() - f.synced;
            let keep = if tail == 0 { 0 } else { (r1 % (tail as u64 + 1)) as usize };
            f.data.truncate(f.synced + keep);
            // Up to 8 garbage bytes at the end of the surviving unsynced part.
            let garble = (r2 % 9) as usize;
            let from = f.data.len().saturating_sub(garble).max(f.synced);
            for (i, b) in f.data[from..].iter_mut().enumerate() {
                *b ^= (r2 >> (i % 8 * 8)) as u8 | 1;
            }
            f.synced = f.data.len();
        }
    }

    /// The process dies (SIGKILL) but the kernel keeps its page cache:
    /// everything written survives.
    pub fn process_crash(&self) {
        let mut st = self.st();
        st.epoch += 1;
        for f in st.files.values_mut() {
            f.synced = f.data.len();
        }
    }

    /// Flips one bit of a segment's stored bytes.
    pub fn flip_bit(&self, id: u64, byte: usize, bit: u8) -> bool {
        let mut st = self.st();
        match st.files.get_mut(&id) {
            Some(f) if byte < f.data.len() => {
                f.data[byte] ^= 1 << (bit % 8);
                true
            }
            _ => false,
        }
    }

    /// Limits the total bytes of all segments; writes past it fail.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.st().capacity = bytes;
    }

    pub fn segment_len(&self, id: u64) -> Option<usize> {
        self.st().files.get(&id).map(|f| f.data.len())
    }

    pub fn quarantined(&self) -> Vec<u64> {
        self.st().quarantined.keys().copied().collect()
    }

    /// (bytes written to segments, flushes) since creation.
    pub fn io_counts(&self) -> (u64, u64) {
        let st = self.st();
        (st.bytes_written, st.flushes)
    }

    pub fn random(&self) -> u64 {
        self.st().next()
    }
}

impl SimMedium {
    /// A medium built from arbitrary bytes, for fuzzing and for replaying
    /// what a fuzzer found: up to 4 segments of `[id byte][len u16 LE][bytes]`
    /// (segment id = id byte / 2 + 1; a valid segment header is put in front
    /// when the id byte is even, so scans reach the records); whatever is
    /// left becomes the send-position file.
    pub fn from_fuzz_input(data: &[u8]) -> SimMedium {
        use embedded_io::Write as _;
        let mut sim = SimMedium::new(1);
        let mut rest = data;
        let mut n = 0;
        while rest.len() >= 3 && n < 4 {
            let id = u64::from(rest[0] / 2) + 1;
            let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
            if let Ok(mut seg) = sim.create(id) {
                if rest[0].is_multiple_of(2) {
                    let _ = seg.write_all(&super::record::encode_segment_header(id));
                }
                let _ = seg.write_all(&rest[3..3 + len]);
            }
            rest = &rest[3 + len..];
            n += 1;
        }
        if !rest.is_empty() {
            let _ = sim.write_meta("acked", rest);
        }
        sim
    }
}

impl Medium for SimMedium {
    type Error = SimError;
    type Segment = SimSegment;

    fn segments(&mut self) -> Result<Vec<u64>, SimError> {
        Ok(self.st().files.keys().copied().collect())
    }

    fn open(&mut self, id: u64) -> Result<SimSegment, SimError> {
        let st = self.st();
        if !st.files.contains_key(&id) {
            return Err(SimError(ErrorKind::NotFound));
        }
        Ok(SimSegment { state: self.state.clone(), id, pos: 0, epoch: st.epoch })
    }

    fn create(&mut self, id: u64) -> Result<SimSegment, SimError> {
        let mut st = self.st();
        st.files.insert(id, SimFile::default());
        Ok(SimSegment { state: self.state.clone(), id, pos: 0, epoch: st.epoch })
    }

    fn remove(&mut self, id: u64) -> Result<(), SimError> {
        self.st().files.remove(&id);
        Ok(())
    }

    fn quarantine(&mut self, id: u64) -> Result<(), SimError> {
        let mut st = self.st();
        let f = st.files.remove(&id).ok_or(SimError(ErrorKind::NotFound))?;
        st.quarantined.insert(id, f.data);
        Ok(())
    }

    fn read_meta(&mut self, name: &str) -> Result<Option<Vec<u8>>, SimError> {
        Ok(self.st().meta.get(name).cloned())
    }

    fn write_meta(&mut self, name: &str, bytes: &[u8]) -> Result<(), SimError> {
        self.st().meta.insert(name.into(), bytes.to_vec());
        Ok(())
    }

    fn free_bytes(&mut self) -> Option<u64> {
        let st = self.st();
        st.capacity.map(|c| c.saturating_sub(st.used()))
    }

    fn describe(&self) -> String {
        "simulated flash".into()
    }
}

impl SimSegment {
    fn live(&self) -> Result<MutexGuard<'_, State>, SimError> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.epoch != self.epoch {
            return Err(SimError(ErrorKind::BrokenPipe)); // this process is gone
        }
        Ok(st)
    }
}

impl ErrorType for SimSegment {
    type Error = SimError;
}

impl Read for SimSegment {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SimError> {
        let st = self.live()?;
        let f = st.files.get(&self.id).ok_or(SimError(ErrorKind::NotFound))?;
        let start = (self.pos as usize).min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        drop(st);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for SimSegment {
    fn write(&mut self, buf: &[u8]) -> Result<usize, SimError> {
        let (id, pos) = (self.id, self.pos as usize);
        let mut st = self.live()?;
        let mut n = buf.len();
        if let Some(cap) = st.capacity {
            let room = cap.saturating_sub(st.used()) as usize;
            let grow = (pos + n).saturating_sub(st.files.get(&id).map_or(0, |f| f.data.len()));
            if grow > room {
                n = n.saturating_sub(grow - room);
                if n == 0 {
                    return Err(SimError(ErrorKind::OutOfMemory)); // ENOSPC
                }
            }
        }
        st.bytes_written += n as u64;
        let f = st.files.get_mut(&id).ok_or(SimError(ErrorKind::NotFound))?;
        if f.data.len() < pos + n {
            f.data.resize(pos + n, 0);
        }
        f.data[pos..pos + n].copy_from_slice(&buf[..n]);
        f.synced = f.synced.min(pos);
        drop(st);
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> Result<(), SimError> {
        let id = self.id;
        let mut st = self.live()?;
        st.flushes += 1;
        let f = st.files.get_mut(&id).ok_or(SimError(ErrorKind::NotFound))?;
        f.synced = f.data.len();
        Ok(())
    }
}

impl Seek for SimSegment {
    fn seek(&mut self, pos: SeekFrom) -> Result<u64, SimError> {
        let len = self.size()?;
        let new = match pos {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => len as i128 + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 {
            return Err(SimError(ErrorKind::InvalidInput));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

impl SegmentIo for SimSegment {
    fn truncate(&mut self, len: u64) -> Result<(), SimError> {
        let id = self.id;
        let mut st = self.live()?;
        let f = st.files.get_mut(&id).ok_or(SimError(ErrorKind::NotFound))?;
        f.data.truncate(len as usize);
        // Truncation is durable by contract (set_len + fsync on files).
        f.synced = f.data.len();
        Ok(())
    }

    fn size(&mut self) -> Result<u64, SimError> {
        let id = self.id;
        let st = self.live()?;
        Ok(st.files.get(&id).map_or(0, |f| f.data.len() as u64))
    }
}
