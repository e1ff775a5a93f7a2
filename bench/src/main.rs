//! `bench`: measures replichat (see BENCHMARKS.md).
fn main() {}
