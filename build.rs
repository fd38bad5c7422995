//! Records the target triple and git revision for `privstack-relay --version`.

use std::process::Command;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=PRIVSTACK_BUILD_TARGET={target}");

    // A release build from a source tarball has no .git; it may pass the revision in.
    println!("cargo:rerun-if-env-changed=PRIVSTACK_GIT_REV");
    let rev = std::env::var("PRIVSTACK_GIT_REV").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=PRIVSTACK_GIT_REV={}",
        rev.unwrap_or_else(|| "unknown".into())
    );
    if std::path::Path::new(".git/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/refs/heads");
    }
}
