//! Blocks (batch format version 2): Gorilla-style compression of the
//! windows a device stores and sends. Byte-level specification:
//! docs/wire-format.md. The agent stores one frame per window; a block is a
//! start frame and the continuation frames after it; the same frame bytes
//! travel on the wire.
//!
//! Per frame: one timestamp shared by all series (delta-of-delta), the
//! series first seen in this frame (a dictionary with a string table), then a
//! bitstream with one value code per series present:
//! * integral values (counters, histogram buckets, gauges of whole numbers):
//!   delta-of-delta of the integers, `0` when the rate is steady;
//! * other values: Gorilla XOR against the previous value, `0` when equal.

use crate::bits::{BitReader, BitWriter};
use crate::values::{get_signed, put_signed, signed_bits, Rice, ValueCodec, ValueSeries, ValueType};
use crate::{is_label_name, is_metric_name, Batch, DecodeError, Label, Sample, Series};
use crate::{MAX_LABELS, MAX_LABEL_VALUE, MAX_SAMPLES_PER_SERIES, MAX_SERIES, RESERVED_LABELS};
use std::collections::HashMap;

/// First byte of a frame that starts a block (version 2, kind 1).
pub const FRAME_START: u8 = 0x21;
/// First byte of a frame that continues a block (version 2, kind 2).
pub const FRAME_CONTINUE: u8 = 0x22;
const FLAG_ALL_PRESENT: u8 = 0x01;
/// The frame carries a value section (process values, [`ValueSeries`]).
const FLAG_VALUES: u8 = 0x02;
/// Most frames in one block.
pub const MAX_FRAMES: usize = MAX_SAMPLES_PER_SERIES;
/// Largest integral value coded as an integer (beyond it f64 loses units).
const INT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53

/// A series' identity: metric name and labels (sorted by name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub name: String,
    pub labels: Vec<Label>,
}

impl SeriesKey {
    pub fn new(name: impl Into<String>, labels: Vec<Label>) -> Self {
        SeriesKey { name: name.into(), labels }
    }

    /// The naming rules of docs/wire-format.md.
    pub fn validate(&self) -> Result<(), String> {
        if !is_metric_name(&self.name) {
            return Err(format!("metric name {:?} must match [a-zA-Z_:][a-zA-Z0-9_:]* (≤128 bytes)", self.name));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(format!("{}: {} labels, limit {MAX_LABELS}", self.name, self.labels.len()));
        }
        let mut prev: Option<&str> = None;
        for l in &self.labels {
            if !is_label_name(&l.name) {
                return Err(format!("{}: label name {:?} is not a valid name", self.name, l.name));
            }
            if RESERVED_LABELS.contains(&l.name.as_str()) {
                return Err(format!("{}: label {:?} is reserved for the bridge", self.name, l.name));
            }
            if l.value.is_empty() || l.value.len() > MAX_LABEL_VALUE {
                return Err(format!("{}: label {:?}: value must be 1..={MAX_LABEL_VALUE} bytes", self.name, l.name));
            }
            if prev.is_some_and(|p| p >= l.name.as_str()) {
                return Err(format!("{}: labels must be sorted by name and unique", self.name));
            }
            prev = Some(&l.name);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Int { prev: i64, delta: i64 },
    Float { prev: u64, lead: u8, trail: u8 },
}

fn as_int(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() <= INT_LIMIT && !(v == 0.0 && v.is_sign_negative())).then_some(v as i64)
}

fn first_value(v: f64) -> Value {
    match as_int(v) {
        Some(i) => Value::Int { prev: i, delta: 0 },
        None => Value::Float { prev: v.to_bits(), lead: u8::MAX, trail: 0 },
    }
}

fn put_value(w: &mut BitWriter, state: &mut Value, v: f64) {
    match *state {
        Value::Int { prev, delta } => match as_int(v) {
            Some(i) => {
                let d = i - prev;
                let dod = d.wrapping_sub(delta);
                if dod == 0 {
                    w.bit(false);
                } else if (-64..64).contains(&dod) {
                    w.bits(0b10, 2);
                    w.bits(dod as u64, 7);
                } else if (-2048..2048).contains(&dod) {
                    w.bits(0b110, 3);
                    w.bits(dod as u64, 12);
                } else if (-(1 << 19)..(1 << 19)).contains(&dod) {
                    w.bits(0b1110, 4);
                    w.bits(dod as u64, 20);
                } else {
                    w.bits(0b11110, 5);
                    w.bits(dod as u64, 64);
                }
                *state = Value::Int { prev: i, delta: d };
            }
            None => {
                w.bits(0b11111, 5);
                w.bits(v.to_bits(), 64);
                *state = Value::Float { prev: v.to_bits(), lead: u8::MAX, trail: 0 };
            }
        },
        Value::Float { prev, lead, trail } => {
            let bits = v.to_bits();
            let x = bits ^ prev;
            if x == 0 {
                w.bit(false);
                return;
            }
            let l = (x.leading_zeros() as u8).min(31);
            let t = x.trailing_zeros() as u8;
            if lead != u8::MAX && l >= lead && t >= trail {
                w.bits(0b10, 2);
                w.bits(x >> trail, 64 - lead - trail);
                *state = Value::Float { prev: bits, lead, trail };
            } else {
                let len = 64 - l - t;
                w.bits(0b11, 2);
                w.bits(u64::from(l), 5);
                w.bits(u64::from(len - 1), 6);
                w.bits(x >> t, len);
                *state = Value::Float { prev: bits, lead: l, trail: t };
            }
        }
    }
}

fn sign_extend(v: u64, n: u8) -> i64 {
    let shift = 64 - n;
    ((v << shift) as i64) >> shift
}

fn get_value(r: &mut BitReader, state: &mut Value) -> Result<f64, &'static str> {
    const SHORT: &str = "value bits end early";
    match *state {
        Value::Int { prev, delta } => {
            let mut prefix = 0;
            while prefix < 5 && r.bit().map_err(|_| SHORT)? {
                prefix += 1;
            }
            let dod = match prefix {
                0 => 0,
                1 => sign_extend(r.bits(7).map_err(|_| SHORT)?, 7),
                2 => sign_extend(r.bits(12).map_err(|_| SHORT)?, 12),
                3 => sign_extend(r.bits(20).map_err(|_| SHORT)?, 20),
                4 => r.bits(64).map_err(|_| SHORT)? as i64,
                _ => {
                    let bits = r.bits(64).map_err(|_| SHORT)?;
                    *state = Value::Float { prev: bits, lead: u8::MAX, trail: 0 };
                    return Ok(f64::from_bits(bits));
                }
            };
            let d = delta.wrapping_add(dod);
            let i = prev.wrapping_add(d);
            if (i as f64).abs() > INT_LIMIT {
                return Err("integer value out of range");
            }
            *state = Value::Int { prev: i, delta: d };
            Ok(i as f64)
        }
        Value::Float { prev, lead, trail } => {
            if !r.bit().map_err(|_| SHORT)? {
                return Ok(f64::from_bits(prev));
            }
            let (x, lead, trail) = if !r.bit().map_err(|_| SHORT)? {
                if lead == u8::MAX {
                    return Err("value reuses a window that was never set");
                }
                (r.bits(64 - lead - trail).map_err(|_| SHORT)? << trail, lead, trail)
            } else {
                let l = r.bits(5).map_err(|_| SHORT)? as u8;
                let len = r.bits(6).map_err(|_| SHORT)? as u8 + 1;
                if l + len > 64 {
                    return Err("value window wider than 64 bits");
                }
                let t = 64 - l - len;
                (r.bits(len).map_err(|_| SHORT)? << t, l, t)
            };
            let bits = prev ^ x;
            *state = Value::Float { prev: bits, lead, trail };
            Ok(f64::from_bits(bits))
        }
    }
}

