//! Builds tests/c/smoke.c against the committed header and the staticlib, with
//! AddressSanitizer and UBSan, and runs it. Skips (with a note) only when no C compiler exists.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn c_program_links_and_runs_under_asan() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("no C compiler ({cc}); skipping");
        return;
    }
    // Build the staticlib of this profile (cargo test builds only the rlib).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let st = Command::new(&cargo)
        .args(["build", "--lib", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root)
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build --lib failed");
    let lib = target_dir.join("debug").join("libkvmerger.a");
    assert!(lib.exists(), "{} missing", lib.display());

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let exe = out_dir.join("kvm-smoke");
    let out = Command::new(&cc)
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
        ])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/smoke.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "compile failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .current_dir(&out_dir)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .output()
        .expect("run smoke");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("smoke: ok"),
        "smoke failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
}
