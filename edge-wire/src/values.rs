//! Process values (docs/wire-format.md, "Value section"): the registers a
//! PLC served or was written, each sample at its own capture time, carried
//! in the value section of a block's frames next to the window's series.
//!
//! A value travels as the register content itself (the *raw* value: an
//! integer, or the bit pattern of a float), which compresses to a few bits
//! when a sensor is steady or noisy by a few counts; the series' codec
//! (type, scale, offset) travels once per block, and the bridge computes
//! `value = raw-as-type * scale + offset` exactly as the agent would.

use crate::bits::{BitReader, BitWriter};
use crate::SeriesKey;

/// How a tag's registers are read as a number (the raw value's meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValueType {
    Bool = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    U64 = 6,
    I64 = 7,
    F32 = 8,
    F64 = 9,
}

impl ValueType {
    pub const ALL: [ValueType; 9] = [
        ValueType::Bool,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::U64,
        ValueType::I64,
        ValueType::F32,
        ValueType::F64,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<ValueType> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The name in the tag map (`type = "f32"`).
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Bool => "bool",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
        }
    }

    pub fn from_name(name: &str) -> Option<ValueType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// 16-bit registers the type spans (a bool is one coil or input, or
    /// one register that is zero or not).
    pub fn registers(self) -> u16 {
        match self {
            ValueType::Bool | ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
        }
    }

    /// Whether `raw` is a value of this type (see [`ValueType::raw_of_bits`]).
    pub fn valid_raw(self, raw: i64) -> bool {
        match self {
            ValueType::Bool => raw == 0 || raw == 1,
            ValueType::U16 => (0..=0xffff).contains(&raw),
            ValueType::I16 => (i64::from(i16::MIN)..=i64::from(i16::MAX)).contains(&raw),
            ValueType::U32 | ValueType::F32 => (0..=0xffff_ffff).contains(&raw),
            ValueType::I32 => (i64::from(i32::MIN)..=i64::from(i32::MAX)).contains(&raw),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => true,
        }
    }

    /// The raw value of the type's bits (registers put together, most
    /// significant word first, in the low `16 * registers()` bits): the
    /// number itself for integers (u64 as its two's-complement bit
    /// pattern), the IEEE 754 bit pattern for floats.
    pub fn raw_of_bits(self, bits: u64) -> i64 {
        match self {
            ValueType::Bool => i64::from(bits != 0),
            ValueType::U16 => (bits & 0xffff) as i64,
            ValueType::I16 => i64::from(bits as u16 as i16),
            ValueType::U32 | ValueType::F32 => (bits & 0xffff_ffff) as i64,
            ValueType::I32 => i64::from(bits as u32 as i32),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => bits as i64,
        }
    }

    /// The number a raw value stands for.
    pub fn number(self, raw: i64) -> f64 {
        match self {
            ValueType::Bool | ValueType::U16 | ValueType::I16 | ValueType::U32 | ValueType::I32 | ValueType::I64 => {
                raw as f64
            }
            ValueType::U64 => raw as u64 as f64,
            ValueType::F32 => f64::from(f32::from_bits(raw as u32)),
            ValueType::F64 => f64::from_bits(raw as u64),
        }
    }
}

/// How a series' raw values become the values written to the store:
/// `number(raw) * scale + offset` (skipped when scale is 1 and offset 0,
/// so a float's NaN payload and -0.0 stay as they were).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueCodec {
    pub kind: ValueType,
    pub scale: f64,
    pub offset: f64,
}

impl ValueCodec {
    pub fn new(kind: ValueType) -> Self {
        ValueCodec { kind, scale: 1.0, offset: 0.0 }
    }