// LEB128 varints and zigzag, as postcard writes them.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, &'static str> {
        let v = *self.b.get(self.pos).ok_or("frame ends early")?;
        self.pos += 1;
        Ok(v)
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            if shift == 63 && byte > 1 {
                return Err("varint overflows 64 bits");
            }
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len()).ok_or("frame ends early")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("invalid series: {0}")]
    Invalid(String),
    #[error("series {0} appears twice in one window")]
    Duplicate(String),
    #[error("window time {ts} is not after the previous window's {prev}")]
    TimeOrder { ts: i64, prev: i64 },
    #[error("a block holds at most {MAX_SERIES} series and {MAX_FRAMES} frames; start a new block")]
    Full,
    #[error("value series {name}: {reason}")]
    Value { name: String, reason: String },
}

/// A value series' state within a block (encoder and decoder alike).
#[derive(Debug, Clone, Copy)]
struct ValueState {
    codec: ValueCodec,
    prev_ts: i64,
    prev_raw: i64,
    samples: usize,
    rice: Rice,
}

impl ValueState {
    fn new(codec: ValueCodec) -> Self {
        ValueState { codec, prev_ts: i64::MIN, prev_raw: 0, samples: 0, rice: Rice::default() }
    }
}

/// Encodes the frames of one block. Start a new encoder for every block.
#[derive(Debug, Default)]
pub struct BlockEncoder {
    index: HashMap<SeriesKey, usize>,
    values: Vec<Value>,
    strings: HashMap<String, u64>,
    prev_ts: i64,
    prev_delta: i64,
    frames: usize,
    value_index: HashMap<SeriesKey, usize>,
    value_states: Vec<ValueState>,
    time_state: TimeState,
}

