# Evaluate nix/module.nix with nixpkgs' lib alone and report, as JSON, what it generates:
#
#   nix-instantiate --readonly-mode --eval --strict --json nix/tests/eval.nix \
#     --arg lib "import $NIXPKGS_LIB" --arg configuration ./some-config.nix
#
# `configuration` is any NixOS-style module setting services.port-broker (a path, an
# attribute set or a function); `module` may name another copy of the module (the tests
# evaluate deliberately broken copies, to show they would catch them). NixOS's own
# options are the test-only declarations in nixos-options.nix; pkgs is stub-pkgs.nix.
# tests/test_nix.py runs this; the NixOS VM test (vm.nix) is the real thing.
{
  lib,
  pkgs ? import ./stub-pkgs.nix { inherit lib; },
  configuration ? { },
  module ? ../module.nix,
  loose ? [
    "users"
    "networking"
    "containers"
    "system"
  ],
}:

let
  evaluated = lib.evalModules {
    modules = [
      (import ./nixos-options.nix { inherit lib loose; })
      module
      configuration
      { _module.args.pkgs = pkgs; }
    ];
  };
  inherit (evaluated) config options;

  storePath = package: toString package;
  policy = config.environment.etc."port-broker/broker.toml".source or null;

  describe =
    option:
    {
      name = option.name;
      description = option.description or null;
      type = option.type or null;
      internal = option.internal or false;
    };
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;

  sockets = lib.mapAttrs (_: unit: {
    inherit (unit)
      description
      listenStreams
      listenDatagrams
      socketConfig
      wantedBy
      overrideStrategy
      unitText
      ;
  }) config.systemd.sockets;

  services = lib.mapAttrs (_: unit: {
    inherit (unit)
      serviceConfig
      overrideStrategy
      wantedBy
      environment
      ;
    restartTriggers = map toString unit.restartTriggers;
    reloadTriggers = map toString unit.reloadTriggers;
  }) config.systemd.services;

  packages = map storePath config.systemd.packages;
  systemPackages = map storePath config.environment.systemPackages;
  etc = lib.mapAttrs (_: file: toString file.source) config.environment.etc;

  # The value formats.toml turns into /etc/port-broker/broker.toml, as JSON.
  policy = if policy == null then null else policy.value;

  # Each specialisation, reported the same way (as NixOS builds one: the parent's
  # configuration extended by its own, with no specialisations of its own).
  specialisations = lib.mapAttrs (
    _: spec:
    assert spec.inheritParentConfig;
    import ./eval.nix {
      inherit lib pkgs module loose;
      configuration = {
        imports = [
          configuration
          spec.configuration
        ];
        specialisation = lib.mkOverride 0 { };
      };
    }
  ) config.specialisation;

  # Every option the module declares, with its description (for the docs check).
  options = map describe (
    lib.filter (o: lib.hasPrefix "services.port-broker." o.name) (
      lib.optionAttrSetToDocList options
    )
  );
}
