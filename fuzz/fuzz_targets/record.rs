//! Store record, segment, send-position and drop-counter decoding: never a
//! panic, and whatever decodes re-encodes to the same bytes.
#![no_main]

use edge_agent::store::{plan, record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let record::Decoded::Record { seq, time_ms, flags, total } = record::decode_record(data) {
        let mut again = Vec::new();
        record::encode_record(seq, time_ms, flags, &data[record::RECORD_HEADER..total], &mut again);
        assert_eq!(&again[..], &data[..total]);
    }
    let id = data.get(8..16).map_or(1, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if let plan::Scan::Read { entries, valid_len, .. } = plan::scan(data, id) {
        assert!(valid_len as usize <= data.len());
        for w in entries.windows(2) {
            assert_eq!(w[0].seq + 1, w[1].seq);
        }
    }
    let _ = record::decode_cursor(data);
    let _ = record::decode_drops(data);
    let _ = record::decode_segment_header(data);
});
