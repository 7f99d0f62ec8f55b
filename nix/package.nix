# The cim binary, built from this repository with nixpkgs' Rust tooling.
# SQLite (rusqlite's `bundled`) and ring are compiled from source by cc.
{ lib, rustPlatform, makeWrapper, openssh, git }:

rustPlatform.buildRustPackage {
  pname = "cim";
  version = "0.1.0";
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == "fuzz"));
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "-p" "cim" ];
  # The test suite needs root, network namespaces and a sandbox fleet.
  doCheck = false;
  nativeBuildInputs = [ makeWrapper ];
  # cim runs ssh for every host connection; nix comes from the system (the
  # NixOS module puts the system's nix on the service's PATH).
  postInstall = ''
    wrapProgram $out/bin/cim --suffix PATH : ${lib.makeBinPath [ openssh git ]}
  '';
  meta = {
    description = "GitOps reconciliation controller for NixOS fleets";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "cim";
    platforms = lib.platforms.linux;
  };
}
