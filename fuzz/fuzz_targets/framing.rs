//! The framer over arbitrary bytes cut into arbitrary reads, as the event loop calls it: after
//! each read, take requests until it needs more; at the end, once more with `eof`.
//!
//! Checked besides "never panics": every request consumes bytes (else the loop would dispatch
//! forever); line and stream requests are exactly what a plain model of SPEC §3 gives for the
//! whole input; `TooLarge` exactly when a line (or the stream request) is past the limit, however
//! the reads are cut; never waiting for more with more than the limit (+1 for a `\r`) buffered.

#![no_main]

#[path = "../common/framer.rs"]
mod framer;

use command_trigger::framing::Framing;
use framer::Framer;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    framing: u8,
    max: u8,
    reads: Vec<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let framing = match input.framing % 3 {
        0 => Framing::Line,
        1 => Framing::Stream,
        _ => Framing::Http,
    };
    let max = 1 + usize::from(input.max);
    let mut framer = Framer::new(framing, max);
    for read in &input.reads {
        framer.read(read);
    }
    let seen = framer.eof();
    framer::check(framing, &input.reads.concat(), max, &seen);
});
