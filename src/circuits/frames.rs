//! The few bytes of a stream's start the relay reads and rewrites: multistream-select's
//! negotiation frames and the circuit relay message that follows them.
//!
//! Both are length-prefixed with an unsigned varint. multistream-select sends its
//! header (`/multistream/1.0.0\n`), then protocol names (the dialer's proposal, the
//! listener's echo or `na\n`); the circuit relay protocols then send one protobuf
//! message per frame (`HopMessage`, `StopMessage`).

/// multistream-select's header frame payload.
const HEADER: &[u8] = b"/multistream/1.0.0\n";
/// The hop protocol's name as multistream-select writes it.
pub const HOP_PROTOCOL: &[u8] = b"/libp2p/circuit/relay/0.2.0/hop\n";
/// The stop protocol's name as multistream-select writes it.
pub const STOP_PROTOCOL: &[u8] = b"/libp2p/circuit/relay/0.2.0/stop\n";
/// Negotiation frames looked at before giving up on a stream.
const MAX_FRAMES: usize = 8;
/// Negotiation bytes looked at before giving up on a stream.
pub const MAX_NEGOTIATION_BYTES: usize = 512;
/// Largest circuit relay message (libp2p's relay refuses bigger ones).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The bytes are not a frame of the kind looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAFrame;

