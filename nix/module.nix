# services.cim: the cim controller as a NixOS service. Written for NixOS
# 25.05. State (event log, status, git mirror, ssh sockets) lives in
# /var/lib/cim; the unit is hardened but can still run ssh and talk to the
# nix daemon, which builds the fleet's closures.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.cim;
  sshConfig =
    if cfg.sshConfig != null then cfg.sshConfig
    else if cfg.sshKeyFile != null then
      pkgs.writeText "cim-ssh-config" ''
        Host *
          IdentityFile ${cfg.sshKeyFile}
          IdentitiesOnly yes
          BatchMode yes
      ''
    else null;
  args =
    [ "run" "--repo" cfg.repository "--branch" cfg.branch
      "--state-dir" "/var/lib/cim" "--listen" cfg.listen ]
    ++ lib.optionals (sshConfig != null) [ "--ssh-config" "${sshConfig}" ]
    ++ lib.optionals (cfg.apiTokenFile != null) [ "--api-token-file" cfg.apiTokenFile ]
    ++ cfg.extraArgs;
in
{
  options.services.cim = {
    enable = lib.mkEnableOption "cim, the GitOps reconciliation controller for NixOS fleets";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The cim package (the flake's `packages.<system>.cim`).";
    };

    repository = lib.mkOption {
      type = lib.types.str;
      example = "git@github.com:example/fleet.git";
      description = "Path or URL of the fleet's git repository (`--repo`).";
    };

    branch = lib.mkOption {
      type = lib.types.str;
      default = "main";
      description = "The branch whose head is the desired state (`--branch`).";
    };

    sshConfig = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "An ssh_config for every ssh call (`--ssh-config`); takes precedence over `sshKeyFile`.";
    };

    sshKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/cim-secrets/id_ed25519";
      description = "The private key cim logs in to hosts with (a string, so it stays out of the Nix store).";
    };

    apiTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "A file holding the API token (`--api-token-file`); required when `listen` is not a loopback address.";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:7878";
      description = "Where the API, dashboard and /metrics listen (`--listen`).";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--max-parallel" "20" "--require-signed-commits" "--allowed-signers" "/etc/cim/allowed_signers" ];
      description = "More `cim run` arguments.";
    };
  };

  config = lib.mkIf cfg.enable {
    systemd.services.cim = {
      description = "cim, GitOps for this NixOS fleet";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      path = [ config.nix.package pkgs.openssh pkgs.git ];
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} ${lib.escapeShellArgs args}";
        Restart = "on-failure";
        RestartSec = "5s";
        StateDirectory = "cim";
        StateDirectoryMode = "0700";
        WorkingDirectory = "/var/lib/cim";
        # Hardening that leaves what cim needs: outbound network (ssh, git),
        # the nix daemon's socket, its own state directory.
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ "/var/lib/cim" "/nix/var/nix/daemon-socket" ];
        ProtectHome = "read-only";
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        SystemCallArchitectures = "native";
        UMask = "0077";
      };
    };
  };
}
