//! Arbitrary bytes from a peer, through the frame decoder and every message decoder: any
//! outcome but a panic, an abort or an unbounded allocation is fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelfleet_protocol::{
    AgentMessage, CoordinatorMessage, EnrollReply, EnrollRequest, FrameDecoder, decode, encode,
};

fuzz_target!(|data: &[u8]| {
    // As a stream, split in two pushes.
    let mut dec = FrameDecoder::new();
    let (a, b) = data.split_at(data.len() / 2);
    dec.push(a);
    dec.push(b);
    while let Ok(Some(m)) = dec.next_message::<AgentMessage>() {
        // Whatever decodes must encode again and decode to the same value.
        let frame = encode(&m).expect("a decoded message re-encodes");
        assert_eq!(decode::<AgentMessage>(&frame[4..]).expect("round trip"), m);
    }
    // As single payloads of either direction.
    let _ = decode::<AgentMessage>(data);
    let _ = decode::<CoordinatorMessage>(data);
    // Enrollment: the coordinator decodes requests from peers without a certificate.
    let _ = decode::<EnrollRequest>(data);
    let _ = decode::<EnrollReply>(data);
});
