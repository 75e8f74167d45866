#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kvmmanager_fuzz::agent::check_session(data));
