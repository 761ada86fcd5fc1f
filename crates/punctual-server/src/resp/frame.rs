//! RESP on the wire, without I/O: [`parse`] reads one request from a buffer, [`Reply::encode`] writes
//! one answer in RESP2 or RESP3. Tests and the fuzzer drive both directly.
//!
//! Requests are what clients send: an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), or an
//! inline command (`PING\r\n`, as typed into telnet), split on spaces with Redis's quoting rules.
//! Malformed input is a [`ProtocolError`] with Redis's own message; after one, the connection is
//! answered and closed, as Redis does, because the stream can no longer be trusted to be in step.

use std::fmt::Write as _;

/// Most arguments in one request.
pub const MAX_ARGS: usize = 1 << 20;
/// Longest argument (a value is at most the payload limit; this bounds what is buffered first).
pub const MAX_BULK_BYTES: usize = 64 << 20;
/// Longest inline command line.
pub const MAX_INLINE_BYTES: usize = 64 << 10;

/// A request that cannot be read; the message is Redis's for the same input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ERR Protocol error: {}", self.0)
    }
}

fn error<T>(message: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(message.into()))
}

/// The position of the next `\r\n` at or after `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// A decimal integer of a length header.
fn number(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.is_empty() || text.len() > 20 {
        return None;
    }
    text.parse().ok()
}

/// A parsed request's arguments and how many bytes of the buffer it took; `None`: more bytes needed.
pub type Parsed = Option<(Vec<Vec<u8>>, usize)>;

/// Reads one request from the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// arguments and how many bytes they took. An empty inline line is skipped (consumed, no request).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_array(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_array(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    let Some(end) = line_end(buf, 1) else {
        if buf.len() > 32 {
            return error("invalid multibulk length");
        }
        return Ok(None);
    };
    let count = match number(&buf[1..end]) {
        Some(n) if n <= MAX_ARGS as i64 => n,
        _ => return error("invalid multibulk length"),
    };
    let mut at = end + 2;
    if count <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    let mut args = Vec::with_capacity((count as usize).min(1024));
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(other) => return error(format!("expected '$', got '{}'", *other as char)),
        }
        let Some(end) = line_end(buf, at + 1) else {
            if buf.len() - at > 32 {
                return error("invalid bulk length");
            }
            return Ok(None);
        };
        let len = match number(&buf[at + 1..end]) {
            Some(n) if (0..=MAX_BULK_BYTES as i64).contains(&n) => n as usize,
            _ => return error("invalid bulk length"),
        };
        let start = end + 2;
        let Some(data) = buf.get(start..start + len) else {
            return Ok(None);
        };
        match buf.get(start + len..start + len + 2) {
            None => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return error("expected CRLF after a bulk string"),
        }
        args.push(data.to_vec());
        at = start + len + 2;
    }
    Ok(Some((args, at)))
}

fn parse_inline(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    let Some(newline) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_INLINE_BYTES {
            return error("too big inline request");
        }
        return Ok(None);
    };
    if newline > MAX_INLINE_BYTES {
        return error("too big inline request");
    }
    let line = buf[..newline]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..newline]);
    let args = split_inline(line)?;
    Ok(Some((args, newline + 1)))
}

