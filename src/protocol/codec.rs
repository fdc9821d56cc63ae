//! Framing: a 4-byte big-endian length, then a MessagePack body with named
//! fields. Blocking (`std::io`) and async (`tokio`) readers share one limit
//! check, done before any allocation, so an oversized length costs nothing.
//! A body over [`EAGER_BODY`] grows with the bytes that arrive: a length
//! prefix alone (16 MiB declared, nothing sent) costs 64 KiB, not 16 MiB.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::error::ProtocolError;

/// Default limit on a frame's body (16 MiB).
pub const DEFAULT_MAX_FRAME: u64 = 16 * 1024 * 1024;
/// Bodies up to this size are allocated whole at once (one allocation for
/// every ordinary request); larger ones as their bytes arrive.
pub const EAGER_BODY: usize = 64 * 1024;

/// Encode `msg` as a complete frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Room for a typical request or reply: no regrowth while encoding.
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&[0u8; 4]);
    rmp_serde::encode::write_named(&mut out, msg).expect("encoding into a Vec cannot fail");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Decode a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    rmp_serde::from_slice(body).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Decode a frame body that must be exactly one MessagePack value: what a
/// server reads from a client, where bytes after the value could be a
/// second request that would go unanswered. (Responses are decoded with
/// [`decode`]: walking a large reply once more to find its end would cost
/// every read on the client, for nothing a client could do about it.)
pub fn decode_whole<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    let value = decode(body)?;
    // Decoded, so the value is whole: `value_len` finds its end.
    if let Some(end) = crate::protocol::direct::value_len(body) {
        if end != body.len() {
            return Err(ProtocolError::Malformed(format!(
                "{} bytes follow the message (a frame holds exactly one MessagePack value)",
                body.len() - end
            )));
        }
    }
    Ok(value)
}

fn check_len(prefix: [u8; 4], limit: u64) -> Result<usize, ProtocolError> {
    let size = u32::from_be_bytes(prefix) as u64;
    if size > limit {
        return Err(ProtocolError::FrameTooLarge { size, limit });
    }
    Ok(size as usize)
}

/// Read one frame body. A clean end of stream before the prefix is `Closed`.
pub fn read_frame<R: Read>(r: &mut R, limit: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = check_len(prefix, limit)?;
    if len <= EAGER_BODY {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::with_capacity(EAGER_BODY);
    r.take(len as u64).read_to_end(&mut body)?;
    short_body(&body, len)?;
    Ok(body)
}

/// A body that ended before its length: the stream ended mid-frame.
fn short_body(body: &[u8], len: usize) -> Result<(), ProtocolError> {
    if body.len() < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "the stream ended after {} of a frame's {len} bytes",
                body.len()
            ),
        )
        .into());
    }
    Ok(())
}

/// Async twin of [`read_frame`].
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: u64,
) -> Result<Vec<u8>, ProtocolError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = check_len(prefix, limit)?;
    if len <= EAGER_BODY {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        return Ok(body);
    }
    let mut body = Vec::with_capacity(EAGER_BODY);
    r.take(len as u64).read_to_end(&mut body).await?;
    short_body(&body, len)?;
    Ok(body)
}

