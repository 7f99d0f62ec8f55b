//! Hostile or broken input must give a located `SpecInvalid`-style
//! error, never a panic or an unbounded amount of work.
use super::*;

fn first_error(text: &str) -> String {
    let files = [SpecFile {
        path: "specs/x.yaml".into(),
        contents: text.as_bytes().to_vec(),
    }];
    parse_fleet(&files).unwrap_err().errors[0].to_string()
}

#[test]
fn tabs_for_indentation() {
    let e = first_error("apiVersion: cim/v1\nkind: Host\nmetadata:\n\tname: web-1\n");
    assert!(e.starts_with("specs/x.yaml:4:"), "{e}");
}

#[test]
fn anchor_bombs_hit_the_budget() {
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = (b'a' + i - 1) as char;
        let cur = (b'a' + i) as char;
        bomb.push_str(&format!(
            "{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    let start = std::time::Instant::now();
    let e = first_error(&bomb);
    assert!(e.starts_with("specs/x.yaml:"), "{e}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn deep_nesting() {
    let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let e = first_error(&text);
    assert!(e.starts_with("specs/x.yaml:"), "{e}");
}

#[test]
fn a_document_that_is_not_a_mapping() {
    let e = first_error("- just\n- a list\n");
    assert!(e.starts_with("specs/x.yaml:1:"), "{e}");
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = parse_fleet(&[SpecFile { path: "specs/f.yaml".into(), contents: bytes }]);
    }

    #[test]
    fn arbitrary_text_near_a_valid_spec_never_panics(
        junk in "[ -~\t\n]{0,64}",
        at in 0usize..140,
    ) {
        let base = "apiVersion: cim/v1\nkind: Host\nmetadata:\n  name: web-1\nspec:\n  address: 10.0.0.2\n  port: 22\n";
        let at = at.min(base.len());
        let text = format!("{}{junk}{}", &base[..at], &base[at..]);
        if let Ok(fleet) = parse_fleet(&[SpecFile { path: "specs/f.yaml".into(), contents: text.into_bytes() }]) {
            for host in fleet.hosts.values() {
                proptest::prop_assert!(check_dns_label(&host.name).is_ok());
                proptest::prop_assert!(check_address(&host.address).is_ok());
                proptest::prop_assert!(check_attribute(&host.configuration).is_ok());
            }
        }
    }
}
