# Test-only declarations of the NixOS options nix/module.nix writes to, so the module can
# be evaluated with nixpkgs' lib alone (tests/test_nix.py, through eval.nix).
#
# Names and types follow nixpkgs' nixos/lib/systemd-unit-options.nix,
# nixos/modules/system/etc/etc.nix and nixos/modules/misc/assertions.nix. The
# declarations are strict: a definition of an option NixOS does not have (a typo such
# as `listenStream`) is an evaluation error here as it is on NixOS. Nothing is rendered
# by NixOS's code; `unitText` below mirrors nixos/lib/systemd-lib.nix's socketToUnit and
# commonUnitText so that tests can compare a generated socket unit with the shipped one.
#
# `loose` lists other top-level NixOS namespaces (users, networking, containers, ...)
# that example configurations (nix/tests/vm.nix, docs/nixos.md) also set: accepted
# unchecked, since their meaning is NixOS's business, not port-broker's.
{ lib, loose ? [ ] }:

let
  inherit (lib) mkOption types;

  # nixos/lib/systemd-lib.nix
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # nixos/lib/systemd-unit-options.nix: lists concatenate, anything else must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.isList (lib.head defs').value then
        lib.concatMap (def: def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  unitList =
    description:
    mkOption {
      type = types.listOf unitNameType;
      default = [ ];
      inherit description;
    };

  lines =
    description:
    mkOption {
      type = types.lines;
      default = "";
      inherit description;
    };

  commonUnitOptions = {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "If false, the unit is a symlink to /dev/null.";
      };
      overrideStrategy = mkOption {
        type = types.enum [
          "asDropinIfExists"
          "asDropin"
        ];
        default = "asDropinIfExists";
        description = "Whether the definition is a drop-in of a packaged unit.";
      };
      description = mkOption {
        type = types.singleLineStr;
        default = "";
        description = "Description=.";
      };
      documentation = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Documentation=.";
      };
      wantedBy = unitList "Units that want this one.";
      requiredBy = unitList "Units that require this one.";
      upheldBy = unitList "Units that uphold this one.";
      aliases = unitList "Alias names.";
      requires = unitList "Requires=.";
      wants = unitList "Wants=.";
      upholds = unitList "Upholds=.";
      after = unitList "After=.";
      before = unitList "Before=.";
      bindsTo = unitList "BindsTo=.";
      partOf = unitList "PartOf=.";
      conflicts = unitList "Conflicts=.";
      requisite = unitList "Requisite=.";
      onFailure = unitList "OnFailure=.";
      onSuccess = unitList "OnSuccess=.";
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
        description = "The [Unit] section.";
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
        description = "Items whose change restarts the unit on switch.";
      };
      reloadTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
        description = "Items whose change reloads the unit on switch.";
      };
    };
  };

  socketOptions = {
    options = {
      listenStreams = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "ListenStream= lines.";
      };
      listenDatagrams = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "ListenDatagram= lines.";
      };
      socketConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
        description = "The [Socket] section.";
      };
    };
  };

  serviceOptions = {
    options = {
      environment = mkOption {
        type = with types; attrsOf (nullOr (oneOf [ str path package ]));
        default = { };
        description = "Environment variables.";
      };
      path = mkOption {
        type = with types; listOf (oneOf [ package str ]);
        default = [ ];
        description = "Packages on PATH.";
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
        description = "The [Service] section.";
      };
      script = lines "The main process, as a script.";
      scriptArgs = mkOption {
        type = types.str;
        default = "";
        description = "Arguments of the script.";
      };
      preStart = lines "ExecStartPre= script.";
      postStart = lines "ExecStartPost= script.";
      reload = lines "ExecReload= script.";
      preStop = lines "ExecStop= script.";
      postStop = lines "ExecStopPost= script.";
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Restart on switch when changed.";
      };
      reloadIfChanged = mkOption {
        type = types.bool;
        default = false;
        description = "Reload on switch when changed.";
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Stop, then start, on switch.";
      };
      startAt = mkOption {
        type = with types; either str (listOf str);
        default = [ ];
        description = "OnCalendar= of a timer.";
      };
    };
  };

  # nixos/lib/systemd-lib.nix: toOption, attrsToSection, commonUnitText, socketToUnit.
  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;
  attrsToSection =
    section:
    lib.concatStrings (
      lib.concatLists (
        lib.mapAttrsToList (
          name: value: map (x: "${name}=${toOption x}\n") (if lib.isList value then value else [ value ])
        ) section
      )
    );
  unitSection =
    unit:
    lib.filterAttrs (_: value: value != "") {
      Description = unit.description;
      Requires = toString unit.requires;
      Wants = toString unit.wants;
      After = toString unit.after;
      Before = toString unit.before;
      BindsTo = toString unit.bindsTo;
      PartOf = toString unit.partOf;
      Conflicts = toString unit.conflicts;
    }
    // unit.unitConfig;
  socketText =
    unit:
    ''
      [Unit]
      ${attrsToSection (unitSection unit)}
      [Socket]
      ${attrsToSection unit.socketConfig}
      ${lib.concatStringsSep "\n" (map (s: "ListenStream=${s}") unit.listenStreams)}
      ${lib.concatStringsSep "\n" (map (s: "ListenDatagram=${s}") unit.listenDatagrams)}
    ''
    + lib.optionalString (unit.wantedBy != [ ]) ''

      [Install]
      WantedBy=${lib.concatStringsSep " " unit.wantedBy}
    '';

  socketModule =
    { config, ... }:
    {
      imports = [
        commonUnitOptions
        socketOptions
      ];
      options.unitText = mkOption {
        type = types.str;
        readOnly = true;
        description = "The unit file NixOS would write (test-only).";
      };
      config.unitText = socketText config;
    };

  etcModule =
    { name, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = "Whether the file is created.";
        };
        target = mkOption {
          type = types.str;
          default = name;
          description = "Path relative to /etc.";
        };
        text = mkOption {
          type = types.nullOr types.lines;
          default = null;
          description = "Contents.";
        };
        source = mkOption {
          type = types.path;
          description = "The file linked to.";
        };
        mode = mkOption {
          type = types.str;
          default = "symlink";
          description = "symlink, direct-symlink, or a mode for a copy.";
        };
        user = mkOption {
          type = types.str;
          default = "+0";
          description = "Owner of a copy.";
        };
        group = mkOption {
          type = types.str;
          default = "+0";
          description = "Group of a copy.";
        };
      };
    };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      internal = true;
      default = [ ];
      description = "Conditions that must hold, with a message each.";
    };
    warnings = mkOption {
      type = types.listOf types.str;
      internal = true;
      default = [ ];
      description = "Messages shown on build.";
    };
    systemd = {
      packages = mkOption {
        type = types.listOf types.package;
        default = [ ];
        description = "Packages providing systemd units.";
      };
      sockets = mkOption {
        type = types.attrsOf (types.submodule socketModule);
        default = { };
        description = "Socket units.";
      };
      services = mkOption {
        type = types.attrsOf (
          types.submodule {
            imports = [
              commonUnitOptions
              serviceOptions
            ];
          }
        );
        default = { };
        description = "Service units.";
      };
    };
    environment = {
      etc = mkOption {
        type = types.attrsOf (types.submodule etcModule);
        default = { };
        description = "Files in /etc.";
      };
      systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
        description = "Packages in the system profile.";
      };
    };
  }
  // {
    # nixos/modules/system/activation/specialisation.nix
    specialisation = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            inheritParentConfig = mkOption {
              type = types.bool;
              default = true;
              description = "Whether the specialisation extends the parent configuration.";
            };
            configuration = mkOption {
              type = types.deferredModule;
              default = { };
              description = "The specialisation's own definitions.";
            };
          };
        }
      );
      default = { };
      description = "Other configurations of the same machine, switched to at run time.";
    };
  }
  // lib.genAttrs loose (
    name:
    mkOption {
      type = types.attrsOf types.anything;
      default = { };
      description = "${name}: not checked in these tests.";
    }
  );
}
