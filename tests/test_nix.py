"""Tests for the Nix side: nix/package.nix, nix/module.nix, nix/tests/vm.nix, flake.nix.

Three layers, each with the real `nix-instantiate` (Debian's nix-bin; never the network,
never a store write: `--readonly-mode`):

- Parse: every `.nix` file, and every Nix block in docs/nixos.md.
- Consistency, with no nixpkgs at all: the package's `postInstall` run on the shipped
  units installs `units/port-broker.service` with only the `ExecStart=` path changed;
  the package's Python dependencies are pyproject.toml's; and the module, evaluated with
  a two-function stand-in for lib, sets nothing on `port-broker.service` but NixOS's own
  keys — no `[Service]` directive, so the shipped unit stays the one source of truth
  for the hardening.
- Evaluation, with nixpkgs' lib (`NIXPKGS_LIB=/path/to/nixpkgs/lib`; skipped with that
  reason otherwise): `lib.evalModules` over the module plus test-only declarations of
  the NixOS options it writes (nix/tests/eval.nix): the socket units (compared with the
  shipped `units/port-broker-http.socket`), the policy (handed to the real
  `port-broker check-config`), every assertion and warning message, the flake's outputs,
  the VM test's configuration and the examples in docs/nixos.md. Broken copies of the
  module show that these checks fail when the module generates the wrong unit.

The VM test itself (`nix build .#checks.x86_64-linux.vm`) needs nixpkgs and KVM; it is not
run here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from packaging.requirements import Requirement

ROOT: Final = Path(__file__).resolve().parents[1]
NIX_DIR: Final = ROOT / "nix"
MODULE: Final = NIX_DIR / "module.nix"
PACKAGE: Final = NIX_DIR / "package.nix"
EVAL: Final = NIX_DIR / "tests" / "eval.nix"
FLAKE_EVAL: Final = NIX_DIR / "tests" / "flake-eval.nix"
UNITS: Final = ROOT / "units"
DOCS: Final = ROOT / "docs" / "nixos.md"

STUB_PACKAGE: Final = "/nix/store/00000000000000000000000000000000-port-broker-0.1.0"
"""`pkgs.port-broker` in nix/tests/stub-pkgs.nix: the module's default package."""
FLAKE_PACKAGE: Final = "/nix/store/11111111111111111111111111111111-port-broker-0.1.0"
"""What the stub's buildPythonApplication makes of nix/package.nix (the flake's package)."""
POLICY_PATH: Final = "/nix/store/00000000000000000000000000000000-broker.toml"
SHIPPED_EXECUTABLE: Final = "/usr/local/bin/port-broker"

NIX_TIMEOUT: Final = 120.0
"""Seconds for one nix-instantiate: an evaluation here takes well under a second; a hang
should fail the test, not stall the run."""
CLI_TIMEOUT: Final = 60.0
"""Seconds for `port-broker check-config`, which takes well under one."""

NIX_SERVICE_KEYS: Final = frozenset({"overrideStrategy", "restartTriggers", "reloadTriggers"})
"""All the module may set on systemd.services.port-broker: NixOS's own bookkeeping (a
drop-in, restarted on change), nothing that reaches [Service]."""

EVALUATED_MARK: Final = "<!-- evaluated by tests/test_nix.py -->"

HAVE_NIX: Final = shutil.which("nix-instantiate") is not None
needs_nix = pytest.mark.skipif(
    not HAVE_NIX, reason="needs nix-instantiate (Debian package nix-bin, which .ci/setup installs)"
)
needs_lib = pytest.mark.skipif(
    not HAVE_NIX or not os.environ.get("NIXPKGS_LIB"),
    reason="needs nix-instantiate and nixpkgs' lib: set NIXPKGS_LIB to a nixpkgs lib/ "
    "directory (the nix-community/nixpkgs.lib repository is that directory alone)",
)


class NixError(Exception):
    """nix-instantiate failed; the message is its stderr."""


