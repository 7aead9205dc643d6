# NixOS VM test: port 80 held by systemd and port-broker, a Node server running as the
# ordinary user alice takes it with `port-broker exec`, a second machine's curl reaches
# that server directly (its own address shows in the answer: no proxy), and mallory,
# who is not in the policy, is refused; a policy-only change of the configuration is
# put in force by a reload (same broker process, alice's server untouched), after
# which mallory is granted.
#
#   nix build .#checks.x86_64-linux.vm          (flake.nix; needs KVM for speed)
#
# `module` is the NixOS module with services.port-broker.package set (the flake's
# nixosModules.default).
{ pkgs, module }:

let
  helloJs = ../../docs/examples/hello.js;
in
pkgs.testers.runNixOSTest {
  name = "port-broker";

  nodes.server =
    { config, lib, pkgs, ... }:
    {
      imports = [ module ];

      services.port-broker = {
        enable = true;
        sockets.http = {
          listen = [ "80" ];
          users = [ "alice" ];
        };
      };

      users.users.alice.isNormalUser = true;
      users.users.mallory.isNormalUser = true;

      systemd.services.hello = {
        description = "Node worker on port 80 through port-broker";
        wantedBy = [ "multi-user.target" ];
        requires = [ "port-broker.socket" ];
        after = [
          "port-broker.socket"
          "port-broker-http.socket"
        ];
        serviceConfig = {
          User = "alice";
          ExecStart = "${lib.getExe config.services.port-broker.package} exec http -- ${lib.getExe pkgs.nodejs} ${helloJs}";
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          NoNewPrivileges = true;
        };
      };

      networking.firewall.allowedTCPPorts = [ 80 ];

      # The same machine with one policy change: mallory may take http too.
      specialisation.mallory-too = {
        inheritParentConfig = true;
        configuration.services.port-broker.sockets.http.users = lib.mkForce [
          "alice"
          "mallory"
        ];
      };
    };

  nodes.client =
    { pkgs, ... }:
    {
      environment.systemPackages = [ pkgs.curl ];
    };

  testScript = ''
    import re

    start_all()
    server.wait_for_unit("port-broker-http.socket")
    server.wait_for_unit("hello.service")

    with subtest("the broker runs the shipped, hardened unit from the package"):
        unit = server.succeed("systemctl cat port-broker.service")
        for directive in ["DynamicUser=yes", "ProtectSystem=strict", "CapabilityBoundingSet=",
                          "PrivateNetwork=yes", "RestrictAddressFamilies=AF_UNIX"]:
            assert re.search(rf"^{re.escape(directive)}$", unit, re.M), f"{directive} missing:\n{unit}"
        assert re.search(r"^ExecStart=/nix/store/\S+/bin/port-broker serve$", unit, re.M), unit
        server.succeed("port-broker check-config /etc/port-broker/broker.toml")

    with subtest("alice cannot bind port 80 herself"):
        # EACCES, not EADDRINUSE: the kernel checks the privilege before the port.
        denied = server.fail("runuser -u alice -- ${pkgs.nodejs}/bin/node -e "
                             "'require(\"net\").createServer().listen(80)' 2>&1")
        assert "EACCES" in denied, denied

    with subtest("alice's Node server answers on port 80, with no capability"):
        answer = server.wait_until_succeeds("curl -sSf --max-time 5 http://localhost/")
        uid = server.succeed("id -u alice").strip()
        assert f"uid {uid}," in answer, answer
        pid = server.succeed("systemctl show -p MainPID --value hello.service").strip()
        caps = server.succeed(f"grep ^CapEff /proc/{pid}/status")
        assert caps.split()[1] == "0000000000000000", caps

    with subtest("the client reaches it directly, with its own address"):
        client.wait_for_unit("multi-user.target")
        address = client.succeed("ip -4 -o addr show dev eth1").split()[3].split("/")[0]
        answer = client.succeed("curl -sSf --max-time 5 http://server/")
        assert f"client ::ffff:{address}" in answer or f"client {address}" in answer, answer

    with subtest("mallory is not in the policy and is refused"):
        status, output = server.execute(
            "runuser -u mallory -- port-broker exec http -- ${pkgs.coreutils}/bin/true 2>&1")
        assert status == 77, f"exit status {status}: {output}"
        assert "may not acquire socket 'http'" in output, output

    with subtest("a policy-only change reloads the broker instead of restarting it"):
        import json
        def broker_state():
            pid = server.succeed("systemctl show -p MainPID --value port-broker.service").strip()
            report = json.loads(server.succeed("port-broker status --json"))
            return pid, report["configuration"]["generation"]
        pid, generation = broker_state()
        switch = server.succeed(
            "/run/booted-system/specialisation/mallory-too/bin/switch-to-configuration test 2>&1")
        reloaded = re.search(r"^reloading the following units: (.*)$", switch, re.M)
        assert reloaded and "port-broker.service" in reloaded.group(1).split(", "), switch
        restarted = re.search(r"^restarting the following units: (.*)$", switch, re.M)
        assert not restarted or "port-broker.service" not in restarted.group(1), switch
        assert broker_state() == (pid, generation + 1)
        server.succeed("runuser -u mallory -- port-broker exec http -- ${pkgs.coreutils}/bin/true")
        answer = server.succeed("curl -sSf --max-time 5 http://localhost/")  # alice serves on
        assert "hello from node" in answer, answer
  '';
}
