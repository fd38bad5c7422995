//! What `--version` reports: enough to tell two binaries apart.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const TARGET: &str = env!("PRIVSTACK_BUILD_TARGET");
pub const GIT_REV: &str = env!("PRIVSTACK_GIT_REV");
pub const ALLOCATOR: &str = "jemalloc";

const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ntarget: ",
    env!("PRIVSTACK_BUILD_TARGET"),
    "\ngit revision: ",
    env!("PRIVSTACK_GIT_REV"),
    "\nallocator: jemalloc"
);

/// `--version`'s long output: the build, and the QUIC cipher order this CPU gets.
pub fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{LONG_VERSION}\nQUIC cipher order: {}",
            crate::quic::CipherOrder::detect().describe()
        )
    })
}
