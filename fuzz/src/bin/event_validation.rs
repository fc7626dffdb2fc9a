//! AFL target: event validation and metering (see `neruba_fuzz::event_validation`).
fn main() {
    let catalog = neruba_fuzz::catalog();
    afl::fuzz!(|bytes: &[u8]| neruba_fuzz::event_validation(bytes, &catalog));
}
