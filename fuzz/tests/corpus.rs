//! The targets' bodies over the committed corpus (`corpus/<target>/*`), plus a few thousand
//! inputs from a fixed seed: what CI runs when no nightly toolchain (and so no libFuzzer) is
//! at hand. `KVM_FUZZ_CASES` sets the number of generated inputs per target.

use kvmerger_fuzz::input::Rng;
use kvmerger_fuzz::TARGETS;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

fn run(target: &str, body: fn(&[u8])) {
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "no corpus for {target}");
    for (name, data) in &seeds {
        let r = std::panic::catch_unwind(|| body(data));
        assert!(r.is_ok(), "{target}: {name} fails");
    }
    let cases: usize = std::env::var("KVM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut rng = Rng(0x6b76_6d66 ^ target.len() as u64);
    for i in 0..cases {
        // Random bytes, and corpus inputs with a few bytes changed: the mutations libFuzzer
        // starts from.
        let mut data = if seeds.is_empty() || i % 2 == 0 {
            (0..rng.below(160))
                .map(|_| rng.next_u64() as u8)
                .collect::<Vec<u8>>()
        } else {
            seeds[rng.below(seeds.len())].1.clone()
        };
        for _ in 0..rng.below(4) {
            if !data.is_empty() {
                let j = rng.below(data.len());
                data[j] = rng.next_u64() as u8;
            }
        }
        let r = std::panic::catch_unwind(|| body(&data));
        assert!(r.is_ok(), "{target}: generated input {i} fails: {data:?}");
    }
}

#[test]
fn plan() {
    run("plan", TARGETS[0].1);
}

#[test]
fn views() {
    run("views", TARGETS[1].1);
}

#[test]
fn attention() {
    run("attention", TARGETS[2].1);
}

#[test]
fn calib() {
    run("calib", TARGETS[3].1);
}

#[test]
fn sequence() {
    run("sequence", TARGETS[4].1);
}
