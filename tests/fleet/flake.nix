# The sandbox fleet's flake. It has no inputs, because these machines cannot
# download nixpkgs: each host's "system" is a small derivation whose
# switch-to-configuration records the activation in /run/cim-activations and
# points /run/current-system at itself. hosts/NAME.nix sets the host's
# `version` (change it to make a new system) and, to simulate a broken
# activation, `activationExitCode`, or `breakNetwork = true` for a system
# that takes the host's network link down, `activationDelay` (seconds) for a
# slow activation, `healthy = false` for a system whose /run/cim-health says
# it is degraded, `buildDelay` (seconds) for a slow build and `payloadKiB`
# for a larger closure (slow to copy over a throttled link), `nonce` to force
# a fresh build that the machine's store cannot already hold, `packages`
# (an attribute set of name = version: each a package in the system's
# closure, for plans to compare), `units` (name = anything: the system's
# "systemd units"; dry-activate says which it would start, stop or
# restart), `kernel` (a version, default "6.1": the system's kernel, initrd
# and modules; a change needs a reboot). A hosts/NAME.nix that throws is an
# evaluation error of that host alone. sandbox/eval-cost.nix (a number,
# default 0) gives every configuration one shared, expensive expression to
# evaluate, the way every NixOS configuration imports nixpkgs: one
# evaluation of the fleet pays it once, a per-host evaluation every time.
{
  description = "cim sandbox fleet";

  outputs = { self }:
    let
      files = builtins.attrNames (builtins.readDir ./hosts);
      evalCost = if builtins.pathExists ./sandbox/eval-cost.nix then import ./sandbox/eval-cost.nix else 0;
      shared = builtins.foldl' (a: b: a + b) 0 (builtins.genList (x: x * x) evalCost);
      nameOf = file: builtins.substring 0 (builtins.stringLength file - 4) file;
      # A small store object named NAME (a package, a kernel); TEXT is its
      # content.
      mkThing = name: text: derivation {
        inherit name text;
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "/bin/mkdir -p $out && echo \"$text\" > $out/content" ];
      };
      mkSystem = name: cfg: let kernel = toString (cfg.kernel or "6.1"); in derivation {
        name = "nixos-system-${name}-${toString cfg.version}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ ./sandbox/builder.sh ];
        hostName = name;
        version = toString cfg.version;
        activationExitCode = toString (cfg.activationExitCode or 0);
        breakNetwork = if cfg.breakNetwork or false then "1" else "0";
        activationDelay = toString (cfg.activationDelay or 0);
        healthy = if cfg.healthy or true then "1" else "0";
        buildDelay = toString (cfg.buildDelay or 0);
        payloadKiB = toString (cfg.payloadKiB or 0);
        nonce = cfg.nonce or "";
        shared = toString shared;
        packages = map (p: mkThing "${p}-${cfg.packages.${p}}" p) (builtins.attrNames (cfg.packages or { }));
        units = builtins.concatStringsSep "\n" (map (u: "${u}=${toString cfg.units.${u}}") (builtins.attrNames (cfg.units or { })));
        kernel = mkThing "linux-${kernel}" "kernel ${kernel}";
        kernelModules = mkThing "linux-${kernel}-modules" "modules ${kernel}";
        initrd = mkThing "initrd-linux-${kernel}" "initrd ${kernel}";
      };
      host = file: {
        name = nameOf file;
        value.config.system.build.toplevel = mkSystem (nameOf file) (import (./hosts + "/${file}"));
      };
    in
    {
      nixosConfigurations = builtins.listToAttrs (map host files);
    };
}
