#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| postlog_fuzz::mail_submission(data));