/// Splits an inline line as Redis's `sdssplitargs` does: spaces separate, `"…"` allows `\n`, `\xHH`
/// and the usual escapes, `'…'` allows `\'`; a closing quote must be followed by a space or the end.
fn split_inline(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    let unbalanced = || error("unbalanced quotes in request");
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            return Ok(args);
        }
        let mut arg = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    match line.get(i) {
                        None => return unbalanced(),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let hex = |b: Option<&u8>| b.and_then(|c| (*c as char).to_digit(16));
                            match (line.get(i + 1), hex(line.get(i + 2)), hex(line.get(i + 3))) {
                                (Some(b'x'), Some(h), Some(l)) => {
                                    arg.push((h * 16 + l) as u8);
                                    i += 4;
                                }
                                (Some(c), _, _) => {
                                    arg.push(match c {
                                        b'n' => b'\n',
                                        b'r' => b'\r',
                                        b't' => b'\t',
                                        b'b' => 8,
                                        b'a' => 7,
                                        other => *other,
                                    });
                                    i += 2;
                                }
                                (None, _, _) => return unbalanced(),
                            }
                        }
                        Some(c) => {
                            arg.push(*c);
                            i += 1;
                        }
                    }
                }
                if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return unbalanced();
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    match line.get(i) {
                        None => return unbalanced(),
                        Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                            arg.push(b'\'');
                            i += 2;
                        }
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            arg.push(*c);
                            i += 1;
                        }
                    }
                }
                if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return unbalanced();
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
}

