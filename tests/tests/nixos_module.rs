//! The NixOS side of the repository, checked without nixpkgs (which these
//! machines cannot fetch): every `.nix` file parses (`nix-instantiate
//! --parse`), and every option of `services.cim` is documented in the
//! README, which says which NixOS release the module was written for.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                nix_files(&path, out);
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(&repo(), &mut files);
    assert!(files.iter().any(|f| f.ends_with("nix/module.nix")));
    for file in files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&file)
            .output()
            .expect("nix-instantiate (scripts/setup installs nix-bin)");
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_modules_options_are_the_documented_ones() {
    let module = std::fs::read_to_string(repo().join("nix/module.nix")).unwrap();
    let options: Vec<&str> = module
        .lines()
        .filter(|l| l.contains("= lib.mkOption") || l.contains("= lib.mkEnableOption"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for wanted in [
        "enable",
        "repository",
        "branch",
        "sshConfig",
        "sshKeyFile",
        "apiTokenFile",
        "listen",
        "extraArgs",
    ] {
        assert!(
            options.contains(&wanted),
            "services.cim.{wanted} missing: {options:?}"
        );
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for option in &options {
        assert!(
            readme.contains(&format!("services.cim.{option}")),
            "README does not document services.cim.{option}"
        );
    }
    assert!(
        readme.contains("NixOS 25.05"),
        "README names the NixOS release"
    );
    let flake = std::fs::read_to_string(repo().join("flake.nix")).unwrap();
    assert!(flake.contains("nixosModules.cim") && flake.contains("packages.${system}"));
}