impl BlockEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames encoded so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn series(&self) -> usize {
        self.values.len() + self.value_states.len()
    }

    /// The frame for the window at `ts`: the first one is a start frame.
    pub fn frame(&mut self, ts: i64, samples: &[(SeriesKey, f64)]) -> Result<Vec<u8>, EncodeError> {
        self.frame_with_values(ts, samples, &[])
    }

    /// The frame for the window at `ts` with the process values captured
    /// since the previous frame (series with no sample are left out).
    /// Nothing changes in the encoder when it fails.
    pub fn frame_with_values(
        &mut self,
        ts: i64,
        samples: &[(SeriesKey, f64)],
        values: &[ValueSeries],
    ) -> Result<Vec<u8>, EncodeError> {
        if self.frames > 0 && ts <= self.prev_ts {
            return Err(EncodeError::TimeOrder { ts, prev: self.prev_ts });
        }
        if self.frames >= MAX_FRAMES {
            return Err(EncodeError::Full);
        }
        // Which series are new, and each sample's slot.
        let mut slots: Vec<(usize, f64)> = Vec::with_capacity(samples.len());
        let mut new: Vec<&SeriesKey> = Vec::new();
        let mut seen = vec![false; self.values.len()];
        for (key, v) in samples {
            match self.index.get(key) {
                Some(&i) => {
                    if std::mem::replace(&mut seen[i], true) {
                        return Err(EncodeError::Duplicate(key.name.clone()));
                    }
                    slots.push((i, *v));
                }
                None => {
                    key.validate().map_err(EncodeError::Invalid)?;
                    if new.contains(&key) {
                        return Err(EncodeError::Duplicate(key.name.clone()));
                    }
                    slots.push((self.values.len() + new.len(), *v));
                    new.push(key);
                }
            }
        }
        // The value series: their slots, the new ones, and every sample
        // checked before anything is written.
        let mut value_slots: Vec<(usize, &ValueSeries)> = Vec::new();
        let mut new_values: Vec<&ValueSeries> = Vec::new();
        for vs in values.iter().filter(|v| !v.samples.is_empty()) {
            let name = || vs.key.name.clone();
            let slot = match self.value_index.get(&vs.key) {
                Some(&i) => {
                    if self.value_states[i].codec != vs.codec {
                        return Err(EncodeError::Value { name: name(), reason: "codec changed within a block".into() });
                    }
                    i
                }
                None => {
                    vs.key.validate().map_err(EncodeError::Invalid)?;
                    vs.codec.validate().map_err(|reason| EncodeError::Value { name: name(), reason })?;
                    if self.index.contains_key(&vs.key)
                        || new.contains(&&vs.key)
                        || new_values.iter().any(|v| v.key == vs.key)
                    {
                        return Err(EncodeError::Duplicate(name()));
                    }
                    new_values.push(vs);
                    self.value_states.len() + new_values.len() - 1
                }
            };
            if value_slots.iter().any(|(s, _)| *s == slot) {
                return Err(EncodeError::Duplicate(name()));
            }
            let (mut prev, had) = match self.value_states.get(slot) {
                Some(st) => (st.prev_ts, st.samples),
                None => (i64::MIN, 0),
            };
            if had + vs.samples.len() > MAX_SAMPLES_PER_SERIES {
                return Err(EncodeError::Full);
            }
            for (t, raw) in &vs.samples {
                if *t <= prev {
                    return Err(EncodeError::Value {
                        name: name(),
                        reason: format!("sample time {t} not after {prev}"),
                    });
                }
                if !vs.codec.kind.valid_raw(*raw) {
                    return Err(EncodeError::Value {
                        name: name(),
                        reason: format!("raw value {raw} is not a {}", vs.codec.kind.name()),
                    });
                }
                prev = *t;
            }
            value_slots.push((slot, vs));
        }
        if self.values.len() + new.len() + self.value_states.len() + new_values.len() > MAX_SERIES {
            return Err(EncodeError::Full);
        }
        for (key, _) in samples {
            if self.value_index.contains_key(key) || new_values.iter().any(|v| &v.key == key) {
                return Err(EncodeError::Duplicate(key.name.clone()));
            }
        }
        value_slots.sort_unstable_by_key(|s| s.0);
        // The frame's time table: every distinct sample time, in order.
        let mut times: Vec<i64> = value_slots.iter().flat_map(|(_, vs)| vs.samples.iter().map(|s| s.0)).collect();
        times.sort_unstable();
        times.dedup();
        let all_present = seen.iter().all(|s| *s);

        let mut out = Vec::with_capacity(16 + new.len() * 24 + samples.len() / 2);
        out.push(if self.frames == 0 { FRAME_START } else { FRAME_CONTINUE });
        let values_flag = if value_slots.is_empty() { 0 } else { FLAG_VALUES };
        out.push(if all_present { FLAG_ALL_PRESENT } else { 0 } | values_flag);
        if self.frames == 0 {
            put_varint(&mut out, zigzag(ts));
            self.prev_delta = 0;
        } else {
            let d = ts - self.prev_ts;
            put_varint(&mut out, zigzag(d.wrapping_sub(self.prev_delta)));
            self.prev_delta = d;
        }
        self.prev_ts = ts;
        put_varint(&mut out, new.len() as u64);
        for key in &new {
            self.put_str(&mut out, &key.name);
            put_varint(&mut out, key.labels.len() as u64);
            for l in &key.labels {
                self.put_str(&mut out, &l.name);
                self.put_str(&mut out, &l.value);
            }
        }
        if !value_slots.is_empty() {
            put_varint(&mut out, new_values.len() as u64);
            for vs in &new_values {
                self.put_str(&mut out, &vs.key.name);
                put_varint(&mut out, vs.key.labels.len() as u64);
                for l in &vs.key.labels {
                    self.put_str(&mut out, &l.name);
                    self.put_str(&mut out, &l.value);
                }
                out.push(vs.codec.kind.code());
                out.extend_from_slice(&vs.codec.scale.to_le_bytes());
                out.extend_from_slice(&vs.codec.offset.to_le_bytes());
            }
            put_varint(&mut out, value_slots.len() as u64);
            for (slot, vs) in &value_slots {
                put_varint(&mut out, *slot as u64);
                put_varint(&mut out, vs.samples.len() as u64);
            }
            put_varint(&mut out, times.len() as u64);
        }
        let old = self.values.len();
        for key in new {
            self.index.insert(key.clone(), self.index.len());
        }
        for vs in new_values {
            self.value_index.insert(vs.key.clone(), self.value_states.len());
            self.value_states.push(ValueState::new(vs.codec));
        }
        let mut bits = BitWriter::new();
        if !all_present {
            for s in &seen {
                bits.bit(*s);
            }
        }
        // Values in slot order: old series first, then new ones in order.
        slots.sort_unstable_by_key(|s| s.0);
        for (slot, v) in slots {
            if slot < old {
                put_value(&mut bits, &mut self.values[slot], v);
            } else {
                bits.bits(v.to_bits(), 64);
                self.values.push(first_value(v));
            }
        }
        if !times.is_empty() {
            put_times(&mut bits, &mut self.time_state, ts, &times);
        }
        for (slot, vs) in value_slots {
            put_value_samples(&mut bits, &mut self.value_states[slot], &times, &vs.samples);
        }
        out.extend_from_slice(&bits.finish());
        self.frames += 1;
        Ok(out)
    }

    fn put_str(&mut self, out: &mut Vec<u8>, s: &str) {
        if let Some(&i) = self.strings.get(s) {
            put_varint(out, i + 1);
        } else {
            put_varint(out, 0);
            put_varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
            let n = self.strings.len() as u64;
            self.strings.insert(s.to_owned(), n);
        }
    }
}