/// An unsigned varint at the start of `buf`: its value and length, `Ok(None)` if `buf`
/// ends inside it, `Err` if it is longer than any frame length can be.
pub fn varint(buf: &[u8]) -> Result<Option<(u64, usize)>, NotAFrame> {
    let mut value = 0u64;
    for (i, b) in buf.iter().enumerate() {
        if i >= 9 {
            return Err(NotAFrame);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Ok(None)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Which side of the negotiation the relay writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The relay opened the stream: it writes the header and its proposal.
    Dialer,
    /// The remote opened it: the relay writes the header and its echo (or `na`).
    Listener,
}

/// What the negotiation written so far says about a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// Not decided yet; all of the bytes seen belong to the negotiation.
    Open,
    /// The protocol is decided: `at` bytes into what was seen, its frame ends (the next
    /// frame is the protocol's first message).
    Protocol { name: &'static [u8], at: usize },
    /// Not a circuit relay stream, or not a negotiation this module understands.
    Other,
}

/// Reads the negotiation frames at the start of `seen` (everything the relay wrote on
/// the stream so far).
pub fn negotiation(side: Side, seen: &[u8]) -> Negotiated {
    let mut at = 0;
    for i in 0..MAX_FRAMES {
        let Ok(head) = varint(&seen[at..]) else {
            return Negotiated::Other;
        };
        let Some((len, n)) = head else {
            return open(seen);
        };
        let len = len as usize;
        if len > MAX_NEGOTIATION_BYTES || (i == 0 && len != HEADER.len()) {
            return Negotiated::Other;
        }
        let Some(payload) = seen.get(at + n..at + n + len) else {
            return open(seen);
        };
        at += n + len;
        if i == 0 {
            if payload != HEADER {
                return Negotiated::Other;
            }
            continue;
        }
        if side == Side::Listener && payload == b"na\n" {
            continue;
        }
        let wanted = match side {
            Side::Dialer => STOP_PROTOCOL,
            Side::Listener => HOP_PROTOCOL,
        };
        return if payload == wanted {
            Negotiated::Protocol { name: wanted, at }
        } else {
            Negotiated::Other
        };
    }
    Negotiated::Other
}

fn open(seen: &[u8]) -> Negotiated {
    if seen.len() > MAX_NEGOTIATION_BYTES {
        Negotiated::Other
    } else {
        Negotiated::Open
    }
}

/// How long the message frame at the start of `buf` is (prefix included), `Ok(None)`
/// while its length prefix is incomplete, `Err` if it is not a circuit relay message.
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, NotAFrame> {
    match varint(buf)? {
        None => Ok(None),
        Some((len, _)) if len as usize > MAX_MESSAGE_BYTES => Err(NotAFrame),
        Some((len, n)) => Ok(Some(n + len as usize)),
    }
}

/// The `Limit` a message announces, as the circuit relay spec encodes it: `None` leaves
/// the field out (no limits at all: js-libp2p and go-libp2p then treat the relayed
/// connection as a full one); a zero duration or data means that one is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLimit {
    pub duration_secs: u32,
    pub data_bytes: u64,
}

/// `frame` (a complete length-prefixed protobuf message) with its field `field` (the
/// `Limit` submessage), where present, replaced by `limit` or removed when `limit` is
/// `None`; `None` if the frame does not parse as protobuf (it is then passed on
/// untouched).
pub fn rewrite_limit(frame: &[u8], field: u64, limit: Option<WireLimit>) -> Option<Vec<u8>> {
    let (len, n) = varint(frame).ok()??;
    let body = frame.get(n..)?;
    if body.len() as u64 != len {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at = 0;
    while at < body.len() {
        let start = at;
        let (key, k) = varint(&body[at..]).ok()??;
        at += k;
        match key & 7 {
            0 => at += varint(&body[at..]).ok()??.1,
            1 => at += 8,
            2 => {
                let (l, k) = varint(&body[at..]).ok()??;
                at += k + usize::try_from(l).ok()?;
            }
            5 => at += 4,
            _ => return None,
        }
        if at > body.len() {
            return None;
        }
        if key >> 3 != field || key & 7 != 2 {
            out.extend_from_slice(&body[start..at]);
        } else if let Some(l) = limit {
            let mut sub = Vec::with_capacity(16);
            sub.push(1 << 3); // duration, varint
            put_varint(&mut sub, u64::from(l.duration_secs));
            sub.push(2 << 3); // data, varint
            put_varint(&mut sub, l.data_bytes);
            put_varint(&mut out, field << 3 | 2);
            put_varint(&mut out, sub.len() as u64);
            out.extend_from_slice(&sub);
        }
    }
    let mut framed = Vec::with_capacity(out.len() + 3);
    put_varint(&mut framed, out.len() as u64);
    framed.extend_from_slice(&out);
    Some(framed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        put_varint(&mut f, payload.len() as u64);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn negotiations() {
        let header = frame(HEADER);
        let stop = [header.clone(), frame(STOP_PROTOCOL)].concat();
        assert_eq!(
            negotiation(Side::Dialer, &stop),
            Negotiated::Protocol {
                name: STOP_PROTOCOL,
                at: stop.len()
            }
        );
        // Incomplete: still open, whatever is cut.
        for cut in 0..stop.len() {
            assert_eq!(negotiation(Side::Dialer, &stop[..cut]), Negotiated::Open);
        }
        let kad = [header.clone(), frame(b"/ipfs/kad/1.0.0\n")].concat();
        assert_eq!(negotiation(Side::Dialer, &kad), Negotiated::Other);
        // The listener may refuse proposals before it echoes the hop protocol.
        let hop = [header.clone(), frame(b"na\n"), frame(HOP_PROTOCOL)].concat();
        let mut with_message = hop.clone();
        with_message.extend_from_slice(&[3, 8, 2, 42]);
        assert_eq!(
            negotiation(Side::Listener, &with_message),
            Negotiated::Protocol {
                name: HOP_PROTOCOL,
                at: hop.len()
            }
        );
        assert_eq!(negotiation(Side::Dialer, &hop), Negotiated::Other);
        assert_eq!(negotiation(Side::Listener, &[0xff; 12]), Negotiated::Other);
        assert_eq!(
            negotiation(Side::Listener, b"GET / HTTP/1.1\r\n"),
            Negotiated::Other
        );
    }

    #[test]
    fn limits_are_replaced_or_removed() {
        // HopMessage { type: STATUS, limit: { duration: u32::MAX, data: 0 }, status: OK },
        // as libp2p's relay writes an acceptance.
        let mut limit = vec![1 << 3];
        put_varint(&mut limit, u64::from(u32::MAX));
        limit.extend_from_slice(&[2 << 3, 0]);
        let mut body = vec![1 << 3, 2, 4 << 3 | 2, limit.len() as u8];
        body.extend_from_slice(&limit);
        body.extend_from_slice(&[5 << 3, 100]);
        let msg = frame(&body);
        assert_eq!(message_len(&msg), Ok(Some(msg.len())));
        assert_eq!(message_len(&msg[..0]), Ok(None));

        let removed = rewrite_limit(&msg, 4, None).unwrap();
        assert_eq!(removed, frame(&[1 << 3, 2, 5 << 3, 100]));

        let set = WireLimit {
            duration_secs: 0,
            data_bytes: 1 << 20,
        };
        let replaced = rewrite_limit(&msg, 4, Some(set)).unwrap();
        assert_eq!(
            replaced,
            frame(&[
                1 << 3,
                2,
                4 << 3 | 2,
                6,
                1 << 3,
                0,
                2 << 3,
                0x80,
                0x80,
                0x40,
                5 << 3,
                100
            ])
        );
        // A message without the field (a refusal) is left as it is.
        let denial = frame(&[1 << 3, 2, 5 << 3, 0xc9, 0x01]); // status 201
        assert_eq!(rewrite_limit(&denial, 4, None).unwrap(), denial);
        assert_eq!(rewrite_limit(&denial, 4, Some(set)).unwrap(), denial);
        // Garbage is left alone.
        assert_eq!(rewrite_limit(&frame(&[0x0f, 1]), 4, None), None);
        assert_eq!(rewrite_limit(&[5, 1], 4, None), None);
    }
}
