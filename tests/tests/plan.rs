//! End-to-end tests of seeing a change before it lands: `cim plan` against
//! a sandbox fleet (closures compared on the controller and the host,
//! `dry-activate` run on the host), the same plan in `cim status HOST` for
//! a revision that waits, and the summary in the build's and the
//! convergence's events.

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};
use serde_json::Value;

const V1: &str = r#"{ version = 1; packages = { hello = "2.10"; curl = "8.0"; }; units = { "nginx.service" = 1; "cron.service" = 1; }; }"#;
const V2: &str = r#"{ version = 2; packages = { hello = "2.12"; jq = "1.7"; }; units = { "nginx.service" = 2; "metrics.service" = 1; }; }"#;

fn change<'a>(plan: &'a Value, name: &str) -> &'a Value {
    plan["diff"]["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no change of {name} in {plan:#}"))
}

#[test]
fn a_plan_lists_upgraded_packages_and_what_activation_would_do() {
    let (fleet, dir) = fleet(2);
    // web-2 is the canary; web-1 waits for an approval after it.
    let canary = cim_sandbox::host_spec("web-2", &fleet.host("web-2").address, "")
        .replace("{role: web}", "{role: canary}");
    let specs = format!(
        "apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: fleet}}\nspec:\n  waves:\n    - {{name: canary, selector: {{role: canary}}}}\n    - {{name: prod, selector: {{role: web}}, approval: manual}}\n---\n{canary}---\n{}",
        cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, "")
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    fleet.set_host_config("web-1", V1).unwrap();
    let first = fleet.commit("web-1 runs hello and curl").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_until(
        "the first approval asked for",
        std::time::Duration::from_secs(60),
        |_| {
            cim.events()
                .iter()
                .any(|e| e["reason"] == "ApprovalRequired")
        },
    );
    assert!(cim.cli(&["approve", &first]).status.success());
    cim.wait_converged(&["web-1", "web-2"], Some(&first));
    let before = fleet.current_system("web-1").unwrap();

    fleet.set_host_config("web-1", V2).unwrap();
    let revision = fleet
        .commit("web-1: hello 2.12, jq instead of curl")
        .unwrap();
    cim.wait_until(
        "the revision waiting for approval",
        std::time::Duration::from_secs(60),
        |_| {
            cim.events()
                .iter()
                .any(|e| e["reason"] == "ApprovalRequired" && e["revision"] == revision.as_str())
        },
    );

    let out = cim.cli(&["plan", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["revision"], revision.as_str());
    let hosts = plan["hosts"].as_array().unwrap();
    let web1 = hosts.iter().find(|h| h["host"] == "web-1").unwrap();
    let web2 = hosts.iter().find(|h| h["host"] == "web-2").unwrap();
    assert_eq!(web2["changes"], false, "{web2:#}");
    assert_eq!(web1["changes"], true, "{web1:#}");
    assert_eq!(web1["current"], before.as_str());
    let hello = change(web1, "hello");
    assert_eq!(hello["from"], serde_json::json!(["2.10"]));
    assert_eq!(hello["to"], serde_json::json!(["2.12"]));
    assert_eq!(change(web1, "curl")["to"], serde_json::json!([]));
    assert_eq!(change(web1, "jq")["from"], serde_json::json!([]));
    let activation = &web1["activation"];
    assert_eq!(activation["restart"], serde_json::json!(["nginx.service"]));
    assert_eq!(activation["stop"], serde_json::json!(["cron.service"]));
    assert_eq!(activation["start"], serde_json::json!(["metrics.service"]));
    // Planning changed nothing the host runs.
    assert_eq!(fleet.current_system("web-1").unwrap(), before);
    assert!(!fleet
        .activations("web-1")
        .iter()
        .any(|a| a.contains(web1["desired"].as_str().unwrap())));

    let out = cim.cli(&["plan", &revision[..10], "--host", "web-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 of 1 hosts change"), "{text}");
    assert!(
        text.contains("1 package upgraded, 1 added, 1 removed"),
        "{text}"
    );
    assert!(text.contains("2.10 -> 2.12"), "{text}");
    assert!(
        text.contains("activation would restart: nginx.service"),
        "{text}"
    );

    let out = cim.cli(&["status", "web-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Plan of revision"), "{text}");
    assert!(text.contains("1 package upgraded"), "{text}");

    let out = cim.cli(&["plan", "--host", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no host named nope"));

    assert!(cim.cli(&["approve", &revision]).status.success());
    cim.wait_converged(&["web-1"], Some(&revision));
    let converged = cim.events_of("web-1", "Converged");
    let last = converged.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        last.contains("1 package upgraded, 1 added, 1 removed"),
        "{last}"
    );
    let built = cim.events_of("web-1", "BuildSucceeded");
    assert!(
        built.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("1 package upgraded")),
        "{built:?}"
    );
}

#[test]
fn a_branch_not_yet_merged_is_planned_and_nothing_lands_until_merged() {
    let (fleet, dir) = fleet(1);
    fleet.set_host_config("web-1", V1).unwrap();
    let main = fleet.commit("web-1 runs hello and curl").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], Some(&main));
    let running = fleet.current_system("web-1").unwrap();

    // A pull request's branch: proposed, not merged.
    fleet.git(&["checkout", "-q", "-b", "next"]).unwrap();
    fleet.set_host_config("web-1", V2).unwrap();
    let proposed = fleet.commit("web-1: hello 2.12").unwrap();
    fleet.git(&["checkout", "-q", "main"]).unwrap();

    let out = cim.cli(&["plan", "next", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["revision"], proposed.as_str());
    let web1 = &plan["hosts"][0];
    assert_eq!(web1["changes"], true, "{web1:#}");
    assert_eq!(change(web1, "hello")["to"], serde_json::json!(["2.12"]));

    // Nothing landed: the watched branch and the host are as they were.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(fleet.current_system("web-1").unwrap(), running);
    assert_eq!(cim.status()["revision"], main.as_str());

    // Merged, the planned change lands: planning it (a fetch into the
    // controller's mirror beside the watched branch) does not stop the
    // controller from following the branch.
    fleet.git(&["merge", "-q", "--ff-only", "next"]).unwrap();
    cim.wait_converged(&["web-1"], Some(&proposed));
    assert_ne!(fleet.current_system("web-1").unwrap(), running);

    let out = cim.cli(&["plan", "no-such-branch"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("fetching it as a branch"), "{said}");
    let out = cim.cli(&["plan", "a:b"]);
    assert!(!out.status.success());
}