/// Where the block's time tables left off: the last time and the last
/// delta between two times (0 when the table had one time and none came
/// before).
#[derive(Debug, Clone, Copy, Default)]
struct TimeState {
    last: Option<(i64, i64)>,
}

/// The codes of a time table under one mode: 0 deltas `s(t - t_prev - 1)`,
/// 1 delta-of-delta `s((t - t_prev) - d_prev)`. The first time is
/// relative to where the block's previous table ended, or to the frame's
/// time in the block's first table.
fn time_codes(st: TimeState, frame_ts: i64, times: &[i64], dod: bool) -> (Vec<i64>, TimeState) {
    let mut codes = Vec::with_capacity(times.len());
    let mut prev = st.last;
    for &t in times {
        let code = match prev {
            None => t.wrapping_sub(frame_ts),
            Some((p, d)) => {
                let delta = t.wrapping_sub(p);
                if dod {
                    delta.wrapping_sub(d)
                } else {
                    delta.wrapping_sub(1)
                }
            }
        };
        codes.push(code);
        let d = prev.map_or(0, |(p, _)| t.wrapping_sub(p));
        prev = Some((t, d));
    }
    (codes, TimeState { last: prev })
}

/// The frame's time table (strictly increasing): a mode bit, then one code
/// per time, in whichever mode is shorter.
fn put_times(w: &mut BitWriter, st: &mut TimeState, frame_ts: i64, times: &[i64]) {
    let (delta, next) = time_codes(*st, frame_ts, times, false);
    let (dod, _) = time_codes(*st, frame_ts, times, true);
    let size = |c: &[i64]| c.iter().map(|v| signed_bits(*v)).sum::<u32>();
    let use_dod = size(&dod) < size(&delta);
    w.bit(use_dod);
    for c in if use_dod { &dod } else { &delta } {
        put_signed(w, *c);
    }
    *st = next;
}

fn get_times(r: &mut BitReader, st: &mut TimeState, frame_ts: i64, n: usize) -> Result<Vec<i64>, &'static str> {
    const SHORT: &str = "value section bits end early";
    let dod = r.bit().map_err(|_| SHORT)?;
    let mut out: Vec<i64> = Vec::with_capacity(n.min(4096));
    let mut prev = st.last;
    for _ in 0..n {
        let code = get_signed(r)?;
        let t = match prev {
            None => frame_ts.checked_add(code),
            Some((p, d)) => {
                let delta = if dod { d.checked_add(code) } else { code.checked_add(1) };
                delta.and_then(|delta| p.checked_add(delta))
            }
        }
        .ok_or("sample time overflows")?;
        if out.last().is_some_and(|l| t <= *l) {
            return Err("time table not increasing");
        }
        let d = prev.map_or(0, |(p, _)| t.wrapping_sub(p));
        prev = Some((t, d));
        out.push(t);
    }
    st.last = prev;
    Ok(out)
}

/// A value series' samples of one frame: per sample its place in the time
/// table (the first as `s(index)`, later ones as the change of the step
/// `s(step - previous step)`: 1 bit for a series read in every poll,
/// whatever else the poll reads), then the value: the
/// block's first as 64 raw bits, later ones as the change from the
/// previous in adaptive Rice code (sensor noise makes the change small,
/// not steady).
fn put_value_samples(w: &mut BitWriter, st: &mut ValueState, times: &[i64], samples: &[(i64, i64)]) {
    let (mut prev_idx, mut prev_step) = (-1i64, 1i64);
    for (i, &(t, raw)) in samples.iter().enumerate() {
        let idx = times.partition_point(|x| *x < t) as i64;
        let step = idx - prev_idx;
        put_signed(w, if i == 0 { idx } else { step - prev_step });
        (prev_idx, prev_step) = (idx, step);
        if st.samples == 0 {
            w.bits(raw as u64, 64);
        } else {
            st.rice.put(w, raw.wrapping_sub(st.prev_raw));
        }
        st.prev_ts = t;
        st.prev_raw = raw;
        st.samples += 1;
    }
}

fn get_value_samples(
    r: &mut BitReader,
    st: &mut ValueState,
    times: &[i64],
    n: usize,
    out: &mut Vec<Sample>,
) -> Result<(), &'static str> {
    let (mut prev_idx, mut prev_step) = (-1i64, 1i64);
    for i in 0..n {
        let code = get_signed(r)?;
        let step =
            if i == 0 { code.checked_add(1) } else { prev_step.checked_add(code) }.ok_or("time index overflows")?;
        let idx = prev_idx.checked_add(step).ok_or("time index overflows")?;
        if step < 1 || idx < 0 || idx as usize >= times.len() {
            return Err("time index out of the frame's table");
        }
        (prev_idx, prev_step) = (idx, step);
        let t = times[idx as usize];
        if t <= st.prev_ts {
            return Err("sample times must strictly increase");
        }
        let raw = if st.samples == 0 {
            r.bits(64).map_err(|_| "value section bits end early")? as i64
        } else {
            st.prev_raw.wrapping_add(st.rice.get(r)?)
        };
        if !st.codec.kind.valid_raw(raw) {
            return Err("raw value out of its type's range");
        }
        st.prev_ts = t;
        st.prev_raw = raw;
        st.samples += 1;
        out.push(Sample { timestamp_ms: t, value: st.codec.value(raw) });
    }
    Ok(())
}

