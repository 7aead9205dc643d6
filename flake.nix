{
  description = "port-broker: hand privileged listening sockets held by systemd to unprivileged workers";

  # No flake.lock is committed: `nix flake lock` (or the first `nix build`) pins nixpkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        port-broker = pkgs.callPackage ./nix/package.nix { };
        default = port-broker;
      });

      overlays.default = final: prev: {
        port-broker = final.callPackage ./nix/package.nix { };
      };

      # services.port-broker, with its package defaulting to this flake's.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.port-broker.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm = import ./nix/tests/vm.nix {
          inherit pkgs;
          module = self.nixosModules.default;
        };
      });
    };
}
