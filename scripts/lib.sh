# shellcheck shell=bash
# Helpers shared by the scripts in this folder; source it (from the repository root):
#
#   . scripts/lib.sh
#
# Defines functions only: no side effects when sourced.

# apt_install PACKAGE…: installs Debian packages with apt-get (as root; otherwise says what to
# install and returns 1), without starting their system services.
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "need $* but not root: install it (apt-get install -y $*) and rerun" >&2
        return 1
    fi
    apt-get update -qq
    # policy-rc.d keeps Debian from starting the system redis-server on install.
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" </dev/null
    if [ -n "$created_policy" ]; then rm -f "$policy"; fi
}