/// Decodes the frames of one block into series with their samples.
#[derive(Debug, Default)]
pub struct BlockDecoder {
    series: Vec<Series>,
    values: Vec<Value>,
    strings: Vec<String>,
    prev_ts: i64,
    prev_delta: i64,
    frames: usize,
    /// The keys defined so far, by a hash (seeded at random: a sender
    /// cannot aim at collisions); a hash seen before is checked against
    /// the series themselves. Not the keys: cloning and SipHashing every
    /// key was a third of the bridge's decoding of one-window blocks.
    keys: std::collections::HashSet<u64, foldhash::fast::FixedState>,
    key_hasher: foldhash::fast::RandomState,
    value_series: Vec<Series>,
    value_states: Vec<ValueState>,
    time_state: TimeState,
}

fn bad(reason: &'static str) -> DecodeError {
    DecodeError::Malformed { what: "frame", reason: reason.into() }
}

impl BlockDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn frame(&mut self, frame: &[u8]) -> Result<(), DecodeError> {
        let mut c = Cursor { b: frame, pos: 0 };
        let kind = c.byte().map_err(bad)?;
        match (kind, self.frames) {
            (FRAME_START, 0) | (FRAME_CONTINUE, 1..) => {}
            (FRAME_START, _) => return Err(bad("a start frame inside a block")),
            (FRAME_CONTINUE, 0) => return Err(bad("a block must begin with a start frame")),
            (found, _) => return Err(DecodeError::Version { what: "frame", found, supported: FRAME_START }),
        }
        if self.frames >= MAX_FRAMES {
            return Err(DecodeError::Invalid(format!("more than {MAX_FRAMES} frames in a block")));
        }
        let flags = c.byte().map_err(bad)?;
        if flags & !(FLAG_ALL_PRESENT | FLAG_VALUES) != 0 {
            return Err(bad("unknown frame flags"));
        }
        let raw_ts = unzigzag(c.varint().map_err(bad)?);
        let ts = if self.frames == 0 {
            self.prev_delta = 0;
            raw_ts
        } else {
            let d = self.prev_delta.checked_add(raw_ts).ok_or_else(|| bad("timestamp overflow"))?;
            if d <= 0 {
                return Err(DecodeError::Invalid("window times must strictly increase".into()));
            }
            self.prev_delta = d;
            self.prev_ts.checked_add(d).ok_or_else(|| bad("timestamp overflow"))?
        };
        self.prev_ts = ts;
        let new = c.varint().map_err(bad)? as usize;
        if self.series.len().saturating_add(new) > MAX_SERIES {
            return Err(DecodeError::Invalid(format!("more than {MAX_SERIES} series in a block")));
        }
        let old = self.series.len();
        for _ in 0..new {
            let key = self.get_key(&mut c)?;
            self.series.push(Series { name: key.name, labels: key.labels, samples: Vec::new() });
        }
        // The value section's header: new value series, then which carry
        // how many samples.
        let mut value_counts: Vec<(usize, usize)> = Vec::new();
        let mut time_count = 0;
        if flags & FLAG_VALUES != 0 {
            let new = c.varint().map_err(bad)? as usize;
            if self.series.len() + self.value_series.len() + new > MAX_SERIES {
                return Err(DecodeError::Invalid(format!("more than {MAX_SERIES} series in a block")));
            }
            for _ in 0..new {
                let key = self.get_key(&mut c)?;
                let code = c.byte().map_err(bad)?;
                let kind = ValueType::from_code(code)
                    .ok_or_else(|| DecodeError::Invalid(format!("{}: unknown value type {code}", key.name)))?;
                let mut f = [0u8; 8];
                f.copy_from_slice(c.bytes(8).map_err(bad)?);
                let scale = f64::from_le_bytes(f);
                f.copy_from_slice(c.bytes(8).map_err(bad)?);
                let offset = f64::from_le_bytes(f);
                let codec = ValueCodec { kind, scale, offset };
                codec.validate().map_err(|e| DecodeError::Invalid(format!("{}: {e}", key.name)))?;
                self.value_series.push(Series { name: key.name, labels: key.labels, samples: Vec::new() });
                self.value_states.push(ValueState::new(codec));
            }
            let present = c.varint().map_err(bad)? as usize;
            if present == 0 || present > self.value_series.len() {
                return Err(bad("value section names no series or more than exist"));
            }
            for _ in 0..present {
                let slot = c.varint().map_err(bad)? as usize;
                if slot >= self.value_series.len() || value_counts.last().is_some_and(|(s, _)| *s >= slot) {
                    return Err(bad("value series out of range or out of order"));
                }
                let n = c.varint().map_err(bad)? as usize;
                if n == 0 || self.value_states[slot].samples + n > MAX_SAMPLES_PER_SERIES {
                    return Err(DecodeError::Invalid(format!(
                        "value series {}: 0 or more than {MAX_SAMPLES_PER_SERIES} samples",
                        self.value_series[slot].name
                    )));
                }
                value_counts.push((slot, n));
            }
            let t = c.varint().map_err(bad)? as usize;
            let total: usize = value_counts.iter().map(|(_, n)| n).sum();
            if t == 0 || t > total {
                return Err(bad("time table empty or longer than the samples"));
            }
            time_count = t;
        }
        let mut r = BitReader::new(&frame[c.pos..]);
        let present: Vec<bool> = if flags & FLAG_ALL_PRESENT != 0 {
            vec![true; old]
        } else {
            (0..old).map(|_| r.bit().map_err(|_| bad("presence bits end early"))).collect::<Result<_, _>>()?
        };
        for (i, p) in present.iter().enumerate() {
            if *p {
                let v = get_value(&mut r, &mut self.values[i]).map_err(bad)?;
                self.series[i].samples.push(Sample { timestamp_ms: ts, value: v });
            }
        }
        for i in old..self.series.len() {
            let v = f64::from_bits(r.bits(64).map_err(|_| bad("value bits end early"))?);
            self.values.push(first_value(v));
            self.series[i].samples.push(Sample { timestamp_ms: ts, value: v });
        }
        let times = if time_count > 0 {
            get_times(&mut r, &mut self.time_state, ts, time_count).map_err(bad)?
        } else {
            Vec::new()
        };
        for (slot, n) in value_counts {
            let series = &mut self.value_series[slot];
            get_value_samples(&mut r, &mut self.value_states[slot], &times, n, &mut series.samples)
                .map_err(|e| DecodeError::Invalid(format!("value series {}: {e}", series.name)))?;
        }
        if r.remaining() >= 8 {
            return Err(DecodeError::Trailing(r.remaining() / 8, "frame"));
        }
        self.frames += 1;
        Ok(())
    }

    /// A new series' name and labels, checked, and not defined before.
    fn get_key(&mut self, c: &mut Cursor) -> Result<SeriesKey, DecodeError> {
        let name = self.get_str(c)?;
        let n = c.varint().map_err(bad)? as usize;
        if n > MAX_LABELS {
            return Err(DecodeError::Invalid(format!("{name}: more than {MAX_LABELS} labels")));
        }
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.get_str(c)?;
            let v = self.get_str(c)?;
            labels.push(Label { name: k, value: v });
        }
        let key = SeriesKey { name, labels };
        key.validate().map_err(DecodeError::Invalid)?;
        use std::hash::BuildHasher;
        if !self.keys.insert(self.key_hasher.hash_one(&key))
            && self.series.iter().chain(&self.value_series).any(|s| s.name == key.name && s.labels == key.labels)
        {
            return Err(DecodeError::Invalid(format!("series {} defined twice", key.name)));
        }
        Ok(key)
    }

    fn get_str(&mut self, c: &mut Cursor) -> Result<String, DecodeError> {
        let tag = c.varint().map_err(bad)?;
        if tag > 0 {
            return self.strings.get(tag as usize - 1).cloned().ok_or_else(|| bad("string reference out of range"));
        }
        let len = c.varint().map_err(bad)? as usize;
        if len > MAX_LABEL_VALUE {
            return Err(bad("string too long"));
        }
        let s = std::str::from_utf8(c.bytes(len).map_err(bad)?).map_err(|_| bad("string is not UTF-8"))?;
        self.strings.push(s.to_owned());
        Ok(s.to_owned())
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The series decoded so far, each with its samples in time order:
    /// the windows' series, then the process value series.
    pub fn finish(mut self) -> Batch {
        self.series.append(&mut self.value_series);
        Batch { series: self.series }
    }
}