    pub fn value(&self, raw: i64) -> f64 {
        let n = self.kind.number(raw);
        if self.scale == 1.0 && self.offset == 0.0 {
            n
        } else {
            n * self.scale + self.offset
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.scale.is_finite() || self.scale == 0.0 || !self.offset.is_finite() {
            return Err(format!("scale {} / offset {}: must be finite, scale not 0", self.scale, self.offset));
        }
        Ok(())
    }
}

/// One process value series of a frame: its identity, codec and the
/// samples captured since the previous frame, as (capture time in ms,
/// raw value), times strictly increasing.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueSeries {
    pub key: SeriesKey,
    pub codec: ValueCodec,
    pub samples: Vec<(i64, i64)>,
}

/// Signed integer classes of the value section's bitstream: a unary
/// prefix, then the value in two's complement.
const CLASSES: [(u8, u8); 6] = [(0, 0), (2, 4), (3, 8), (4, 16), (5, 32), (5, 64)];

/// Bits `put_signed` spends on `v`.
pub(crate) fn signed_bits(v: i64) -> u32 {
    if v == 0 {
        return 1;
    }
    for (i, (prefix_len, n)) in CLASSES.iter().enumerate().skip(1) {
        if *n == 64 || (-(1i64 << (n - 1))..(1i64 << (n - 1))).contains(&v) {
            let _ = i;
            return u32::from(*prefix_len) + u32::from(*n);
        }
    }
    69
}

/// Writes `v` in the smallest class that holds it: `0`; `10`+4 bits;
/// `110`+8; `1110`+16; `11110`+32; `11111`+64.
pub(crate) fn put_signed(w: &mut BitWriter, v: i64) {
    if v == 0 {
        w.bit(false);
        return;
    }
    for (i, (prefix_len, n)) in CLASSES.iter().enumerate().skip(1) {
        let fits = *n == 64 || (-(1i64 << (n - 1))..(1i64 << (n - 1))).contains(&v);
        if fits {
            // i ones, then a zero unless this is the last class.
            let ones = i as u8;
            for _ in 0..ones {
                w.bit(true);
            }
            if *prefix_len > ones {
                w.bit(false);
            }
            w.bits(v as u64, *n);
            return;
        }
    }
}

pub(crate) fn get_signed(r: &mut BitReader) -> Result<i64, &'static str> {
    const SHORT: &str = "value section bits end early";
    let mut ones = 0usize;
    while ones < CLASSES.len() - 1 && r.bit().map_err(|_| SHORT)? {
        ones += 1;
    }
    let n = CLASSES[ones].1;
    if n == 0 {
        return Ok(0);
    }
    let v = r.bits(n).map_err(|_| SHORT)?;
    Ok(if n == 64 { v as i64 } else { ((v << (64 - n)) as i64) >> (64 - n) })
}

/// Adaptive Golomb-Rice coding of the changes of one series: the
/// parameter follows a running mean of the recent magnitudes, so a steady
/// register costs about a bit and a float's noisy low bits about their
/// own entropy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Rice {
    /// Running mean of the zigzagged changes, times 16.
    mean: u64,
}

/// Unary quotients up to this are coded; longer ones escape to 64 raw bits.
const RICE_ESCAPE: u64 = 24;

impl Rice {
    fn k(&self) -> u8 {
        let avg = self.mean >> 4;
        (64 - avg.leading_zeros() as u8).saturating_sub(1).min(62)
    }

    fn learn(&mut self, u: u64) {
        self.mean = self.mean - (self.mean >> 3) + (u.min(1 << 58) << 1);
    }

    /// `v` (a change) zigzagged: quotient in unary, then `k` low bits.
    pub(crate) fn put(&mut self, w: &mut BitWriter, v: i64) {
        let u = ((v << 1) ^ (v >> 63)) as u64;
        let k = self.k();
        let q = u >> k;
        if q < RICE_ESCAPE {
            for _ in 0..q {
                w.bit(true);
            }
            w.bit(false);
            w.bits(u, k);
        } else {
            for _ in 0..RICE_ESCAPE {
                w.bit(true);
            }
            w.bits(u, 64);
        }
        self.learn(u);
    }

