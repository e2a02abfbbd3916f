//! Round trips of arbitrary messages, and what the decoder does with hostile bytes.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use tunnelfleet_protocol::*;

#[test]
fn arbitrary_messages_round_trip_through_frames_split_anywhere() {
    arbtest::arbtest(|u| {
        let a: AgentMessage = u.arbitrary()?;
        let c: CoordinatorMessage = u.arbitrary()?;
        let mut bytes = encode(&a).unwrap();
        bytes.extend(encode(&c).unwrap());
        // Deliver in arbitrary pieces: frames must come out whole and in order.
        let mut dec = FrameDecoder::new();
        let mut payloads = Vec::new();
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let n = u.int_in_range(1..=rest.len())?;
            dec.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(p) = dec.next_payload().unwrap() {
                payloads.push(p);
            }
        }
        assert_eq!(payloads.len(), 2);
        // Whole and equal, unless a count is over its bound (`limits`): then refused by name.
        match decode::<AgentMessage>(&payloads[0]) {
            Ok(m) => assert_eq!(m, a),
            Err(e) => assert!(e.to_string().contains("at most"), "{e}"),
        }
        match decode::<CoordinatorMessage>(&payloads[1]) {
            Ok(m) => assert_eq!(m, c),
            Err(e) => assert!(e.to_string().contains("at most"), "{e}"),
        }
        assert_eq!(dec.buffered(), 0);
        Ok(())
    })
    .budget_ms(2_000);
}

fn hello() -> AgentMessage {
    AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: "vma-233".into(),
        agent_version: "0.1.0".into(),
        labels: [("site".to_string(), "dc1".to_string())].into(),
        applied_version: Some(7),
        started_unix_ms: 1,
    })
}

#[test]
fn need_more_bytes_is_not_an_error() {
    let frame = encode(&hello()).unwrap();
    let mut dec = FrameDecoder::new();
    for b in &frame[..frame.len() - 1] {
        dec.push(std::slice::from_ref(b));
        assert!(dec.next_message::<AgentMessage>().unwrap().is_none());
    }
    dec.push(&frame[frame.len() - 1..]);
    assert_eq!(dec.next_message::<AgentMessage>().unwrap(), Some(hello()));
}

#[test]
fn a_huge_length_prefix_is_refused_before_buffering_and_poisons_the_decoder() {
    let mut dec = FrameDecoder::new();
    dec.push(&u32::MAX.to_be_bytes());
    let e = dec.next_payload().unwrap_err();
    assert!(
        matches!(e, DecodeError::Oversize { len: u32::MAX, .. }),
        "{e}"
    );
    assert_eq!(dec.buffered(), 0);
    dec.push(&encode(&hello()).unwrap());
    assert!(matches!(dec.next_payload(), Err(DecodeError::Poisoned)));
}

#[test]
fn length_prefixes_inside_the_payload_cannot_make_us_allocate() {
    // A Hello whose agent_id claims 2^62 bytes (bincode varint: 0xFD then a u64, little end):
    // refused by the decode limit before any allocation.
    let mut payload = vec![0u8, 1]; // variant Hello, protocol 1
    payload.push(0xfd);
    payload.extend((1u64 << 62).to_le_bytes());
    let e = decode::<AgentMessage>(&payload).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::Malformed(bincode::error::DecodeError::LimitExceeded)
        ),
        "{e:?}"
    );
    // A Heartbeat whose profile vector claims 2^62 entries: serde preallocates only a capped
    // amount, so this ends as truncated input instead of a 2^62-element allocation.
    let mut payload = vec![1u8, 0, 0]; // variant Heartbeat, seq 0, sent 0
    payload.push(0xfd);
    payload.extend((1u64 << 62).to_le_bytes());
    let e = decode::<AgentMessage>(&payload).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
}

#[test]
fn truncated_trailing_and_unknown_variants_are_errors() {
    let frame = encode(&hello()).unwrap();
    let payload = &frame[4..];
    assert!(matches!(
        decode::<AgentMessage>(&payload[..payload.len() - 1]),
        Err(DecodeError::Malformed(_))
    ));
    let mut long = payload.to_vec();
    long.push(0);
    assert!(matches!(
        decode::<AgentMessage>(&long),
        Err(DecodeError::TrailingBytes { extra: 1 })
    ));
    assert!(matches!(
        decode::<AgentMessage>(&[42]),
        Err(DecodeError::Malformed(_))
    ));
    // A malformed frame poisons the decoder: the connection is to be closed.
    let mut dec = FrameDecoder::new();
    dec.push(&1u32.to_be_bytes());
    dec.push(&[42]);
    assert!(dec.next_message::<AgentMessage>().is_err());
    assert!(matches!(dec.next_payload(), Err(DecodeError::Poisoned)));
}

