//! wharf's benchmark suite (placeholder while it is being written).
fn main() {}
