#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dr::fuzz::frames(data));
