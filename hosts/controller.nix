# The host that runs cim itself, through the flake's NixOS module.
{ ... }:
{
  networking.hostName = "controller";
  services.cim = {
    enable = true;
    repository = "git@github.com:example/fleet.git";
    branch = "main";
    sshKeyFile = "/var/lib/cim-secrets/id_ed25519";
    apiTokenFile = "/var/lib/cim-secrets/api-token";
    listen = "127.0.0.1:7878";
    extraArgs = [ "--max-parallel" "20" ];
  };
}
