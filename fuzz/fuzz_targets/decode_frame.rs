//! Fuzzes the storage protocol's frame decoder with arbitrary peer bytes: it must never
//! panic or over-allocate, and any message it accepts must survive a re-encode unchanged.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strata::storage::protocol::{decode_frame, encode_frame, MAX_FRAME_CEILING};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = decode_frame(&mut buf, 1 << 20) {
        let mut again = BytesMut::from(&encode_frame(&msg)[..]);
        let decoded = decode_frame(&mut again, MAX_FRAME_CEILING);
        assert_eq!(decoded, Ok(Some(msg)));
        assert!(again.is_empty());
    }
});