/// Decodes a whole block from its frames.
pub fn decode_block<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Result<Batch, DecodeError> {
    let mut d = BlockDecoder::new();
    for f in frames {
        d.frame(f)?;
    }
    if d.frames() == 0 {
        return Err(DecodeError::Empty);
    }
    Ok(d.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, l: &[(&str, &str)]) -> SeriesKey {
        SeriesKey::new(name, l.iter().map(|(k, v)| Label::new(*k, *v)).collect())
    }

    fn round_trip(windows: &[(i64, Vec<(SeriesKey, f64)>)]) -> (Batch, usize) {
        let mut e = BlockEncoder::new();
        let frames: Vec<Vec<u8>> = windows.iter().map(|(ts, s)| e.frame(*ts, s).unwrap()).collect();
        let bytes = frames.iter().map(Vec::len).sum();
        (decode_block(frames.iter().map(Vec::as_slice)).unwrap(), bytes)
    }

    #[test]
    fn a_series_defined_twice_in_a_block_is_refused() {
        // Two series whose names differ in their last byte only; the
        // second renamed to the first in the frame's bytes.
        let samples = [(key("sensor_a", &[("k", "v")]), 1.0), (key("sensor_b", &[("k", "w")]), 2.0)];
        let mut e = BlockEncoder::new();
        let first = e.frame(1_000, &samples).unwrap();
        let mut frame = first.clone();
        let at = frame.windows(8).position(|w| w == b"sensor_b").unwrap();
        frame[at + 7] = b'a';
        assert!(decode_block([first.as_slice()]).is_ok());
        // Same name, other labels: two series.
        assert!(decode_block([frame.as_slice()]).is_ok());
        let v = frame.windows(1).rposition(|w| w == b"w").unwrap();
        frame[v] = b'v';
        let err = decode_block([frame.as_slice()]).unwrap_err().to_string();
        assert!(err.contains("sensor_a defined twice"), "{err}");
        // In a later frame of the same block, too.
        let mut e = BlockEncoder::new();
        let one = e.frame(1_000, &samples[..1]).unwrap();
        let mut again = BlockEncoder::new().frame(2_000, &samples[..1]).unwrap();
        again[0] = FRAME_CONTINUE;
        let err = decode_block([one.as_slice(), again.as_slice()]).unwrap_err().to_string();
        assert!(err.contains("defined twice"), "{err}");
    }

    #[test]
    fn every_kind_of_value_comes_back_exactly() {
        let a = key("c_total", &[("k", "v")]);
        let b = key("g", &[]);
        let values = [
            0.0,
            1.0,
            2.0,
            3.0,
            3.0,
            1e6,
            -5.0,
            2f64.powi(53),
            0.5,
            f64::NAN,
            f64::INFINITY,
            -0.0,
            1e-300,
            7.0,
            f64::NEG_INFINITY,
            9_007_199_254_740_993.0,
            42.0,
            -1e18,
        ];
        let windows: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (1_700_000_000_000 + i as i64 * 10_000 + (i as i64 % 3), vec![(a.clone(), *v), (b.clone(), -*v)])
            })
            .collect();
        let (batch, _) = round_trip(&windows);
        assert_eq!(batch.series.len(), 2);
        for (s, negate) in batch.series.iter().zip([false, true]) {
            assert_eq!(s.samples.len(), values.len());
            for (i, (p, v)) in s.samples.iter().zip(values).enumerate() {
                assert_eq!(p.timestamp_ms, windows[i].0);
                let want = if negate { -v } else { v };
                assert_eq!(p.value.to_bits(), want.to_bits(), "sample {i} of {}", s.name);
            }
        }
    }

    #[test]
    fn steady_counters_cost_one_bit_and_constant_floats_too() {
        let keys: Vec<SeriesKey> = (0..100).map(|i| key("x_total", &[("i", &i.to_string())])).collect();
        let mut e = BlockEncoder::new();
        let mut sizes = vec![];
        for w in 0..10i64 {
            let s: Vec<_> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), (i as i64 * w) as f64 + 0.5 * (i % 2) as f64 * 0.0))
                .collect();
            sizes.push(e.frame(w * 10_000, &s).unwrap().len());
        }
        // 100 series: 2 header bytes + 1 timestamp byte + 1 new-series byte + 100 bits.
        assert_eq!(sizes[5], 4 + 13, "{sizes:?}");
    }

    #[test]
    fn series_can_appear_and_be_missing() {
        let (a, b) = (key("a", &[]), key("b", &[]));
        let (batch, _) = round_trip(&[
            (10, vec![(a.clone(), 1.0)]),
            (20, vec![(a.clone(), 2.0), (b.clone(), 5.5)]),
            (30, vec![(b.clone(), 6.5)]),
            (40, vec![(b.clone(), 7.5), (a.clone(), 4.0)]),
        ]);
        assert_eq!(
            batch.series[0].samples.iter().map(|s| (s.timestamp_ms, s.value)).collect::<Vec<_>>(),
            [(10, 1.0), (20, 2.0), (40, 4.0)]
        );
        assert_eq!(batch.series[1].samples.len(), 3);
    }

    #[test]
    fn encoder_refuses_bad_input() {
        let mut e = BlockEncoder::new();
        assert!(matches!(e.frame(1, &[(key("bad name", &[]), 1.0)]), Err(EncodeError::Invalid(_))));
        assert!(matches!(e.frame(1, &[(key("m", &[("device", "x")]), 1.0)]), Err(EncodeError::Invalid(_))));
        let k = key("m", &[]);
        assert!(matches!(e.frame(1, &[(k.clone(), 1.0), (k.clone(), 2.0)]), Err(EncodeError::Duplicate(_))));
        e.frame(5, &[(k.clone(), 1.0)]).unwrap();
        assert_eq!(e.frame(5, &[(k, 1.0)]), Err(EncodeError::TimeOrder { ts: 5, prev: 5 }));
    }

    #[test]
    fn decoder_never_panics_on_truncation_or_flips() {
        let k = key("m_total", &[("a", "b")]);
        let mut e = BlockEncoder::new();
        let frames: Vec<Vec<u8>> =
            (0..5).map(|w| e.frame(w * 1000, &[(k.clone(), (w * w) as f64 * 1.5)]).unwrap()).collect();
        for f in 0..frames.len() {
            for cut in 0..frames[f].len() {
                let mut fs = frames.clone();
                fs[f].truncate(cut);
                let _ = decode_block(fs.iter().map(Vec::as_slice));
            }
            for byte in 0..frames[f].len() {
                for bit in 0..8 {
                    let mut fs = frames.clone();
                    fs[f][byte] ^= 1 << bit;
                    let _ = decode_block(fs.iter().map(Vec::as_slice));
                }
            }
        }
        assert!(decode_block(frames[1..].iter().map(Vec::as_slice)).is_err(), "continuation first");
    }

    fn value_series(tag: &str, kind: ValueType, samples: Vec<(i64, i64)>) -> ValueSeries {
        ValueSeries {
            key: key("edge_process_value", &[("tag", tag), ("unit", "bar")]),
            codec: ValueCodec { kind, scale: 0.01, offset: -1.0 },
            samples,
        }
    }

    #[test]
    fn process_values_come_back_at_their_own_times() {
        let w = key("w_total", &[]);
        let mut e = BlockEncoder::new();
        let mut frames = vec![];
        let mut want: Vec<Vec<(i64, f64)>> = vec![vec![]; ValueType::ALL.len()];
        let mut t = 1_700_000_000_000i64;
        for f in 0..4i64 {
            let mut vs = vec![];
            for (k, kind) in ValueType::ALL.into_iter().enumerate() {
                let mut samples = vec![];
                for i in 0..(3 + k as i64) {
                    let bits = (f * 977 + i * 31 + k as i64).wrapping_mul(0x9e37_79b9_7f4a_7c15u64 as i64) as u64;
                    let raw = kind.raw_of_bits(bits);
                    samples.push((t + i * 97 + k as i64, raw));
                }
                let s = value_series(&format!("t{k}"), kind, samples);
                want[k].extend(s.samples.iter().map(|(t, r)| (*t, s.codec.value(*r))));
                // Series 0 is missing from frame 2.
                if !(k == 0 && f == 2) {
                    vs.push(s);
                } else {
                    let keep = want[k].len() - (3 + k);
                    want[k].truncate(keep);
                }
            }
            t += 10_000;
            frames.push(e.frame_with_values(t, &[(w.clone(), f as f64)], &vs).unwrap());
        }
        let batch = decode_block(frames.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(batch.series.len(), 1 + ValueType::ALL.len());
        assert_eq!(batch.series[0].samples.len(), 4);
        for (k, s) in batch.series[1..].iter().enumerate() {
            assert_eq!(s.labels[0].value, format!("t{k}"));
            let got: Vec<(i64, u64)> = s.samples.iter().map(|p| (p.timestamp_ms, p.value.to_bits())).collect();
            let want: Vec<(i64, u64)> = want[k].iter().map(|(t, v)| (*t, v.to_bits())).collect();
            assert_eq!(got, want, "{}", ValueType::ALL[k].name());
        }
    }

    #[test]
    fn a_noisy_register_polled_steadily_costs_under_two_bytes_per_sample() {
        // 1 Hz polling with a few ms of jitter, a 16-bit reading wandering
        // by a few counts: the goal is at most 2 B per sample.
        let mut e = BlockEncoder::new();
        let mut seed = 7u64;
        let mut rnd = move |n: i64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as i64 % (2 * n + 1) - n
        };
        let (mut bytes, mut samples, mut t, mut raw) = (0usize, 0usize, 1_000_000i64, 20_000i64);
        let empty = e.frame_with_values(1, &[], &[]).unwrap().len();
        for f in 0..60 {
            let mut s = vec![];
            for _ in 0..10 {
                t += 1000 + rnd(3);
                raw = (raw + rnd(4)).clamp(0, 65535);
                s.push((t, raw));
            }
            let frame = e.frame_with_values(2 + f, &[], &[value_series("p", ValueType::U16, s)]).unwrap();
            bytes += frame.len() - empty;
            samples += 10;
        }
        let per = bytes as f64 / samples as f64;
        assert!(per <= 2.0, "{per} B per sample");
    }

    #[test]
    fn value_series_are_checked() {
        let mut e = BlockEncoder::new();
        let s = value_series("p", ValueType::U16, vec![(5, 1), (5, 2)]);
        assert!(matches!(e.frame_with_values(10, &[], &[s]), Err(EncodeError::Value { .. })));
        let s = value_series("p", ValueType::U16, vec![(5, 70_000)]);
        assert!(matches!(e.frame_with_values(10, &[], &[s]), Err(EncodeError::Value { .. })));
        let mut s = value_series("p", ValueType::U16, vec![(5, 1)]);
        s.codec.scale = f64::NAN;
        assert!(matches!(e.frame_with_values(10, &[], &[s]), Err(EncodeError::Value { .. })));
        let s = value_series("p", ValueType::U16, vec![(5, 1)]);
        assert!(matches!(e.frame_with_values(10, &[], &[s.clone(), s.clone()]), Err(EncodeError::Duplicate(_))));
        assert!(matches!(
            e.frame_with_values(10, &[(s.key.clone(), 1.0)], std::slice::from_ref(&s)),
            Err(EncodeError::Duplicate(_))
        ));
        // A failed frame changed nothing: the same series still starts fresh.
        e.frame_with_values(10, &[], std::slice::from_ref(&s)).unwrap();
        let mut later = s.clone();
        later.samples = vec![(4, 2)];
        assert!(matches!(e.frame_with_values(20, &[], &[later.clone()]), Err(EncodeError::Value { .. })));
        later.codec.offset = 1.0;
        later.samples = vec![(6, 2)];
        assert!(matches!(e.frame_with_values(20, &[], &[later]), Err(EncodeError::Value { .. })));
    }

    #[test]
    fn value_sections_never_panic_the_decoder() {
        let mut e = BlockEncoder::new();
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|f| {
                let s = value_series("p", ValueType::I32, vec![(f * 100 + 1, -f), (f * 100 + 50, f * 1000)]);
                let s2 = value_series("q", ValueType::F32, vec![(f * 100 + 2, 0x3fc0_0000 + f)]);
                e.frame_with_values(f * 100 + 90, &[(key("m", &[]), 1.0)], &[s, s2]).unwrap()
            })
            .collect();
        decode_block(frames.iter().map(Vec::as_slice)).unwrap();
        for f in 0..frames.len() {
            for cut in 0..frames[f].len() {
                let mut fs = frames.clone();
                fs[f].truncate(cut);
                assert!(decode_block(fs.iter().map(Vec::as_slice)).is_err() || cut + 1 >= frames[f].len());
            }
            for byte in 0..frames[f].len() {
                for bit in 0..8 {
                    let mut fs = frames.clone();
                    fs[f][byte] ^= 1 << bit;
                    let _ = decode_block(fs.iter().map(Vec::as_slice));
                }
            }
        }
    }
}
