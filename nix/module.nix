# services.port-broker: declare the listening sockets and who may take them; get the
# systemd sockets, the broker and its policy file.
#
# The broker's service and control socket are the shipped units (units/port-broker.service
# and units/port-broker.socket), installed by nix/package.nix and taken from the package
# with `systemd.packages`. This module adds drop-ins to them only for what NixOS must
# add (enabling the control socket, restarting the broker when its policy changes) and
# never restates a [Service] directive: the shipped unit is the one source of truth for
# the hardening, which tests/test_nix.py checks.
#
# Must never: grant anything the configuration did not name (the policy is deny by
# default), or let a configuration through that the broker would refuse at start when an
# assertion can say what to change instead.
#
# docs/nixos.md is the user's guide, with a NixOS container example.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    attrNames
    concatLists
    concatMap
    concatStringsSep
    filter
    filterAttrs
    length
    literalExpression
    mapAttrs
    mapAttrs'
    mapAttrsToList
    match
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    nameValuePair
    optionals
    types
    unique
    ;

  cfg = config.services.port-broker;
  settingsFormat = pkgs.formats.toml { };

  # The broker's own socket (LISTEN_FDNAMES); no rule may name it.
  controlName = "control";
  # As broker/protocol.py NAME_PATTERN: what FileDescriptorName= and the policy accept.
  namePattern = "[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}";

  ruleOptions = what: {
    users = mkOption {
      type = types.listOf (types.either types.ints.u32 types.str);
      default = [ ];
      example = [
        "alice"
        1000
      ];
      description = ''
        Users (names or numeric uids) who may ${what}. Names are looked up when the
        broker starts; use numeric ids for users that exist only in containers or as
        `DynamicUser=`.
      '';
    };
    groups = mkOption {
      type = types.listOf (types.either types.ints.u32 types.str);
      default = [ ];
      example = [ "web" ];
      description = ''
        Groups (names or numeric gids): a process whose gid, or whose user's groups in the
        user database, include one of these may ${what}.
      '';
    };
    units = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "node-app.service"
        "container@web.service"
      ];
      description = ''
        systemd services or scopes (globs allowed, e.g. `machine-*.scope`): processes
        running in them may ${what}. The unit is read from the peer's cgroup, so every
        process of a NixOS container `web` is in `container@web.service`.
      '';
    };
  };

  socketModule = {
    options = {
      listen = mkOption {
        type = types.listOf types.str;
        example = [
          "80"
          "0.0.0.0:8080"
          "[::1]:8081"
        ];
        description = ''
          Addresses systemd binds for this socket, one `ListenStream=` (or
          `ListenDatagram=`) line each, in the syntax of {manpage}`systemd.socket(5)`:
          a bare port such as `"80"` is every IPv4 and IPv6 address.
        '';
      };
      type = mkOption {
        type = types.enum [
          "stream"
          "datagram"
        ];
        default = "stream";
        description = ''
          `stream` (TCP, `ListenStream=`) or `datagram` (UDP, `ListenDatagram=`).
        '';
      };
    }
    // ruleOptions "take this socket";
  };

  ruleOf =
    socket:
    filterAttrs (_: entries: entries != [ ]) {
      inherit (socket) users groups units;
    };

  # A bare port is systemd's dual-stack wildcard: the same as [::]:PORT, which also holds
  # 0.0.0.0:PORT (net.ipv6.bindv6only=0). Other overlaps are left to bind(2).
  claimsOf =
    address:
    let
      port = match "(\\[::]:)?([0-9]+)" address;
    in
    if port != null then
      [
        "[::]:${lib.last port}"
        "0.0.0.0:${lib.last port}"
      ]
    else
      [ address ];

  claims = concatLists (
    mapAttrsToList (
      name: socket:
      concatMap (
        address:
        map (claim: {
          inherit name address;
          key = "${socket.type} ${claim}";
        }) (claimsOf address)
      ) socket.listen
    ) cfg.sockets
  );

  clashes =
    let
      keys = unique (map (c: c.key) claims);
      holders = key: filter (c: c.key == key) claims;
    in
    filter (holders: length holders > 1) (map holders keys);

  clashMessages = unique (
    map (
      holders:
      let
        names = unique (map (h: h.name) holders);
        addresses = unique (map (h: "`${h.address}`") holders);
        type = lib.head (lib.splitString " " (lib.head holders).key);
        where =
          if length names == 1 then
            "services.port-broker.sockets.${lib.head names}.listen"
          else
            "services.port-broker.sockets.{${concatStringsSep "," names}}.listen";
        subject =
          if length addresses == 1 then
            "${lib.head addresses} is listed more than once"
          else
            "${concatStringsSep " and " addresses} are the same ${type} address";
      in
      "${where}: ${subject}; systemd can bind a ${type} address only once (a bare port is "
      + "[::]:PORT, which also holds 0.0.0.0:PORT). Keep it in one socket and remove the others."
    ) clashes
  );

  undeclaredRules = filter (name: !(cfg.sockets ? ${name})) (
    attrNames (cfg.settings.sockets or { })
  );

  policyFile = settingsFormat.generate "broker.toml" cfg.settings;

  # What the broker learns only at start: its sockets. A change restarts it.
  socketsSpec = concatStringsSep " " (
    mapAttrsToList (
      name: socket: "${name}=${socket.type}:${concatStringsSep "," socket.listen}"
    ) cfg.sockets
  );
