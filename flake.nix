# An example fleet for cim: copy this file, hosts/ and specs/ into your own
# repository. cim builds
#   nixosConfigurations.<spec.configuration>.config.system.build.toplevel
# for every host in specs/*.yaml, at exactly the commit it reconciles.
# It also exports cim itself: packages.x86_64-linux.cim and
# nixosModules.cim (services.cim), used by hosts/controller.nix.
{
  description = "An example NixOS fleet managed by cim";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      host = name: nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [
          ./hosts/common.nix
          (./hosts + "/${name}.nix")
          self.nixosModules.cim
        ];
      };
    in
    {
      packages.${system} = rec {
        cim = nixpkgs.legacyPackages.${system}.callPackage ./nix/package.nix { };
        default = cim;
      };

      nixosModules.cim = { pkgs, lib, ... }: {
        imports = [ ./nix/module.nix ];
        services.cim.package = lib.mkDefault self.packages.${pkgs.system}.cim;
      };

      nixosConfigurations = {
        web-1 = host "web-1";
        web-2 = host "web-2";
        db-1 = host "db-1";
        controller = host "controller";
      };
    };
}