/// An answer, encoded for the connection's protocol version.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    /// `$-1` in RESP2, `_` in RESP3.
    Null,
    Array(Vec<Reply>),
    /// A flat array in RESP2, `%` in RESP3.
    Map(Vec<(Reply, Reply)>),
    /// An array in RESP2, `>` in RESP3 (pub/sub messages, subscribe confirmations).
    Push(Vec<Reply>),
    /// A bulk string in RESP2, `=` with a format in RESP3 (`INFO`).
    Verbatim(&'static str, String),
    /// Several frames answering one request, one after another (`SUBSCRIBE a b` confirms each).
    Many(Vec<Reply>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// Appends the reply to `out`, as RESP3 when `resp3`.
    pub fn encode(&self, resp3: bool, out: &mut Vec<u8>) {
        let head = |out: &mut Vec<u8>, kind: char, n: usize| {
            let mut text = String::new();
            let _ = write!(text, "{kind}{n}\r\n");
            out.extend_from_slice(text.as_bytes());
        };
        match self {
            Reply::Simple(text) => {
                out.push(b'+');
                out.extend(text.bytes().filter(|b| *b != b'\r' && *b != b'\n'));
                out.extend_from_slice(b"\r\n");
            }
            Reply::Error(text) => {
                out.push(b'-');
                out.extend(text.bytes().filter(|b| *b != b'\r' && *b != b'\n'));
                out.extend_from_slice(b"\r\n");
            }
            Reply::Integer(n) => {
                out.extend_from_slice(format!(":{n}\r\n").as_bytes());
            }
            Reply::Bulk(data) => {
                head(out, '$', data.len());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Null if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                head(out, '*', items.len());
                for item in items {
                    item.encode(resp3, out);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    head(out, '%', pairs.len());
                } else {
                    head(out, '*', pairs.len() * 2);
                }
                for (key, value) in pairs {
                    key.encode(resp3, out);
                    value.encode(resp3, out);
                }
            }
            Reply::Push(items) => {
                head(out, if resp3 { '>' } else { '*' }, items.len());
                for item in items {
                    item.encode(resp3, out);
                }
            }
            Reply::Verbatim(format, text) if resp3 => {
                head(out, '=', text.len() + 4);
                out.extend_from_slice(format.as_bytes());
                out.push(b':');
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Verbatim(_, text) => Reply::Bulk(text.clone().into_bytes()).encode(resp3, out),
            Reply::Many(replies) => {
                for reply in replies {
                    reply.encode(resp3, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    #[test]
    fn arrays_of_bulk_strings_parse_and_say_how_much_they_took() {
        let wire = b"*3\r\n$5\r\nSETEX\r\n$9\r\norder:123\r\n$4\r\n1800\r\n*1\r\n$4\r\nPING\r\n";
        let (first, used) = parse(wire).unwrap().unwrap();
        assert_eq!(first, args(&["SETEX", "order:123", "1800"]));
        let (second, rest) = parse(&wire[used..]).unwrap().unwrap();
        assert_eq!(second, args(&["PING"]));
        assert_eq!(used + rest, wire.len());
        // Binary-safe values.
        let (bin, _) = parse(b"*1\r\n$3\r\na\r\x00\r\n").unwrap().unwrap();
        assert_eq!(bin, vec![b"a\r\x00".to_vec()]);
    }

    #[test]
    fn every_prefix_of_a_request_asks_for_more() {
        let wire = b"*2\r\n$3\r\nGET\r\n$11\r\nhello world\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(wire).unwrap().is_some());
        let inline = b"SET k \"two words\"\r\n";
        for cut in 0..inline.len() {
            assert_eq!(parse(&inline[..cut]), Ok(None), "inline cut at {cut}");
        }
    }

    #[test]
    fn inline_commands_split_like_redis() {
        let (got, used) = parse(b"set k \"a b\\n\\x41\" 'it\\'s'\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            vec![
                b"set".to_vec(),
                b"k".to_vec(),
                b"a b\nA".to_vec(),
                b"it's".to_vec()
            ]
        );
        assert_eq!(used, 27);
        assert_eq!(parse(b"PING\n").unwrap().unwrap().0, args(&["PING"]));
        assert_eq!(parse(b"   \r\n").unwrap().unwrap(), (Vec::new(), 5));
        assert!(parse(b"get \"open\r\n").is_err());
        assert!(parse(b"get \"a\"b\r\n").is_err());
    }

    #[test]
    fn malformed_requests_get_redis_messages() {
        for (wire, message) in [
            (
                &b"*x\r\n"[..],
                "ERR Protocol error: invalid multibulk length",
            ),
            (
                b"*2\r\n+OK\r\n",
                "ERR Protocol error: expected '$', got '+'",
            ),
            (b"*1\r\n$-5\r\n", "ERR Protocol error: invalid bulk length"),
            (
                b"*1\r\n$99999999999\r\n",
                "ERR Protocol error: invalid bulk length",
            ),
            (
                b"*1\r\n$1\r\nab\r\n",
                "ERR Protocol error: expected CRLF after a bulk string",
            ),
            (
                b"*9999999999\r\n",
                "ERR Protocol error: invalid multibulk length",
            ),
        ] {
            assert_eq!(parse(wire).unwrap_err().to_string(), message, "{wire:?}");
        }
        let long = vec![b'a'; MAX_INLINE_BYTES + 2];
        assert_eq!(parse(&long).unwrap_err().0, "too big inline request");
        assert_eq!(parse(b"*0\r\n").unwrap().unwrap(), (Vec::new(), 4));
    }

    #[test]
    fn replies_encode_for_both_protocols() {
        let enc = |r: &Reply, v3: bool| {
            let mut out = Vec::new();
            r.encode(v3, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(enc(&Reply::ok(), false), "+OK\r\n");
        assert_eq!(enc(&Reply::Null, false), "$-1\r\n");
        assert_eq!(enc(&Reply::Null, true), "_\r\n");
        let confirm = Reply::Push(vec![
            Reply::Bulk(b"psubscribe".to_vec()),
            Reply::Bulk(b"__keyevent@0__:expired".to_vec()),
            Reply::Integer(1),
        ]);
        assert_eq!(
            enc(&confirm, false),
            "*3\r\n$10\r\npsubscribe\r\n$22\r\n__keyevent@0__:expired\r\n:1\r\n"
        );
        assert!(enc(&confirm, true).starts_with(">3\r\n"));
        let map = Reply::Map(vec![(Reply::Bulk(b"proto".to_vec()), Reply::Integer(3))]);
        assert_eq!(enc(&map, true), "%1\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(enc(&map, false), "*2\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(
            enc(&Reply::Verbatim("txt", "a:1".into()), true),
            "=7\r\ntxt:a:1\r\n"
        );
        assert_eq!(
            enc(&Reply::Verbatim("txt", "a:1".into()), false),
            "$3\r\na:1\r\n"
        );
        assert_eq!(
            enc(&Reply::Error("ERR x\r\ny".into()), false),
            "-ERR xy\r\n"
        );
    }
}