in
{
  options.services.port-broker = {
    enable = mkEnableOption "port-broker, which hands listening sockets held by systemd to permitted unprivileged workers";

    package = mkPackageOption pkgs "port-broker" {
      extraDescription = ''
        nixpkgs does not carry it: the flake's `nixosModules.default` sets it to the
        flake's package; without the flake, add an overlay with
        `port-broker = final.callPackage ./nix/package.nix { };`.
      '';
    };

    sockets = mkOption {
      type = types.attrsOf (types.submodule socketModule);
      default = { };
      example = literalExpression ''
        {
          http = { listen = [ "80" ]; users = [ "alice" ]; };
          https = { listen = [ "443" ]; units = [ "node-app.service" ]; };
          dns = { listen = [ "53" ]; type = "datagram"; groups = [ "dns" ]; };
        }
      '';
      description = ''
        The sockets systemd binds and the broker hands out, by name. Each becomes a unit
        `port-broker-«name».socket` with `FileDescriptorName=«name»` and
        `Service=port-broker.service`, wanted by `sockets.target`, and a rule
        `[sockets.«name»]` in the policy. Deny by default: only the users, groups and
        units listed may take a socket (root too). A worker takes it with
        `port-broker exec «name» -- command`. The name `control` is the broker's own.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = literalExpression ''
        {
          max_connections = 256;
          client_timeout = 2.5;
          status.users = [ "root" "alice" ];
        }
      '';
      description = ''
        The rest of the broker's policy, `/etc/port-broker/broker.toml`: `status`
        (`users`, `groups`, `units` allowed to run `port-broker status`; default root),
        `max_connections`, `max_connections_per_user`, `client_timeout`, `idle_exit`.
        See docs/configuration.md for every key.
        `sockets` is generated from {option}`services.port-broker.sockets`; entries
        added here for a declared socket are appended to its rule.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(cfg.sockets ? ${controlName});
        message =
          "services.port-broker.sockets.control: `control` is the name of port-broker's own "
          + "control socket (port-broker.socket, FileDescriptorName=control) and cannot be "
          + "granted. Rename the socket, e.g. services.port-broker.sockets.control-api.";
      }
    ]
    ++ mapAttrsToList (name: _: {
      assertion = match namePattern name != null;
      message =
        "services.port-broker.sockets.\"${name}\": not a valid socket name; it becomes "
        + "FileDescriptorName=${name} and the unit port-broker-${name}.socket. Use letters, "
        + "digits and `_.@-`, starting with a letter or digit, at most 64 characters.";
    }) cfg.sockets
    ++ mapAttrsToList (name: socket: {
      assertion = socket.listen != [ ];
      message =
        "services.port-broker.sockets.${name}.listen is empty: systemd would bind nothing "
        + "for socket `${name}`. Give at least one address, e.g. listen = [ \"80\" ]; "
        + "(every IPv4 and IPv6 address), or remove the socket.";
    }) cfg.sockets
    ++ map (message: {
      assertion = false;
      inherit message;
    }) clashMessages
    ++ map (name: {
      assertion = false;
      message =
        "services.port-broker.settings.sockets.${name}: a rule for a socket no "
        + "services.port-broker.sockets.${name} declares; the broker refuses to start "
        + "(exit status 78) when a rule names a socket systemd did not pass. Declare "
        + "services.port-broker.sockets.${name} (listen, users, groups, units) instead.";
    }) undeclaredRules;

    warnings = mapAttrsToList (
      name: socket:
      "services.port-broker.sockets.${name}: nobody may take this socket (users, groups "
      + "and units are all empty), yet systemd holds ${concatStringsSep ", " socket.listen} "
      + "for it. Add users, groups or units, or remove the socket."
    ) (filterAttrs (_: socket: ruleOf socket == { }) cfg.sockets);

    services.port-broker.settings.sockets = mapAttrs (_: ruleOf) cfg.sockets;

    environment.etc."port-broker/broker.toml".source = policyFile;

    # `port-broker exec`, `list`, `status`, `check-config` for everyone.
    environment.systemPackages = [ cfg.package ];

    # port-broker.service and port-broker.socket, exactly as shipped.
    systemd.packages = [ cfg.package ];

    systemd.services.port-broker = {
      overrideStrategy = "asDropin";
      # A new policy is read by a reload (the shipped unit's ExecReload=), which
      # keeps serving; new sockets need a restart, since systemd passes them at start.
      reloadTriggers = [ policyFile ];
      restartTriggers = [ socketsSpec ];
    };

    systemd.sockets = {
      # NixOS ignores [Install]; this is `systemctl enable port-broker.socket`.
      port-broker = {
        overrideStrategy = "asDropin";
        wantedBy = [ "sockets.target" ];
      };
    }
    // mapAttrs' (
      name: socket:
      nameValuePair "port-broker-${name}" {
        description = "port-broker: socket ${name} for permitted workers";
        listenStreams = optionals (socket.type == "stream") socket.listen;
        listenDatagrams = optionals (socket.type == "datagram") socket.listen;
        socketConfig = {
          FileDescriptorName = name;
          Service = "port-broker.service";
        };
        wantedBy = [ "sockets.target" ];
      }
    ) cfg.sockets;
  };
}
