//! The `gantry-zero` binary.

fn main() {}
