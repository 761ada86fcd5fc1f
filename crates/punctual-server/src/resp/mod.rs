//! The Redis-protocol front end (issue 9 of the brief, tracker issue 14). So far only its wire codec,
//! [`frame`]: a sans-IO parser for requests and an encoder for RESP2 and RESP3 replies, fuzzed. The
//! listener, the commands (one file each) and the keyspace-event groups come next, on top of a
//! service layer shared with HTTP.

pub mod frame;
