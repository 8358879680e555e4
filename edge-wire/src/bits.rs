//! Bit-level writer and reader (most significant bit first), bounds-checked:
//! reading past the end is an error, never a panic.

#[derive(Debug, Default, Clone)]
pub struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = the last byte is full or none).
    used: u8,
}

impl BitWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bit(&mut self, b: bool) {
        if self.used == 0 {
            self.bytes.push(0);
        }
        if b {
            let last = self.bytes.len() - 1;
            self.bytes[last] |= 0x80 >> self.used;
        }
        self.used = (self.used + 1) % 8;
    }

    /// The low `n` bits of `v`, most significant first (`n` ≤ 64).
    pub fn bits(&mut self, v: u64, n: u8) {
        for i in (0..n).rev() {
            self.bit((v >> i) & 1 == 1);
        }
    }

    /// The bytes, padded with zero bits to a whole byte.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBits;

impl<'a> BitReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, pos: 0 }
    }

    pub fn bit(&mut self) -> Result<bool, OutOfBits> {
        let byte = *self.bytes.get(self.pos / 8).ok_or(OutOfBits)?;
        let b = byte & (0x80 >> (self.pos % 8)) != 0;
        self.pos += 1;
        Ok(b)
    }

    pub fn bits(&mut self, n: u8) -> Result<u64, OutOfBits> {
        if self.pos + n as usize > self.bytes.len() * 8 {
            return Err(OutOfBits);
        }
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 1) | u64::from(self.bit()?);
        }
        Ok(v)
    }

    /// Bits not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let mut w = BitWriter::new();
        w.bit(true);
        w.bits(0b101, 3);
        w.bits(u64::MAX, 64);
        w.bits(0, 0);
        let b = w.finish();
        assert_eq!(b.len(), 9); // 68 bits
        let mut r = BitReader::new(&b);
        assert!(r.bit().unwrap());
        assert_eq!(r.bits(3), Ok(0b101));
        assert_eq!(r.bits(64), Ok(u64::MAX));
        assert_eq!(r.remaining(), 4);
        assert_eq!(r.bits(5), Err(OutOfBits));
    }
}
