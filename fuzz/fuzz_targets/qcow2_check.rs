#![no_main]
//! Body: `vhost_user_qcow2::fuzz_harness::qcow2_check` (the normal test suite replays the corpus).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhost_user_qcow2::fuzz_harness::qcow2_check(data));
