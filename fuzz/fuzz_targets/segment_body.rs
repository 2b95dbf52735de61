#![no_main]
use std::sync::OnceLock;

static SCRATCH: OnceLock<std::path::PathBuf> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("dr-fuzz-segment_body-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    });
    dr::fuzz::segment_body(data, dir)
});
