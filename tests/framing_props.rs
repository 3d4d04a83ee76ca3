//! Property tests for the framer: TCP may cut a client's bytes anywhere, so any split of the
//! same bytes into reads must give the same requests (SPEC §3), in line and stream framing.

use command_trigger::framing::{Frame, Framing, next_frame};
use proptest::prelude::*;

/// What one connection's bytes became: its requests, and whether it ended too large.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    requests: Vec<(Vec<u8>, Vec<u8>)>,
    too_large: bool,
}

/// Feeds `input` cut at `cuts` as the event loop does: frame after every read, then at EOF.
fn frame(framing: Framing, input: &[u8], cuts: &[usize], max: usize) -> Outcome {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    bounds.extend([0, input.len()]);
    bounds.sort_unstable();
    let mut buf = Vec::new();
    let mut outcome = Outcome {
        requests: Vec::new(),
        too_large: false,
    };
    let reads = bounds.windows(2).map(|w| &input[w[0]..w[1]]);
    for (read, eof) in reads.map(|r| (r, false)).chain([(&[][..], true)]) {
        buf.extend_from_slice(read);
        loop {
            match next_frame(framing, &mut buf, eof, max) {
                Frame::Request(raw) => outcome.requests.push((raw.line, raw.body)),
                Frame::TooLarge => {
                    outcome.too_large = true;
                    return outcome;
                }
                Frame::Incomplete => break,
                other => panic!("{other:?} from a non-HTTP framer"),
            }
        }
    }
    outcome
}

/// Request-like bytes: words, blanks, `\r`, `\n` and the odd arbitrary byte.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => proptest::collection::vec(b'a'..=b'z', 1..12),
        2 => Just(b" ".to_vec()),
        1 => Just(b"\t".to_vec()),
        2 => Just(b"\n".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn line_requests_do_not_depend_on_how_reads_are_cut(
        input in wire_bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        max in 4usize..64,
    ) {

        let whole = frame(Framing::Line, &input, &[], max);
        let bytewise: Vec<usize> = (0..input.len()).collect();
        prop_assert_eq!(&frame(Framing::Line, &input, &cuts, max), &whole);
        prop_assert_eq!(&frame(Framing::Line, &input, &bytewise, max), &whole);
    }

    #[test]
    fn stream_requests_do_not_depend_on_how_reads_are_cut(
        input in wire_bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        max in 4usize..512,
    ) {
        let whole = frame(Framing::Stream, &input, &[], max);
        let bytewise: Vec<usize> = (0..input.len()).collect();
        prop_assert_eq!(&frame(Framing::Stream, &input, &cuts, max), &whole);
        prop_assert_eq!(&frame(Framing::Stream, &input, &bytewise, max), &whole);
    }

    #[test]
    fn line_requests_are_the_non_empty_lines_without_cr(
        input in wire_bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        // A limit no line reaches: every line is a request.
        let got = frame(Framing::Line, &input, &cuts, 4096);
        let expected: Vec<(Vec<u8>, Vec<u8>)> = input
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .filter(|l| !l.is_empty())
            .map(|l| (l, Vec::new()))
            .collect();
        prop_assert!(!got.too_large);
        prop_assert_eq!(got.requests, expected);
    }
}
