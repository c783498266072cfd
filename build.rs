//! Build script: CUDA only. A plain build (no `cuda` feature) returns at once and never needs
//! nvcc. With `--features cuda`, every `cuda/*.cu` is compiled by nvcc through `cc` and linked
//! with the static CUDA runtime; `KVM_CUDA_ARCHS` (default "90") picks the SM targets.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=KVM_CUDA_ARCHS");
    let mut files: Vec<_> = std::fs::read_dir("cuda")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"));
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let cu: Vec<&Path> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.as_path())
        .collect();
    if cu.is_empty() {
        return;
    }
    let archs = std::env::var("KVM_CUDA_ARCHS").unwrap_or_else(|_| "90".into());
    let mut b = cc::Build::new();
    b.cuda(true).cudart("static").flag("-O3").flag("-std=c++17");
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        b.flag(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    b.files(cu);
    if let Err(e) = b.try_compile("kvmerger_cuda") {
        panic!("the `cuda` feature needs nvcc (set NVCC or CUDA_PATH): {e}");
    }
    // cc looks for libcudart_static.a only in a full toolkit's layout; the PyPI wheels
    // (nvidia-cuda-runtime) put it in <root>/lib, which cc does not search.
    for root in cuda_roots() {
        for sub in [
            "lib",
            "lib64",
            "targets/x86_64-linux/lib",
            "targets/sbsa-linux/lib",
        ] {
            let d = root.join(sub);
            if d.join("libcudart_static.a").is_file() {
                println!("cargo:rustc-link-search=native={}", d.display());
            }
        }
    }
}

/// Where the toolkit may be: CUDA_PATH, and the directory above the nvcc that cc runs.
fn cuda_roots() -> Vec<std::path::PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = std::env::var_os("CUDA_PATH") {
        roots.push(std::path::PathBuf::from(p));
    }
    let nvcc = std::env::var_os("NVCC")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("nvcc"))
                    .find(|p| p.is_file())
            })
        });
    if let Some(root) = nvcc
        .as_deref()
        .and_then(Path::parent)
        .and_then(Path::parent)
    {
        roots.push(root.to_path_buf());
    }
    roots
}
