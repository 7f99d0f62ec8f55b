# An example fleet for cim: copy this file, hosts/ and specs/ into your own
# repository. cim builds
#   nixosConfigurations.<spec.configuration>.config.system.build.toplevel
# for every host in specs/*.yaml, at exactly the commit it reconciles.
{
  description = "An example NixOS fleet managed by cim";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      host = name: nixpkgs.lib.nixosSystem {
        system = "x86_64-linux";
        modules = [ ./hosts/common.nix (./hosts + "/${name}.nix") ];
      };
    in
    {
      nixosConfigurations = {
        web-1 = host "web-1";
        web-2 = host "web-2";
        db-1 = host "db-1";
      };
    };
}
