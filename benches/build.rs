//! The bench embeds Python (pyo3): point the binary's rpath at the libpython it was built
//! against, so it runs without `LD_LIBRARY_PATH` and embeds the same interpreter as `python3`.

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
