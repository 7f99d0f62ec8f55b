# Settings every host shares. cim reaches hosts over SSH as root (or the
# spec's `user`), copies closures with `nix copy` and runs
# switch-to-configuration, so sshd and nix must work on every host.
{ lib, ... }:
{
  services.openssh = {
    enable = true;
    settings.PermitRootLogin = "prohibit-password";
    settings.PasswordAuthentication = false;
  };

  # The key cim's controller connects with (see --ssh-config).
  users.users.root.openssh.authorizedKeys.keys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIReplaceWithTheControllersPublicKey cim-controller"
  ];

  nix.settings.experimental-features = [ "nix-command" "flakes" ];
  # Closures arrive signed by nobody when copied from the controller as
  # root; trust root's copies.
  nix.settings.trusted-users = [ "root" ];

  boot.loader.grub.device = lib.mkDefault "/dev/vda";
  fileSystems."/" = lib.mkDefault { device = "/dev/vda1"; fsType = "ext4"; };

  time.timeZone = "UTC";
  system.stateVersion = "25.05";
}
