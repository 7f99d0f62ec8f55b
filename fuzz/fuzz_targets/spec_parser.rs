//! Fuzzes the spec parser: any bytes must give specs or located errors,
//! never a panic, a hang or unbounded memory; accepted specs must hold only
//! values that are safe to hand to nix and ssh.
#![no_main]

use cim::spec::{check_address, check_attribute, check_dns_label, check_user, parse_fleet, SpecFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files = [SpecFile {
        path: "specs/fuzz.yaml".to_string(),
        contents: data.to_vec(),
    }];
    match parse_fleet(&files) {
        Ok(fleet) => {
            for host in fleet.hosts.values() {
                assert!(check_dns_label(&host.name).is_ok());
                assert!(check_address(&host.address).is_ok());
                assert!(check_user(&host.user).is_ok());
                assert!(check_attribute(&host.configuration).is_ok());
            }
        }
        Err(errors) => {
            for e in &errors.errors {
                assert!(e.line >= 1 && e.column >= 1, "unlocated error: {e}");
            }
        }
    }
});
