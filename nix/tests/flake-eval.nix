# Evaluate flake.nix's outputs against a stand-in nixpkgs (nixpkgs' lib plus
# stub-pkgs.nix), to check what the flake exposes without fetching nixpkgs:
#
#   nix-instantiate --readonly-mode --eval --strict --json nix/tests/flake-eval.nix \
#     --arg lib "import $NIXPKGS_LIB"
#
# Reports the packages, checks and overlay by store path or name; `module` is eval.nix's
# report for a small configuration using nixosModules.default, `vm` its report for the
# VM test's server node (which imports nixosModules.default itself).
{ lib }:

let
  flake = import ../../flake.nix;
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (
      system: import ./stub-pkgs.nix { inherit lib system; }
    );
  };
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };
  pkgs = nixpkgs.legacyPackages.x86_64-linux;
  evaluate =
    module: configuration:
    import ./eval.nix {
      inherit
        lib
        pkgs
        module
        configuration
        ;
    };
in
{
  inputs = lib.mapAttrs (_: input: input.url) flake.inputs;
  packages = lib.mapAttrs (_: lib.mapAttrs (_: toString)) outputs.packages;
  checks = lib.mapAttrs (_: lib.mapAttrs (_: check: check.name)) outputs.checks;
  overlay = toString ((outputs.overlays.default pkgs pkgs).port-broker);

  module = evaluate outputs.nixosModules.default {
    services.port-broker = {
      enable = true;
      sockets.http.listen = [ "80" ];
      sockets.http.users = [ "alice" ];
    };
  };

  vm = evaluate { } outputs.checks.x86_64-linux.vm.nodes.server;
  vmTestScript = outputs.checks.x86_64-linux.vm.testScript;
}
