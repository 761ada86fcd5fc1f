//! The Redis-protocol request parser: any bytes are requests, a wait for more, or a protocol error;
//! never a panic, and a parsed request never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use punctual_server::resp::frame::{Reply, parse};

fuzz_target!(|bytes: &[u8]| {
    let mut rest = bytes;
    while let Ok(Some((args, used))) = parse(rest) {
        assert!(used > 0 && used <= rest.len());
        // Echoing the arguments back encodes in both protocols.
        let reply = Reply::Array(args.into_iter().map(Reply::Bulk).collect());
        let mut out = Vec::new();
        reply.encode(false, &mut out);
        reply.encode(true, &mut out);
        rest = &rest[used..];
    }
});
