//! Interoperability shim for the kubelet's plugin watcher.
//!
//! The kubelet's plugin watcher (pkg/kubelet/pluginmanager, still in 1.37) dials a
//! `plugins_registry` socket with grpc-go and no explicit authority, so its requests carry
//! the socket *path* as HTTP/2 `:authority`. The `h2` crate under tonic rejects such a
//! request with `PROTOCOL_ERROR` (kubernetes/kubernetes#109081, hyperium/h2#487), so a
//! tonic plugin can never answer `GetInfo`. This module sits between the accepted Unix
//! connection and tonic and rewrites, in the client-to-server direction only, every
//! `:authority` header whose value is a path (`/...`, or percent-encoded `%2F...` as
//! grpc-go sends it) into a short valid host name.
//!
//! Only the HPACK *structure* is parsed (integers and string lengths); no Huffman
//! decoding is needed: `/` is the 6-bit Huffman code `011000`, so a Huffman-encoded path
//! is recognised by its first bits. The replacement value is never longer than the
//! original one, so the server's dynamic table never holds more bytes than the client's:
//! indices the client uses keep meaning the same entries.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Default SETTINGS_MAX_FRAME_SIZE; frames we emit never exceed it.
const MAX_FRAME: usize = 16_384;
/// Static-table index of `:authority`.
const AUTHORITY_INDEX: u64 = 1;
const REPLACEMENT: &[u8] = b"localhost";

/// A header block that could not be parsed (it is then forwarded unchanged).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed HPACK header block")]
pub struct Malformed;

