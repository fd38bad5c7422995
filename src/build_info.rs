//! What `--version` reports: enough to tell two binaries apart.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const TARGET: &str = env!("PRIVSTACK_BUILD_TARGET");
pub const GIT_REV: &str = env!("PRIVSTACK_GIT_REV");
pub const ALLOCATOR: &str = "jemalloc";

pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ntarget: ",
    env!("PRIVSTACK_BUILD_TARGET"),
    "\ngit revision: ",
    env!("PRIVSTACK_GIT_REV"),
    "\nallocator: jemalloc"
);
