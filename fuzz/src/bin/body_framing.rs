//! AFL target: splitting request bodies into events (see `neruba_fuzz::body_framing`).
fn main() {
    afl::fuzz!(|bytes: &[u8]| neruba_fuzz::body_framing(bytes));
}
