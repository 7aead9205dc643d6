# Shared by .ci/setup, .ci/install and bench/run (sourced, not run).

# install_debian_packages FILE [WHO]: install the packages FILE lists (one a line,
# # comments) that are neither installed nor provided by an installed package (NodeSource's
# nodejs provides npm, and conflicts with Debian's), without Recommends (so FILE must list
# what is needed). WHO names the caller in messages (default: the script's name).
install_debian_packages() {
    local list=$1 who=${2:-${0##*/}} package provided missing=()
    mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$list")
    provided=$(dpkg-query -W -f='${db:Status-Abbrev}|${Package},${Provides}\n' \
        | sed -nE 's/^.i *\|//p' | tr ',' '\n' | sed -e 's/(.*)//' -e 's/[[:space:]]//g')
    for package in "${packages[@]}"; do
        grep -qxF "$package" <<<"$provided" || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    if ((EUID != 0)); then
        echo "$who: missing Debian packages (from $list): ${missing[*]}; run as root" >&2
        return 1
    fi
    echo "$who: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# fresh_venv DIR: make DIR a virtualenv on Debian's /usr/bin/python3 (every user and
# service can run that one), from nothing unless it already is one of this very Python
# (3.11 → 3.13: a distribution upgrade changes /usr/bin/python3 under an existing one).
fresh_venv() {
    local dir=$1 want
    want=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ "$(sed -n 's/^version *= *//p' "$dir/pyvenv.cfg" 2>/dev/null | cut -d. -f1,2)" != "$want" ]] \
        || [[ "$(sed -n 's/^home *= *//p' "$dir/pyvenv.cfg" 2>/dev/null)" != /usr/bin ]]; then
        /usr/bin/python3 -m venv --clear "$dir"
    fi
}

# pip_locked PYTHON ARGS...: pip install exactly what a lock says, every file checked
# against its hash; what has no wheel (systemd-python) is built as one (PEP 517, which
# Debian 12's pip 23 would otherwise skip for a `setup.py install`) with the setuptools
# already installed from .ci/requirements/build.txt, not one fetched on the day.
pip_locked() {
    local python=$1
    shift
    pip_plain "$python" --require-hashes --no-build-isolation --use-pep517 "$@"
}

# pip_plain PYTHON ARGS...: pip install, quiet unless something goes wrong.
pip_plain() {
    local python=$1
    shift
    "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"
}
