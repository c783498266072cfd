#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvmerger_fuzz::attention::run(data));