    pub(crate) fn get(&mut self, r: &mut BitReader) -> Result<i64, &'static str> {
        const SHORT: &str = "value section bits end early";
        let k = self.k();
        let mut q = 0;
        while q < RICE_ESCAPE && r.bit().map_err(|_| SHORT)? {
            q += 1;
        }
        let u =
            if q == RICE_ESCAPE { r.bits(64).map_err(|_| SHORT)? } else { (q << k) | r.bits(k).map_err(|_| SHORT)? };
        self.learn(u);
        Ok((u >> 1) as i64 ^ -((u & 1) as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_classes_round_trip_at_their_edges() {
        let vals = [
            0i64,
            1,
            -1,
            7,
            -8,
            8,
            -9,
            127,
            -128,
            128,
            32767,
            -32768,
            32768,
            i32::MAX as i64,
            i32::MIN as i64,
            1 << 31,
            i64::MAX,
            i64::MIN,
        ];
        let mut w = BitWriter::new();
        for v in vals {
            put_signed(&mut w, v);
        }
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        for v in vals {
            assert_eq!(get_signed(&mut r).unwrap(), v);
        }
        // Sizes: 0 is one bit, ±8 six, ±128 eleven.
        for (v, bits) in [(0i64, 1usize), (-8, 6), (7, 6), (100, 11), (-1000, 20), (1 << 20, 37), (1 << 40, 69)] {
            let mut w = BitWriter::new();
            put_signed(&mut w, v);
            w.bits(0, 1); // mark the end
            assert_eq!(w.finish().len(), (bits + 1).div_ceil(8), "{v}");
        }
    }

    #[test]
    fn rice_round_trips_and_adapts() {
        let vals: Vec<i64> = (0..2000)
            .map(|i| [0, 1, -1, 3, -7, 1000, -100_000, i64::MAX, i64::MIN, 5][i % 10].wrapping_add(i as i64 % 3))
            .collect();
        let mut w = BitWriter::new();
        let mut e = Rice::default();
        for v in &vals {
            e.put(&mut w, *v);
        }
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        let mut d = Rice::default();
        for v in &vals {
            assert_eq!(d.get(&mut r).unwrap(), *v);
        }
        // Small noise: about 4 bits a change once adapted.
        let mut w = BitWriter::new();
        let mut e = Rice::default();
        let mut seed = 1u64;
        for _ in 0..1000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            e.put(&mut w, (seed >> 60) as i64 - 8);
        }
        assert!(w.finish().len() < 700, "noise of ±8 in under 5.6 bits a sample");
    }

    #[test]
    fn raw_values_mean_what_the_type_says() {
        assert_eq!(ValueType::I16.raw_of_bits(0xffff), -1);
        assert_eq!(ValueType::U16.raw_of_bits(0xffff), 65535);
        assert_eq!(ValueType::I32.raw_of_bits(0xffff_fffe), -2);
        assert_eq!(ValueType::U64.number(ValueType::U64.raw_of_bits(u64::MAX)), u64::MAX as f64);
        assert_eq!(ValueType::F32.number(ValueType::F32.raw_of_bits(1.5f32.to_bits() as u64)), 1.5);
        assert_eq!(ValueType::F64.number(ValueType::F64.raw_of_bits((-2.25f64).to_bits())), -2.25);
        assert_eq!(ValueType::Bool.raw_of_bits(0x100), 1);
        let c = ValueCodec { kind: ValueType::I16, scale: 0.1, offset: -40.0 };
        assert_eq!(c.value(-5), -5.0 * 0.1 + -40.0);
        for t in ValueType::ALL {
            assert_eq!(ValueType::from_code(t.code()), Some(t));
            assert_eq!(ValueType::from_name(t.name()), Some(t));
            assert!(t.valid_raw(t.raw_of_bits(u64::MAX)));
        }
        assert!(!ValueType::U16.valid_raw(65536) && !ValueType::Bool.valid_raw(2));
        assert!(ValueCodec { kind: ValueType::U16, scale: 0.0, offset: 0.0 }.validate().is_err());
    }
}
