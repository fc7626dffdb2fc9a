//! AFL target: the events-topic decoder (see `neruba_fuzz::event_decoder`).
fn main() {
    afl::fuzz!(|bytes: &[u8]| neruba_fuzz::event_decoder(bytes));
}
