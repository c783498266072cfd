#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvmerger_fuzz::plan::run(data));