/// Encode and write one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    w.write_all(&encode(msg))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::{Request, RequestBody, SessionRole, PROTOCOL_VERSION};

    #[test]
    fn frame_round_trips() {
        let req = Request {
            id: 9,
            body: RequestBody::Hello {
                protocol_version: PROTOCOL_VERSION,
                role: SessionRole::Admin,
                client_name: "t".into(),
            },
        };
        let frame = encode(&req);
        let body = read_frame(&mut &frame[..], DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(decode::<Request>(&body).unwrap(), req);
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let frame = [0xff, 0xff, 0xff, 0xff, 1, 2];
        match read_frame(&mut &frame[..], 1024) {
            Err(ProtocolError::FrameTooLarge { size, limit }) => {
                assert_eq!(size, u32::MAX as u64);
                assert_eq!(limit, 1024);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_frame_is_an_io_error_and_empty_stream_is_closed() {
        let frame = [0, 0, 0, 10, 1, 2];
        assert!(matches!(
            read_frame(&mut &frame[..], 1024),
            Err(ProtocolError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &[][..], 1024),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn bytes_after_the_message_are_malformed() {
        let req = Request {
            id: 9,
            body: RequestBody::Ping,
        };
        let mut two = encode(&req)[4..].to_vec();
        let one = two.clone();
        two.extend_from_slice(&one);
        match decode_whole::<Request>(&two) {
            Err(ProtocolError::Malformed(why)) => {
                assert!(
                    why.contains(&format!("{} bytes follow", one.len())),
                    "{why}"
                )
            }
            other => panic!("expected malformed, got {other:?}"),
        }
        assert_eq!(decode_whole::<Request>(&one).unwrap(), req);
    }

    /// A declared length costs memory only as its bytes arrive: a reader
    /// that has seen the prefix and a few bytes holds about EAGER_BODY.
    #[tokio::test]
    async fn a_large_declared_body_grows_with_what_arrives() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let declared = 8 * 1024 * 1024u32;
        tokio::io::AsyncWriteExt::write_all(&mut client, &declared.to_be_bytes())
            .await
            .unwrap();
        let body: Vec<u8> = (0..declared).map(|i| i as u8).collect();
        let reading = tokio::spawn(async move {
            let mut server = server;
            read_frame_async(&mut server, DEFAULT_MAX_FRAME).await
        });
        tokio::io::AsyncWriteExt::write_all(&mut client, &body)
            .await
            .unwrap();
        assert_eq!(reading.await.unwrap().unwrap(), body);

        // Cut short: an I/O error naming how much came.
        let frame = [&declared.to_be_bytes()[..], &body[..100_000]].concat();
        match read_frame(&mut &frame[..], DEFAULT_MAX_FRAME) {
            Err(ProtocolError::Io(e)) => {
                assert!(e.to_string().contains("after 100000 of"), "{e}")
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    #[test]
    fn garbage_body_is_malformed() {
        assert!(matches!(
            decode::<Request>(&[0xc1, 0x00]),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn messages_use_named_fields() {
        let frame = encode(&Request {
            id: 1,
            body: RequestBody::Ping,
        });
        let v = rmpv::decode::read_value(&mut &frame[4..]).unwrap();
        let map = v.as_map().expect("a request is a map");
        assert!(map.iter().any(|(k, _)| k.as_str() == Some("id")));
    }

    /// A `replicate` from a primary that predates `ack` asks for what it
    /// always got: an answer once the records are durable.
    #[test]
    fn replicate_without_ack_means_durable() {
        use crate::protocol::messages::ReplicateAck;
        let body = rmpv::Value::Map(vec![
            ("type".into(), "replicate".into()),
            (
                "epoch".into(),
                rmpv::Value::Map(vec![("term".into(), 3.into()), ("server".into(), 1.into())]),
            ),
            ("primary_id".into(), 7.into()),
            ("records".into(), rmpv::Value::Array(vec![])),
            ("primary_last".into(), 10.into()),
        ]);
        let request = rmpv::Value::Map(vec![("id".into(), 1.into()), ("body".into(), body)]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &request).unwrap();
        let decoded: Request = decode(&bytes).unwrap();
        match decoded.body {
            RequestBody::Replicate { ack, .. } => assert_eq!(ack, ReplicateAck::Durable),
            other => panic!("decoded {other:?}"),
        }
        let applied = Request {
            id: 2,
            body: RequestBody::Replicate {
                epoch: crate::types::Epoch { term: 3, server: 1 },
                primary_id: 7,
                records: vec![],
                primary_last: 10,
                ack: ReplicateAck::Applied,
            },
        };
        let frame = encode(&applied);
        let v = rmpv::decode::read_value(&mut &frame[4..]).unwrap();
        let body = &v
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some("body"))
            .unwrap()
            .1;
        let ack = body
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some("ack"));
        assert_eq!(ack.and_then(|(_, v)| v.as_str()), Some("applied"));
        assert_eq!(decode::<Request>(&frame[4..]).unwrap(), applied);
    }
}