fn decode_int(buf: &[u8], pos: &mut usize, prefix_bits: u32) -> Result<u64, Malformed> {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    let first = *buf.get(*pos).ok_or(Malformed)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(u64::from(first));
    }
    let mut value = u64::from(mask);
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(Malformed)?;
        *pos += 1;
        if shift > 56 {
            return Err(Malformed);
        }
        value += u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn encode_int(out: &mut Vec<u8>, high_bits: u8, prefix_bits: u32, value: u64) {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    if value < u64::from(mask) {
        out.push(high_bits | value as u8);
        return;
    }
    out.push(high_bits | mask);
    let mut rest = value - u64::from(mask);
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A string literal at `pos`: (huffman, bytes).
fn read_string<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(bool, &'a [u8]), Malformed> {
    let huffman = buf.get(*pos).ok_or(Malformed)? & 0x80 != 0;
    let len = usize::try_from(decode_int(buf, pos, 7)?).map_err(|_| Malformed)?;
    let end = pos.checked_add(len).ok_or(Malformed)?;
    let bytes = buf.get(*pos..end).ok_or(Malformed)?;
    *pos = end;
    Ok((huffman, bytes))
}

/// Whether an `:authority` value is a socket path: it starts with `/`, or with `%` as
/// in the percent-encoded `%2Fvar%2Flib...` that grpc-go sends (neither can start a
/// valid authority). Huffman codes: `/` = `011000`, `%` = `010101`.
fn is_path(huffman: bool, value: &[u8]) -> bool {
    match value.first() {
        None => false,
        Some(b) if huffman => matches!(b >> 2, 0b01_1000 | 0b01_0101),
        Some(b) => *b == b'/' || *b == b'%',
    }
}

/// The fewest characters a string literal can decode to.
fn min_decoded_len(huffman: bool, value: &[u8]) -> usize {
    if huffman {
        // Codes are at most 30 bits; up to 7 bits of the last byte are padding.
        (value.len() * 8).saturating_sub(7) / 30
    } else {
        value.len()
    }
}

/// Rewrites `:authority` fields holding a path in one complete header block.
pub fn rewrite_header_block(block: &[u8]) -> Result<Vec<u8>, Malformed> {
    let mut out = Vec::with_capacity(block.len());
    let mut pos = 0;
    while pos < block.len() {
        let start = pos;
        let b = block[pos];
        let prefix = if b & 0x80 != 0 {
            // Indexed field: copied as is.
            decode_int(block, &mut pos, 7)?;
            out.extend_from_slice(&block[start..pos]);
            continue;
        } else if b & 0xc0 == 0x40 {
            6 // literal with incremental indexing
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            decode_int(block, &mut pos, 5)?;
            out.extend_from_slice(&block[start..pos]);
            continue;
        } else {
            4 // literal without indexing / never indexed
        };
        let name_index = decode_int(block, &mut pos, prefix)?;
        if name_index == 0 {
            read_string(block, &mut pos)?;
        }
        let name_end = pos;
        let (huffman, value) = read_string(block, &mut pos)?;
        if name_index == AUTHORITY_INDEX && is_path(huffman, value) {
            let room = min_decoded_len(huffman, value).max(1);
            let replacement = if room >= REPLACEMENT.len() {
                REPLACEMENT
            } else {
                &REPLACEMENT[..1]
            };
            let replacement = if replacement.len() > room {
                &replacement[..room]
            } else {
                replacement
            };
            out.extend_from_slice(&block[start..name_end]);
            encode_int(&mut out, 0, 7, replacement.len() as u64);
            out.extend_from_slice(replacement);
        } else {
            out.extend_from_slice(&block[start..pos]);
        }
    }
    Ok(out)
}

/// Emits a header block as HEADERS (+ CONTINUATION) frames.
fn frames(stream: [u8; 4], flags: u8, priority: &[u8], block: &[u8]) -> Vec<u8> {
    let keep = flags & !(FLAG_PADDED | FLAG_END_HEADERS);
    let mut out = Vec::with_capacity(block.len() + priority.len() + 18);
    let first_room = MAX_FRAME - priority.len();
    let mut chunks: Vec<&[u8]> = Vec::new();
    let (head, mut rest) = block.split_at(block.len().min(first_room));
    chunks.push(head);
    while !rest.is_empty() {
        let (c, r) = rest.split_at(rest.len().min(MAX_FRAME));
        chunks.push(c);
        rest = r;
    }
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter().enumerate() {
        let (ty, mut f, pre) = if i == 0 {
            (FRAME_HEADERS, keep, priority)
        } else {
            (FRAME_CONTINUATION, 0, &[][..])
        };
        if i == last {
            f |= FLAG_END_HEADERS;
        }
        let len = (pre.len() + c.len()) as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(ty);
        out.push(f);
        out.extend_from_slice(&stream);
        out.extend_from_slice(pre);
        out.extend_from_slice(c);
    }
    out
}

struct Pending {
    stream: [u8; 4],
    flags: u8,
    priority: Vec<u8>,
    block: Vec<u8>,
}

/// Copies an HTTP/2 client-to-server byte stream from `from` to `to`, fixing
/// `:authority` on the way. Non-HTTP/2 input is copied unchanged.
pub async fn pump<R, W>(mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if &preface != PREFACE {
        tokio::io::copy(&mut from, &mut to).await?;
        return Ok(());
    }
    to.flush().await?;
    let mut pending: Option<Pending> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (ty, flags) = (head[3], head[4]);
        let stream = [head[5], head[6], head[7], head[8]];
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        let fragment_done = flags & FLAG_END_HEADERS != 0;
        match (ty, pending.as_mut()) {
            (FRAME_HEADERS, None) => {
                let mut body: &[u8] = &payload;
                if flags & FLAG_PADDED != 0 {
                    let pad = *body.first().unwrap_or(&0) as usize;
                    if body.len() < 1 + pad {
                        to.write_all(&head).await?;
                        to.write_all(&payload).await?;
                        continue;
                    }
                    body = &body[1..body.len() - pad];
                }
                let (priority, fragment) = if flags & FLAG_PRIORITY != 0 && body.len() >= 5 {
                    body.split_at(5)
                } else {
                    (&[][..], body)
                };
                pending = Some(Pending {
                    stream,
                    flags,
                    priority: priority.to_vec(),
                    block: fragment.to_vec(),
                });
            }
            (FRAME_CONTINUATION, Some(p)) if p.stream == stream => {
                p.block.extend_from_slice(&payload);
            }
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                to.flush().await?;
                continue;
            }
        }
        if fragment_done && let Some(p) = pending.take() {
            let block = rewrite_header_block(&p.block).unwrap_or(p.block);
            to.write_all(&frames(p.stream, p.flags, &p.priority, &block))
                .await?;
            to.flush().await?;
        }
    }
    to.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(first: u8, value: &[u8], huffman: bool) -> Vec<u8> {
        let mut v = vec![first];
        encode_int(
            &mut v,
            if huffman { 0x80 } else { 0 },
            7,
            value.len() as u64,
        );
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn ints_round_trip() -> Result<(), Malformed> {
        for (bits, v) in [
            (7, 5u64),
            (7, 127),
            (7, 300),
            (5, 31),
            (4, 100_000),
            (6, 62),
        ] {
            let mut out = Vec::new();
            encode_int(&mut out, 0, bits, v);
            let mut pos = 0;
            assert_eq!(decode_int(&out, &mut pos, bits)?, v);
            assert_eq!(pos, out.len());
        }
        Ok(())
    }

    #[test]
    fn raw_path_authority_is_replaced() -> Result<(), Malformed> {
        let path = b"/var/lib/kubelet/plugins_registry/x.sock";
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        block.extend(literal(0x41, path, false)); // :authority, incremental indexing
        block.extend(literal(
            0x44,
            b"/pluginregistration.Registration/GetInfo",
            false,
        ));
        block.push(0xbe); // dynamic index 62
        let out = rewrite_header_block(&block)?;
        let mut want = vec![0x82, 0x86];
        want.extend(literal(0x41, b"localhost", false));
        want.extend(literal(
            0x44,
            b"/pluginregistration.Registration/GetInfo",
            false,
        ));
        want.push(0xbe);
        assert_eq!(out, want);
        // Never indexed / without indexing forms too; short paths get a shorter value.
        let out = rewrite_header_block(&literal(0x01, b"/a.sock", false))?;
        assert_eq!(out, literal(0x01, b"l", false));
        let out = rewrite_header_block(&literal(0x11, b"/abcdefghijk", false))?;
        assert_eq!(out, literal(0x11, b"localhost", false));
        let out = rewrite_header_block(&literal(0x41, b"%2Ftmp%2Fx%2Fy.sock", false))?;
        assert_eq!(out, literal(0x41, b"localhost", false));
        Ok(())
    }

    #[test]
    fn huffman_path_is_recognised_by_its_first_code() -> Result<(), Malformed> {
        // 0x60 = 011000|00: Huffman '/' then the start of the next code. 40 bytes of
        // Huffman data decode to at least 10 characters.
        let mut value = vec![0x60];
        value.extend(std::iter::repeat_n(0x55, 39));
        let out = rewrite_header_block(&literal(0x41, &value, true))?;
        assert_eq!(out, literal(0x41, b"localhost", false));
        // 0x54 = 010101|00: Huffman '%'.
        value[0] = 0x54;
        let out = rewrite_header_block(&literal(0x41, &value, true))?;
        assert_eq!(out, literal(0x41, b"localhost", false));
        // Huffman "localhost"-like value not starting with '/': untouched.
        let value = vec![0xa0, 0xe4, 0x1d, 0x13, 0x9d, 0x09];
        let block = literal(0x41, &value, true);
        assert_eq!(rewrite_header_block(&block)?, block);
        Ok(())
    }

    #[test]
    fn other_fields_and_good_authorities_untouched() -> Result<(), Malformed> {
        let mut block = literal(0x41, b"localhost", false);
        block.push(0x3f);
        block.push(0xe1);
        block.push(0x1f); // table size update 4096
        block.extend(literal(0x40, b"x", false)); // literal name follows...
        block.extend(literal(0x00, b"y", false)[1..].to_vec()); // ...and its value
        assert_eq!(rewrite_header_block(&block)?, block);
        assert_eq!(rewrite_header_block(&[0x41, 0x85, b'/']), Err(Malformed));
        Ok(())
    }

    #[tokio::test]
    async fn pump_rewrites_headers_frames_and_passes_the_rest() -> io::Result<()> {
        let mut input = PREFACE.to_vec();
        // SETTINGS (empty) on stream 0.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        // HEADERS split into HEADERS + CONTINUATION, padded, with priority.
        let block = literal(0x41, b"/tmp/some/long/socket/path.sock", false);
        let (a, b) = block.split_at(4);
        let mut payload = vec![2u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0]);
        let len = payload.len() as u32;
        input.extend_from_slice(&len.to_be_bytes()[1..]);
        input.extend_from_slice(&[FRAME_HEADERS, FLAG_PADDED | FLAG_PRIORITY, 0, 0, 0, 1]);
        input.extend_from_slice(&payload);
        let len = b.len() as u32;
        input.extend_from_slice(&len.to_be_bytes()[1..]);
        input.extend_from_slice(&[FRAME_CONTINUATION, FLAG_END_HEADERS, 0, 0, 0, 1]);
        input.extend_from_slice(b);
        let mut out = Vec::new();
        pump(&input[..], &mut out).await?;

        let mut want = PREFACE.to_vec();
        want.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let fixed = literal(0x41, b"localhost", false);
        let len = (5 + fixed.len()) as u32;
        want.extend_from_slice(&len.to_be_bytes()[1..]);
        want.extend_from_slice(&[FRAME_HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 15]);
        want.extend_from_slice(&fixed);
        assert_eq!(out, want);
        Ok(())
    }

    #[test]
    fn big_blocks_are_split() {
        let block = vec![0x82; MAX_FRAME + 10];
        let out = frames([0, 0, 0, 1], FLAG_END_HEADERS, &[], &block);
        assert_eq!(out.len(), block.len() + 18);
        assert_eq!(out[3], FRAME_HEADERS);
        assert_eq!(out[4] & FLAG_END_HEADERS, 0);
        let second = 9 + MAX_FRAME;
        assert_eq!(out[second + 3], FRAME_CONTINUATION);
        assert_eq!(out[second + 4], FLAG_END_HEADERS);
    }
}
