// placeholder
fn main() {}
