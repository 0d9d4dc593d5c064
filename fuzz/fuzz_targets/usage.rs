//! The stream meters and the usage stripper take any bytes, cut anywhere, without panicking, and
//! the result never depends on where the stream was cut.
#![no_main]

use corral::usage::BodyFormat;
use corral::usage::{Meter, UsageStripper};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (Some(&cut), body) = (data.first(), data.get(1..).unwrap_or_default()) else {
        return;
    };
    let cut = (cut as usize).min(body.len());
    for format in [BodyFormat::Ndjson, BodyFormat::Sse, BodyFormat::Other] {
        let mut whole = Meter::new(format);
        whole.feed(body);
        let mut split = Meter::new(format);
        split.feed(&body[..cut]);
        split.feed(&body[cut..]);
        assert_eq!(whole.finish(), split.finish());
    }
    let mut whole = UsageStripper::default();
    let a = whole.process(body, true);
    let mut split = UsageStripper::default();
    let mut b = split.process(&body[..cut], false).to_vec();
    b.extend_from_slice(&split.process(&body[cut..], true));
    assert_eq!(a.as_ref(), b.as_slice());
    // The finest cut there is: one byte per chunk, as a hostile upstream might send.
    let mut bytewise = UsageStripper::default();
    let mut c = Vec::new();
    for (i, byte) in body.chunks(1).enumerate() {
        c.extend_from_slice(&bytewise.process(byte, i + 1 == body.len()));
    }
    if body.is_empty() {
        c.extend_from_slice(&bytewise.process(&[], true));
    }
    assert_eq!(a.as_ref(), c.as_slice());
    let mut meter = Meter::new(BodyFormat::Sse);
    body.chunks(1).for_each(|byte| meter.feed(byte));
    let mut once = Meter::new(BodyFormat::Sse);
    once.feed(body);
    assert_eq!(meter.finish(), once.finish());
});