#[test]
fn random_bytes_never_panic() {
    arbtest::arbtest(|u| {
        let bytes: Vec<u8> = u.arbitrary()?;
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        while let Ok(Some(_)) = dec.next_message::<CoordinatorMessage>() {}
        let _ = decode::<AgentMessage>(&bytes);
        let _ = decode::<EnrollRequest>(&bytes);
        let _ = decode::<EnrollReply>(&bytes);
        Ok(())
    })
    .budget_ms(1_000);
}

#[test]
fn enrollment_messages_round_trip() {
    arbtest::arbtest(|u| {
        let req: EnrollRequest = u.arbitrary()?;
        let rep: EnrollReply = u.arbitrary()?;
        let mut dec = FrameDecoder::new();
        dec.push(&encode(&req).unwrap());
        dec.push(&encode(&rep).unwrap());
        assert_eq!(dec.next_message::<EnrollRequest>().unwrap(), Some(req));
        assert_eq!(dec.next_message::<EnrollReply>().unwrap(), Some(rep));
        Ok(())
    })
    .budget_ms(500);
}

#[test]
fn version_mismatch_names_both_versions() {
    assert!(check_version(PROTOCOL_VERSION).is_ok());
    let e = check_version(PROTOCOL_VERSION + 1).unwrap_err().to_string();
    assert!(
        e.contains(&format!("peer speaks {}", PROTOCOL_VERSION + 1)),
        "{e}"
    );
}

#[test]
fn an_oversize_message_is_refused_on_encode() {
    let big = CoordinatorMessage::Refused {
        reason: "x".repeat(MAX_FRAME_LEN as usize + 1),
    };
    assert!(matches!(
        encode(&big),
        Err(EncodeError::Bincode(_) | EncodeError::TooLarge { .. })
    ));
}

#[test]
fn a_large_frame_leaves_no_large_buffer_behind() {
    let mut dec = FrameDecoder::new();
    let big = vec![7u8; 1024 * 1024];
    let mut frame = (big.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&big);
    // The large frame and the start of a small one.
    frame.extend_from_slice(&[0, 0, 0, 2, 1]);
    dec.push(&frame);
    assert!(dec.held() >= big.len());
    assert_eq!(dec.next_payload().unwrap().unwrap(), big);
    assert_eq!(dec.buffered(), 5);
    assert!(dec.held() <= KEPT_CAPACITY, "holds {} bytes", dec.held());
    dec.push(&[2]);
    assert_eq!(dec.next_payload().unwrap().unwrap(), vec![1, 2]);
}

#[test]
fn a_frame_of_exactly_the_limit_passes_and_one_byte_more_is_refused() {
    // The limit is 4 MiB: a 2 MiB push (a large profile set) is a frame like any other.
    assert_eq!(MAX_FRAME_LEN, 4 * 1024 * 1024);
    let two_mib = vec![3u8; 2 * 1024 * 1024];
    let mut dec = FrameDecoder::new();
    dec.push(&encode(&two_mib).unwrap());
    assert_eq!(dec.next_message::<Vec<u8>>().unwrap(), Some(two_mib));

    // A byte string's length prefix takes 5 bytes at this size: the payload is the limit.
    let exact = vec![9u8; MAX_FRAME_LEN as usize - 5];
    // (bincode's own limit, which also charges what it allocates, refuses decoding a message
    // this close to it: the frame layer is what is checked here.)
    let frame = encode(&exact).unwrap();
    assert_eq!(frame.len(), 4 + MAX_FRAME_LEN as usize);
    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    assert_eq!(
        dec.next_payload().unwrap().map(|p| p.len()),
        Some(MAX_FRAME_LEN as usize)
    );

    let over = vec![9u8; MAX_FRAME_LEN as usize - 4];
    assert!(matches!(
        encode(&over),
        Err(EncodeError::TooLarge { len, .. }) if len == MAX_FRAME_LEN as usize + 1
    ));
    let mut dec = FrameDecoder::new();
    dec.push(&(MAX_FRAME_LEN + 1).to_be_bytes());
    assert!(matches!(
        dec.next_payload(),
        Err(DecodeError::Oversize { len, .. }) if len == MAX_FRAME_LEN + 1
    ));
}

#[test]
fn trailing_bytes_are_counted() {
    let frame = encode(&hello()).unwrap();
    let mut long = frame[4..].to_vec();
    long.extend_from_slice(&[0, 0, 0]);
    assert!(matches!(
        decode::<AgentMessage>(&long),
        Err(DecodeError::TrailingBytes { extra: 3 })
    ));
}
