# A stand-in for the few parts of nixpkgs that nix/module.nix and nix/tests/vm.nix use,
# for evaluating them with nixpkgs' lib alone (tests/test_nix.py, through eval.nix).
#
# Packages are derivation-like attribute sets (never built); `callPackage` knows only
# nix/package.nix's arguments. `formats.toml` has
# nixpkgs' type (pkgs/pkgs-lib/formats.nix) and a `generate` that keeps, as the real one
# does, the value's JSON in the attribute `value` that json2toml would turn into TOML:
# tests read the policy from there.
{
  lib,
  system ? "x86_64-linux",
}:

let
  fakeHash = "00000000000000000000000000000000";
  package =
    pname: version: mainProgram:
    {
      type = "derivation";
      inherit pname version;
      name = "${pname}-${version}";
      outPath = "/nix/store/${fakeHash}-${pname}-${version}";
      meta = {
        inherit mainProgram;
      };
    };
in
rec {
  stdenv.hostPlatform.system = system;

  port-broker = package "port-broker" "0.1.0" "port-broker";
  nodejs = package "nodejs" "22.0.0" "node";
  curl = package "curl" "8.0.0" "curl";
  coreutils = package "coreutils" "9.0" "coreutils";

  formats.toml =
    { }:
    {
      type =
        let
          valueType =
            lib.types.oneOf [
              lib.types.bool
              lib.types.int
              lib.types.float
              lib.types.str
              lib.types.path
              (lib.types.attrsOf valueType)
              (lib.types.listOf valueType)
            ]
            // {
              description = "TOML value";
            };
        in
        valueType;

      generate = name: value: {
        type = "derivation";
        inherit name;
        outPath = "/nix/store/${fakeHash}-${name}";
        value = builtins.toJSON value;
      };
    };

  # nix/tests/vm.nix's argument to runNixOSTest, unevaluated.
  testers.runNixOSTest = test: test;

  # For flake.nix: nix/package.nix's arguments to buildPythonApplication, as a package
  # with a store path of its own (so a test can tell it from `port-broker` above).
  python3Packages.buildPythonApplication =
    args:
    args
    // {
      type = "derivation";
      name = "${args.pname}-${args.version}";
      outPath = "/nix/store/11111111111111111111111111111111-${args.pname}-${args.version}";
    };
  callPackage = fn: args: import fn ({ inherit lib python3Packages; } // args);
}
