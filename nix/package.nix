# port-broker as a Nix package: the Python application plus the shipped systemd units.
#
# The broker's own units (port-broker.service, port-broker.socket) go to
# $out/lib/systemd/system, where `systemd.packages` finds them, with the executable's
# store path substituted for /usr/local/bin/port-broker; nothing else in them changes, so
# units/port-broker.service stays the one source of truth for the hardening. The
# example port sockets (port-broker-http.socket, port-broker-https.socket) go to
# $out/share/port-broker/units instead: the NixOS module generates one socket unit per
# declared socket, and a packaged unit of the same name would turn the module's unit into
# a drop-in that adds a second ListenStream= for the same port.
#
# Build: `nix build` (flake.nix) or `callPackage ./nix/package.nix { }`.
{
  lib,
  python3Packages,
}:

python3Packages.buildPythonApplication {
  pname = "port-broker";
  version = "0.1.0";
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md # pyproject.toml's `readme`
      ../broker
      ../units
      ../tests
      ../docs/examples
    ];
  };

  build-system = [ python3Packages.setuptools ];

  # pyproject.toml's dependencies.
  dependencies = [
    python3Packages.trio
    # python-systemd: `systemd-python` in current nixpkgs, `systemd` in older ones.
    (python3Packages.systemd-python or python3Packages.systemd)
    python3Packages.pydantic-settings
  ];

  # pyproject.toml's `test` extra.
  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    pytest-trio
    pytest-timeout
    hypothesis
    packaging
  ];

  # Only the tests that need nothing but Python: the others run real processes as other
  # users, boot systemd, or expect Debian's /usr/bin/python3, /usr/bin/node and users
  # (www-data, adm), none of which exist in the build sandbox. nix/tests/vm.nix is
  # the end-to-end test on NixOS.
  enabledTestPaths = [
    "tests/test_protocol.py"
    "tests/test_policy.py"
  ];

  pythonImportsCheck = [
    "broker"
    "broker.cli"
    "broker.daemon.config"
  ];

  postInstall = ''
    install -Dm644 -t $out/lib/systemd/system units/port-broker.service units/port-broker.socket
    substituteInPlace $out/lib/systemd/system/port-broker.service \
      --replace-fail /usr/local/bin/port-broker $out/bin/port-broker
    install -Dm644 -t $out/share/port-broker/units units/port-broker-http.socket units/port-broker-https.socket
  '';

  meta = {
    description = "Hand privileged listening sockets held by systemd to unprivileged workers";
    longDescription = ''
      systemd binds ports 80 and 443 in .socket units and socket-activates port-broker,
      a daemon with no privilege at all. Workers allowed by its policy (users, groups or
      systemd units) receive the listening socket over SCM_RIGHTS and accept on it
      directly: no capability, no setuid helper, no proxy in the data path.
    '';
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "port-broker";
  };
}