def nix_instantiate(*args: str) -> str:
    """Run nix-instantiate without store writes or search path; return its stdout."""
    done = subprocess.run(
        ["nix-instantiate", "--readonly-mode", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NIX_PATH": ""},
        timeout=NIX_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise NixError(done.stderr.strip())
    return done.stdout


def nix_json(*args: str) -> Any:
    return json.loads(nix_instantiate("--eval", "--strict", "--json", *args))


def nixpkgs_lib() -> Path:
    """The nixpkgs lib directory named by $NIXPKGS_LIB (or the nixpkgs tree holding it)."""
    path = Path(os.environ["NIXPKGS_LIB"])
    for candidate in (path, path / "lib"):
        if (candidate / "default.nix").is_file() and (candidate / "modules.nix").is_file():
            return candidate
    pytest.fail(f"NIXPKGS_LIB={path}: no nixpkgs lib there (expected default.nix, modules.nix)")


def lib_arg() -> list[str]:
    return ["--arg", "lib", f"import {nixpkgs_lib()}"]


def evaluate(
    tmp_path: Path, configuration: str, module: Path | None = None, name: str = "config.nix"
) -> dict[str, Any]:
    """Evaluate `configuration` (Nix module text) with the module through eval.nix."""
    path = tmp_path / name
    path.write_text(configuration)
    args = [str(EVAL), *lib_arg(), "--arg", "configuration", str(path)]
    if module is not None:
        args += ["--arg", "module", str(module)]
    result: dict[str, Any] = nix_json(*args)
    return result


def enabled(sockets: str, extra: str = "") -> str:
    """A configuration enabling the broker with `sockets` (Nix attribute set text)."""
    return f"{{ services.port-broker = {{ enable = true; sockets = {sockets}; {extra} }}; }}\n"


# --- unit files -------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """Parse a unit file into its sections' (key, value) lines, in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, equals, value = line.partition("=")
        assert equals, f"not a unit file line: {raw!r}"
        assert current is not None, f"a line before any section: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def shipped_service_keys() -> frozenset[str]:
    """Every directive in [Service] of the shipped units/port-broker.service."""
    keys = frozenset(
        k for k, _ in unit_sections((UNITS / "port-broker.service").read_text())["Service"]
    )
    assert {"ExecStart", "DynamicUser", "ProtectSystem", "SystemCallFilter"} <= keys
    return keys


# --- parse ------------------------------------------------------------------------

NIX_FILES: Final = sorted([*NIX_DIR.rglob("*.nix"), ROOT / "flake.nix"])


def test_the_nix_files_exist() -> None:
    names = {str(p.relative_to(ROOT)) for p in NIX_FILES}
    assert {
        "flake.nix",
        "nix/package.nix",
        "nix/module.nix",
        "nix/tests/vm.nix",
        "nix/tests/eval.nix",
    } <= names


@needs_nix
@pytest.mark.parametrize("path", NIX_FILES, ids=[str(p.relative_to(ROOT)) for p in NIX_FILES])
def test_every_nix_file_parses(path: Path) -> None:
    nix_instantiate("--parse", str(path))


def docs_blocks(docs: Path = DOCS) -> Iterator[tuple[bool, str]]:
    """Yield (marked for evaluation, text) for each ```nix block of `docs`."""
    lines = docs.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.rstrip() == "```nix":
            end = lines.index("```\n", number)
            marked = number > 0 and lines[number - 1].strip() == EVALUATED_MARK
            yield marked, "".join(lines[number + 1 : end])


def as_expression(block: str) -> str:
    """A docs block as a whole Nix expression: attribute definitions become a module."""
    if block.lstrip().startswith("{"):
        return block
    return "{ config, lib, pkgs, ... }:\n{\n" + block + "}\n"


@needs_nix
def test_every_nix_block_in_the_docs_parses(tmp_path: Path) -> None:
    blocks = list(docs_blocks())
    assert len(blocks) >= 5
    assert sum(marked for marked, _ in blocks) == 2  # the five lines and the container
    containers = ROOT / "docs" / "containers.md"
    for docs in (DOCS, containers):
        for number, (_, block) in enumerate(docs_blocks(docs)):
            path = tmp_path / f"{docs.stem}{number}.nix"
            path.write_text(as_expression(block))
            try:
                nix_instantiate("--parse", str(path))
            except NixError as e:
                pytest.fail(f"{docs.name}, Nix block {number + 1}:\n{block}\n{e}")


def test_the_docs_replace_security_wrappers_in_five_lines() -> None:
    (first_marked,) = [block for marked, block in docs_blocks() if marked][:1]
    assert len(first_marked.strip().splitlines()) == 5
    assert "security.wrappers.node" in DOCS.read_text()


# --- consistency without nixpkgs --------------------------------------------------


def install_script() -> str:
    """nix/package.nix's postInstall (lib and python3Packages stand-ins: nothing else of
    the package is evaluated)."""
    expression = (
        f"(import {PACKAGE} {{ lib = {{ }}; "
        "python3Packages = { buildPythonApplication = args: args; }; }).postInstall"
    )
    return str(json.loads(nix_instantiate("--eval", "--strict", "--json", "--expr", expression)))


SUBSTITUTE_IN_PLACE: Final = r"""
# stdenv's substituteInPlace, for the options package.nix uses: --replace-fail OLD NEW
# replaces every OLD and fails if there is none. Anything else is an error here.
substituteInPlace() {
    local file=$1 content
    shift
    content=$(cat "$file"; printf x)
    content=${content%x}
    while (($#)); do
        if [[ $1 != --replace-fail || $# -lt 3 ]]; then
            echo "substituteInPlace stand-in: unsupported arguments: $*" >&2
            return 1
        fi
        if [[ $content != *"$2"* ]]; then
            echo "substituteInPlace: pattern '$2' doesn't match anything in file '$file'" >&2
            return 1
        fi
        content=${content//"$2"/"$3"}
        shift 3
    done
    printf '%s' "$content" > "$file"
}
"""


@needs_nix
def test_the_package_installs_the_shipped_units_with_the_store_path(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(UNITS, source / "units")
    out = tmp_path / "out"
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", SUBSTITUTE_IN_PLACE + install_script()],
        cwd=source,
        env={"PATH": os.environ["PATH"], "out": str(out)},
        check=True,
        timeout=CLI_TIMEOUT,
    )
    system = out / "lib" / "systemd" / "system"
    assert sorted(p.name for p in system.iterdir()) == ["port-broker.service", "port-broker.socket"]

    shipped = (UNITS / "port-broker.service").read_text()
    installed = (system / "port-broker.service").read_text()
    assert shipped.count(SHIPPED_EXECUTABLE) == 2
    assert f"ExecStart={SHIPPED_EXECUTABLE} serve\n" in shipped
    assert f"ExecReload={SHIPPED_EXECUTABLE} reload\n" in shipped
    assert installed == shipped.replace(SHIPPED_EXECUTABLE, f"{out}/bin/port-broker")
    # So every directive but ExecStart= and ExecReload= is the shipped one, hardening
    # included.
    assert (system / "port-broker.socket").read_text() == (UNITS / "port-broker.socket").read_text()

    examples = out / "share" / "port-broker" / "units"
    for name in ("port-broker-http.socket", "port-broker-https.socket"):
        assert (examples / name).read_text() == (UNITS / name).read_text()


NIXPKGS_PYTHON_NAMES: Final = {"pytest": "pytestCheckHook"}
"""pyproject.toml names whose nixpkgs python3Packages attribute differs."""


def python_attr(requirement: str) -> str:
    name = Requirement(requirement).name
    return NIXPKGS_PYTHON_NAMES.get(name, name)


@needs_nix
def test_the_package_depends_on_what_pyproject_says() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {python_attr(r) for r in project["project"]["dependencies"]}
    check = {python_attr(r) for r in project["project"]["optional-dependencies"]["test"]}
    build = {python_attr(r) for r in project["build-system"]["requires"]}
    # Exactly these attributes exist in the stand-in: package.nix may name no other.
    names = " ".join(sorted(runtime | check | build))
    expression = f"""
      let
        python3Packages = {{ buildPythonApplication = args: args; }}
          // builtins.listToAttrs (map (n: {{ name = n; value = n; }})
               (builtins.filter builtins.isString (builtins.split " " "{names}")));
        package = import {PACKAGE} {{ lib = {{ }}; inherit python3Packages; }};
      in {{
        inherit (package) pname version dependencies nativeCheckInputs build-system
          enabledTestPaths pythonImportsCheck;
      }}
    """
    package = nix_json("--expr", expression)
    assert set(package["dependencies"]) == runtime
    assert set(package["nativeCheckInputs"]) == check
    assert set(package["build-system"]) == build
    assert (package["pname"], package["version"]) == (
        project["project"]["name"],
        project["project"]["version"],
    )
    for path in package["enabledTestPaths"]:
        assert (ROOT / path).is_file(), path
    assert package["pythonImportsCheck"][0] == "broker"
    for module in package["pythonImportsCheck"]:  # each a module of the tree
        assert importlib.util.find_spec(module) is not None, module


def module_service(module: Path = MODULE) -> dict[str, Any]:
    """What `module` sets on systemd.*, evaluated with a stand-in lib whose `mkIf` keeps
    its content: only the attribute names are forced, so nothing else of lib is needed.
    A module that stops being this shape fails here, loudly, rather than slipping by."""
    expression = f"""
      let
        module = import {module} {{
          lib = {{ mkIf = condition: content: content; }};
          pkgs = {{ }};
          config.services.port-broker = {{ enable = true; package = "PACKAGE"; }};
        }};
        systemd = module.config.systemd;
      in {{
        systemd = builtins.attrNames systemd;
        services = builtins.attrNames systemd.services;
        service = builtins.attrNames systemd.services.port-broker;
        packages = systemd.packages;
      }}
    """
    result: dict[str, Any] = nix_json("--expr", expression)
    return result


def check_module_leaves_service_to_package(module: Path) -> None:
    """The module's whole say on port-broker.service is NixOS bookkeeping (no lib)."""
    hardening = shipped_service_keys()
    setting = module_service(module)
    assert setting["packages"] == ["PACKAGE"], "the service must come from systemd.packages"
    assert setting["systemd"] == ["packages", "services", "sockets"]
    assert setting["services"] == ["port-broker"]
    assert set(setting["service"]) <= NIX_SERVICE_KEYS, (
        f"{module.name} sets {sorted(set(setting['service']) - NIX_SERVICE_KEYS)} on "
        "systemd.services.port-broker; every [Service] directive belongs in "
        "units/port-broker.service"
    )
    # And no [Service] directive is defined anywhere in the module's code.
    code = "\n".join(
        line for line in module.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert "serviceConfig" not in code
    restated = sorted(key for key in hardening if re.search(rf"(?<![\w-]){key}\s+=", code))
    assert not restated, f"{module.name} restates {restated} of units/port-broker.service"


@needs_nix
def test_the_module_takes_the_service_and_its_hardening_from_the_package() -> None:
    check_module_leaves_service_to_package(MODULE)


def mutate(tmp_path: Path, old: str, new: str, *, last: bool = False) -> Path:
    """A copy of the module with `old` (which must occur) replaced by `new`."""
    text = MODULE.read_text()
    count = text.count(old)
    assert count == 1 or (last and count > 1), (
        f"the mutation no longer applies to nix/module.nix ({old!r} occurs {count} times): "
        "update this test"
    )
    if last:
        head, _, tail = text.rpartition(old)
        text = head + new + tail
    else:
        text = text.replace(old, new)
    path = tmp_path / "module.nix"
    path.write_text(text)
    return path


RESTATED_HARDENING: Final = (
    'overrideStrategy = "asDropin";\n      # A new policy',
    'overrideStrategy = "asDropin";\n      serviceConfig.ProtectSystem = "full";\n'
    "      # A new policy",
)


@needs_nix
def test_the_consistency_check_catches_restated_hardening(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="serviceConfig"):
        check_module_leaves_service_to_package(mutate(tmp_path, *RESTATED_HARDENING))


@needs_nix
def test_the_consistency_check_catches_a_restated_directive_anywhere(tmp_path: Path) -> None:
    # A directive kept aside in a let binding, out of reach of the evaluation above.
    broken = mutate(
        tmp_path,
        "  cfg = config.services.port-broker;\n",
        "  cfg = config.services.port-broker;\n  hardening = { DynamicUser = true; };\n",
    )
    with pytest.raises(AssertionError, match="DynamicUser"):
        check_module_leaves_service_to_package(broken)


# --- evaluation with nixpkgs' lib -------------------------------------------------

SOCKETS: Final = """{
  http = { listen = [ "80" ]; users = [ "nobody" ]; };
  web = { listen = [ "0.0.0.0:8080" "[::1]:8081" ]; groups = [ "root" ]; };
  dns = { listen = [ "53" ]; type = "datagram"; units = [ "dns.service" ]; };
}"""
SOCKET_LISTEN: Final = {
    "http": ("stream", ["80"]),
    "web": ("stream", ["0.0.0.0:8080", "[::1]:8081"]),
    "dns": ("datagram", ["53"]),
}


def check_socket_units(result: dict[str, Any], declared: dict[str, tuple[str, list[str]]]) -> None:
    """One port-broker-NAME.socket per declared socket, as the shipped ones are, plus the
    packaged control socket enabled and nothing else."""
    assert set(result["sockets"]) == {"port-broker"} | {f"port-broker-{n}" for n in declared}
    for name, (kind, listen) in declared.items():
        unit = result["sockets"][f"port-broker-{name}"]
        assert unit["listenStreams"] == (listen if kind == "stream" else []), name
        assert unit["listenDatagrams"] == (listen if kind == "datagram" else []), name
        assert unit["socketConfig"] == {
            "FileDescriptorName": name,
            "Service": "port-broker.service",
        }, name
        assert unit["wantedBy"] == ["sockets.target"], name
        assert unit["overrideStrategy"] == "asDropinIfExists", name
    control = result["sockets"]["port-broker"]
    assert control["overrideStrategy"] == "asDropin", "the control socket is the packaged one"
    assert (control["listenStreams"], control["listenDatagrams"], control["socketConfig"]) == (
        [],
        [],
        {},
    )
    assert control["wantedBy"] == ["sockets.target"]


def check_service_from_package(result: dict[str, Any], package: str = STUB_PACKAGE) -> None:
    """The broker's service is the package's unit plus a drop-in that restates nothing."""
    service = result["services"]["port-broker"]
    assert not set(service["serviceConfig"]) & shipped_service_keys()
    assert service["serviceConfig"] == {}
    assert service["environment"] == {}
    assert service["overrideStrategy"] == "asDropin"
    assert service["wantedBy"] == []
    assert service["reloadTriggers"] == [POLICY_PATH]  # a policy change reloads
    assert POLICY_PATH not in service["restartTriggers"]
    assert result["packages"] == [package]
    assert result["systemPackages"] == [package]


def check_like_shipped_http_socket(result: dict[str, Any]) -> None:
    """`sockets.http.listen = [ "80" ]` gives the [Socket] and [Install] of the shipped
    units/port-broker-http.socket."""
    generated = unit_sections(result["sockets"]["port-broker-http"]["unitText"])
    shipped = unit_sections((UNITS / "port-broker-http.socket").read_text())
    for section in ("Socket", "Install"):
        assert sorted(generated[section]) == sorted(shipped[section]), section


def check_generated_sockets(result: dict[str, Any]) -> None:
    """SOCKETS gave the units they should."""
    check_socket_units(result, SOCKET_LISTEN)
    check_like_shipped_http_socket(result)


@needs_lib
def test_sockets_become_socket_units(tmp_path: Path) -> None:
    result = evaluate(tmp_path, enabled(SOCKETS))
    assert (result["failedAssertions"], result["warnings"]) == ([], [])
    check_generated_sockets(result)
    assert "ListenDatagram=53\n" in result["sockets"]["port-broker-dns"]["unitText"]


@needs_lib
def test_the_service_and_control_socket_come_from_the_package(tmp_path: Path) -> None:
    result = evaluate(tmp_path, enabled(SOCKETS))
    check_service_from_package(result)
    assert result["services"]["port-broker"]["restartTriggers"] == [
        "dns=datagram:53 http=stream:80 web=stream:0.0.0.0:8080,[::1]:8081",
    ]
    assert set(result["services"]) == {"port-broker"}


SOCKET_UNIT_MUTATIONS: Final = {
    "wrong FileDescriptorName": ("FileDescriptorName = name;", 'FileDescriptorName = "x${name}";'),
    "wrong Service": ('Service = "port-broker.service";', 'Service = "x-${name}.service";'),
    "datagrams as streams": (
        'listenStreams = optionals (socket.type == "stream") socket.listen;',
        "listenStreams = socket.listen;",
    ),
    "wrong unit name": ('nameValuePair "port-broker-${name}"', 'nameValuePair "broker-${name}"'),
    "socket not enabled": ('wantedBy = [ "sockets.target" ];', "wantedBy = [ ];"),
    "control socket not enabled": ('wantedBy = [ "sockets.target" ];', "wantedBy = [ ];"),
    "one listen address dropped": (
        'listenStreams = optionals (socket.type == "stream") socket.listen;',
        'listenStreams = optionals (socket.type == "stream") (lib.take 1 socket.listen);',
    ),
}


@needs_lib
@pytest.mark.parametrize("mutation", sorted(SOCKET_UNIT_MUTATIONS))
def test_the_evaluation_fails_on_a_wrong_socket_unit(tmp_path: Path, mutation: str) -> None:
    old, new = SOCKET_UNIT_MUTATIONS[mutation]
    if mutation == "socket not enabled":
        broken = mutate(tmp_path, old, new, last=True)
    elif mutation == "control socket not enabled":
        text = MODULE.read_text()
        assert text.count(old) == 2, "update this test: the module's wantedBy lines changed"
        broken = tmp_path / "module.nix"
        broken.write_text(text.replace(old, new, 1))
    else:
        broken = mutate(tmp_path, old, new)
    result = evaluate(tmp_path, enabled(SOCKETS), module=broken)
    with pytest.raises(AssertionError):
        check_generated_sockets(result)


@needs_lib
def test_the_evaluation_fails_on_restated_hardening(tmp_path: Path) -> None:
    result = evaluate(tmp_path, enabled(SOCKETS), module=mutate(tmp_path, *RESTATED_HARDENING))
    with pytest.raises(AssertionError):
        check_service_from_package(result)


def toml_text(data: dict[str, Any], table: tuple[str, ...] = ()) -> str:
    """`data` as TOML: tables of tables, lists and scalars, the shape of the policy. What
    nixpkgs' formats.toml does with json2toml; tomllib checks the round trip."""

    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    lines = [f"[{'.'.join(map(key, table))}]"] if table else []
    lines += [f"{key(k)} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = "".join(line + "\n" for line in lines)
    for name, value in data.items():
        if isinstance(value, dict):
            text += toml_text(value, (*table, name))
    return text


def check_config(tmp_path: Path, policy: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    text = toml_text(policy)
    assert tomllib.loads(text) == policy
    path = tmp_path / "broker.toml"
    path.write_text(text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PORT_BROKER_")}
    return subprocess.run(
        [str(Path(sys.executable).parent / "port-broker"), "check-config", str(path)],
        capture_output=True,
        text=True,
        env=clean,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@needs_lib
def test_the_policy_is_generated_and_the_broker_accepts_it(tmp_path: Path) -> None:
    configuration = enabled(
        SOCKETS,
        """settings = {
             max_connections = 256;
             client_timeout = 2.5;
             status.users = [ "root" 0 ];
             sockets.http.users = [ 65534 ];
           };""",
    )
    result = evaluate(tmp_path, configuration)
    assert result["etc"] == {"port-broker/broker.toml": POLICY_PATH}
    policy = json.loads(result["policy"])
    assert policy == {
        "client_timeout": 2.5,
        "max_connections": 256,
        "sockets": {
            "dns": {"units": ["dns.service"]},
            "http": {"users": policy["sockets"]["http"]["users"]},
            "web": {"groups": ["root"]},
        },
        "status": {"users": ["root", 0]},
    }
    assert sorted(policy["sockets"]["http"]["users"], key=str) == [65534, "nobody"]
    done = check_config(tmp_path, policy)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"{tmp_path / 'broker.toml'}: OK\n")
    for name in ("http", "web", "dns"):
        assert f"  {name}: " in done.stdout


@needs_lib
def test_a_socket_nobody_may_take_is_a_warning_and_an_empty_rule(tmp_path: Path) -> None:
    result = evaluate(tmp_path, enabled('{ idle.listen = [ "8080" "[::1]:8081" ]; }'))
    assert result["failedAssertions"] == []
    assert result["warnings"] == [
        "services.port-broker.sockets.idle: nobody may take this socket (users, groups and "
        "units are all empty), yet systemd holds 8080, [::1]:8081 for it. Add users, groups "
        "or units, or remove the socket."
    ]
    assert json.loads(result["policy"]) == {"sockets": {"idle": {}}}
    assert check_config(tmp_path, json.loads(result["policy"])).returncode == 0


ASSERTION_CASES: Final = {
    "control": (
        '{ control = { listen = [ "/run/other.sock" ]; users = [ "root" ]; }; }',
        [
            "services.port-broker.sockets.control: `control` is the name of port-broker's own "
            "control socket (port-broker.socket, FileDescriptorName=control) and cannot be "
            "granted. Rename the socket, e.g. services.port-broker.sockets.control-api."
        ],
    ),
    "bad name": (
        '{ "my socket" = { listen = [ "80" ]; users = [ "root" ]; }; }',
        [
            'services.port-broker.sockets."my socket": not a valid socket name; it becomes '
            "FileDescriptorName=my socket and the unit port-broker-my socket.socket. Use "
            "letters, digits and `_.@-`, starting with a letter or digit, at most 64 characters."
        ],
    ),
    "empty listen": (
        '{ http = { listen = [ ]; users = [ "root" ]; }; }',
        [
            "services.port-broker.sockets.http.listen is empty: systemd would bind nothing for "
            'socket `http`. Give at least one address, e.g. listen = [ "80" ]; (every IPv4 and '
            "IPv6 address), or remove the socket."
        ],
    ),
    "same address in two sockets": (
        '{ a = { listen = [ "80" ]; users = [ "root" ]; };'
        '  b = { listen = [ "[::]:80" ]; users = [ "root" ]; }; }',
        [
            "services.port-broker.sockets.{a,b}.listen: `80` and `[::]:80` are the same stream "
            "address; systemd can bind a stream address only once (a bare port is [::]:PORT, "
            "which also holds 0.0.0.0:PORT). Keep it in one socket and remove the others."
        ],
    ),
    "IPv4 wildcard under a bare port": (
        '{ a = { listen = [ "443" ]; users = [ "root" ]; };'
        '  b = { listen = [ "0.0.0.0:443" ]; users = [ "root" ]; }; }',
        [
            "services.port-broker.sockets.{a,b}.listen: `443` and `0.0.0.0:443` are the same "
            "stream address; systemd can bind a stream address only once (a bare port is "
            "[::]:PORT, which also holds 0.0.0.0:PORT). Keep it in one socket and remove the "
            "others."
        ],
    ),
    "one socket, one address twice": (
        '{ dns = { listen = [ "53" "53" ]; type = "datagram"; users = [ "root" ]; }; }',
        [
            "services.port-broker.sockets.dns.listen: `53` is listed more than once; systemd "
            "can bind a datagram address only once (a bare port is [::]:PORT, which also holds "
            "0.0.0.0:PORT). Keep it in one socket and remove the others."
        ],
    ),
    "same port in two sockets": (
        '{ a = { listen = [ "80" ]; users = [ "root" ]; };'
        '  b = { listen = [ "80" ]; users = [ "root" ]; }; }',
        [
            "services.port-broker.sockets.{a,b}.listen: `80` is listed more than once; systemd "
            "can bind a stream address only once (a bare port is [::]:PORT, which also holds "
            "0.0.0.0:PORT). Keep it in one socket and remove the others."
        ],
    ),
    "rule for an undeclared socket": (
        '{ http = { listen = [ "80" ]; users = [ "root" ]; }; }',
        [
            "services.port-broker.settings.sockets.https: a rule for a socket no "
            "services.port-broker.sockets.https declares; the broker refuses to start (exit "
            "status 78) when a rule names a socket systemd did not pass. Declare "
            "services.port-broker.sockets.https (listen, users, groups, units) instead."
        ],
    ),
}
ASSERTION_EXTRA: Final = {
    "rule for an undeclared socket": 'settings.sockets.https.users = [ "root" ];'
}


@needs_lib
@pytest.mark.parametrize("case", sorted(ASSERTION_CASES))
def test_every_assertion_says_what_to_change(tmp_path: Path, case: str) -> None:
    sockets, messages = ASSERTION_CASES[case]
    result = evaluate(tmp_path, enabled(sockets, ASSERTION_EXTRA.get(case, "")))
    assert result["failedAssertions"] == messages
    assert result["warnings"] == []


@needs_lib
@pytest.mark.parametrize(
    "sockets",
    [
        '{ tcp = { listen = [ "53" ]; users = [ "root" ]; };'
        '  udp = { listen = [ "53" ]; type = "datagram"; users = [ "root" ]; }; }',
        '{ a = { listen = [ "127.0.0.1:80" ]; users = [ "root" ]; };'
        '  b = { listen = [ "[::1]:80" ]; users = [ "root" ]; }; }',
        '{ a = { listen = [ "/run/a.sock" ]; users = [ "root" ]; };'
        '  b = { listen = [ "/run/b.sock" ]; users = [ "root" ]; }; }',
    ],
    ids=["stream and datagram", "two loopbacks", "two paths"],
)
def test_different_addresses_are_no_clash(tmp_path: Path, sockets: str) -> None:
    result = evaluate(tmp_path, enabled(sockets))
    assert (result["failedAssertions"], result["warnings"]) == ([], [])


@needs_lib
def test_a_disabled_module_sets_up_nothing(tmp_path: Path) -> None:
    configuration = (
        "{ services.port-broker.sockets.control = { listen = [ ]; }; }\n"  # would not pass
    )
    result = evaluate(tmp_path, configuration)
    assert result["failedAssertions"] == []
    assert (result["sockets"], result["services"], result["etc"]) == ({}, {}, {})
    assert (result["packages"], result["systemPackages"], result["policy"]) == ([], [], None)


@needs_lib
def test_every_option_is_documented(tmp_path: Path) -> None:
    result = evaluate(tmp_path, "{ }\n")
    options = {o["name"]: o for o in result["options"] if not o["internal"]}
    assert set(options) == {
        "services.port-broker.enable",
        "services.port-broker.package",
        "services.port-broker.settings",
        "services.port-broker.sockets",
        "services.port-broker.sockets.<name>.listen",
        "services.port-broker.sockets.<name>.type",
        "services.port-broker.sockets.<name>.users",
        "services.port-broker.sockets.<name>.groups",
        "services.port-broker.sockets.<name>.units",
    }
    docs = DOCS.read_text()
    for name, option in options.items():
        assert len(option["description"] or "") > 20, name
        assert f"`{name}`" in docs, f"docs/nixos.md does not list {name}"


@needs_lib
def test_the_flake_exposes_package_module_and_checks() -> None:
    flake = nix_json(str(FLAKE_EVAL), *lib_arg())
    assert flake["inputs"] == {"nixpkgs": "github:NixOS/nixpkgs/nixos-unstable"}
    for system in ("x86_64-linux", "aarch64-linux"):
        assert flake["packages"][system] == {"default": FLAKE_PACKAGE, "port-broker": FLAKE_PACKAGE}
        assert flake["checks"][system] == {"package": "port-broker-0.1.0", "vm": "port-broker"}
    assert flake["overlay"] == FLAKE_PACKAGE
    module = flake["module"]
    assert (module["failedAssertions"], module["warnings"]) == ([], [])
    check_service_from_package(module, FLAKE_PACKAGE)
    check_socket_units(module, {"http": ("stream", ["80"])})


@needs_lib
def test_the_vm_test_configures_what_it_tests() -> None:
    flake = nix_json(str(FLAKE_EVAL), *lib_arg())
    server = flake["vm"]
    assert (server["failedAssertions"], server["warnings"]) == ([], [])
    check_socket_units(server, {"http": ("stream", ["80"])})
    check_service_from_package(server, FLAKE_PACKAGE)
    assert json.loads(server["policy"]) == {"sockets": {"http": {"users": ["alice"]}}}
    worker = server["services"]["hello"]["serviceConfig"]
    assert worker["User"] == "alice"
    assert worker["ExecStart"].startswith(f"{FLAKE_PACKAGE}/bin/port-broker exec http -- ")
    assert worker["ExecStart"].endswith("-hello.js")
    script = flake["vmTestScript"]
    for needed in (
        "port-broker-http.socket",
        "runuser -u mallory",
        "status == 77",
        "http://server/",
        "specialisation/mallory-too/bin/switch-to-configuration test",
    ):
        assert needed in script, needed
    # The switch the VM test makes changes the policy only: NixOS reloads the broker.
    switched = server["specialisations"]["mallory-too"]
    assert (switched["failedAssertions"], switched["warnings"]) == ([], [])
    assert json.loads(switched["policy"]) == {"sockets": {"http": {"users": ["alice", "mallory"]}}}
    assert switched["policy"] != server["policy"]
    # What differs is the policy file, a reload trigger (a store path named by its
    # content in nixpkgs; fixed by the stubs here); the rest of both units is the same.
    before, after = server["services"]["port-broker"], switched["services"]["port-broker"]
    assert before["reloadTriggers"] == [server["etc"]["port-broker/broker.toml"]]
    assert after == before
    assert switched["sockets"] == server["sockets"]


@needs_lib
def test_the_docs_examples_evaluate_cleanly(tmp_path: Path) -> None:
    blocks = [block for marked, block in docs_blocks() if marked]
    for number, block in enumerate(blocks):
        result = evaluate(tmp_path, as_expression(block), name=f"example{number}.nix")
        assert (result["failedAssertions"], result["warnings"]) == ([], []), block
        check_service_from_package(result)
        assert "port-broker-http" in result["sockets"], block
    five_lines, container = (
        json.loads(evaluate(tmp_path, as_expression(b))["policy"]) for b in blocks
    )
    assert five_lines == {"sockets": {"http": {"users": ["alice"]}, "https": {"users": ["alice"]}}}
    assert container == {"sockets": {"http": {"units": ["container@web.service"]}}}
