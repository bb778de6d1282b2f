//! Fuzzes `kms-plugin inventory`'s reading of etcd values: any bytes must classify (and
//! aggregate into the report) without a panic.
#![no_main]

use kms_plugin::inventory::{format, report::Report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stored = format::parse(data);
    let mut report = Report::new("/registry/", false);
    report.add("secrets", "/registry/secrets/ns/x", &stored, None);
    report.finish(Some("sha256:00"));
    let _ = report.to_table();
});
