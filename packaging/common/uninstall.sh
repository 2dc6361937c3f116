#!/bin/sh
# Remove what install.sh installed:
#
#   sudo uninstall.sh [--keep-logs] [--force]
#
# Stops and disables the service (systemd, OpenRC, SysV or the rc.local
# entry), removes the binary, service files, config (/etc/xcp-vm-agent), state
# (/var/lib/xcp-vm-agent) and, unless --keep-logs, the logs.
# --force: do not ask, and carry on past errors and past a package-manager
# installation of the agent (whose files are left to the package manager).
#
#   sudo uninstall.sh --root DIR [--keep-logs]
#
# removes what install.sh --root DIR put into the system at DIR (offline.sh).
set -u

NAME=xcp-vm-agent
BIN=/usr/local/bin/$NAME
SHARE=/usr/local/share/$NAME
MARK="# $NAME (added by install.sh)"
KEEP_LOGS=0
FORCE=0
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "uninstall.sh: $*"; }
die() {
    echo "uninstall.sh: error: $*" >&2
    exit 1
}

# Delete a state directory: first unmount whatever is still mounted under it
# (a job's temporary mount), deepest first, then delete without crossing into
# another filesystem, so a mount left there never has its files deleted.
purge_dir() {
    pd_dir=$1
    [ -d "$pd_dir" ] || return 0
    pd_mounts() {
        # mountinfo field 5 is the mount point, spaces written as \040.
        awk -v d="$pd_dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo 2>/dev/null |
            sort -r
    }
    pd_mounts | while read -r pd_m; do
        pd_m=$(printf '%b' "$pd_m")
        umount "$pd_m" 2>/dev/null || umount -l "$pd_m" 2>/dev/null || true
    done
    if ! rm -rf --one-file-system "$pd_dir" 2>/dev/null; then
        # An rm without --one-file-system (busybox): only with no mount left.
        if [ -n "$(pd_mounts)" ]; then
            echo "cannot delete $pd_dir: something is still mounted under it" >&2
            return 1
        fi
        rm -rf "$pd_dir"
    fi
}

# --root DIR: offline.sh removes what install.sh --root put there.
if [ "${1:-}" = --root ]; then
    [ $# -ge 2 ] || die "--root needs a directory"
    # shellcheck disable=SC2034 # read by offline.sh
    R=$2
    shift 2
    for arg in "$@"; do
        case "$arg" in
            --keep-logs) KEEP_LOGS=1 ;;
            --force | -f | -y) ;;
            *) die "unknown argument $arg (usage: $0 --root DIR [--keep-logs])" ;;
        esac
    done
    [ "$(id -u)" -eq 0 ] || die "run as root"
    set -e
    # shellcheck source=/dev/null # offline.sh, checked on its own
    . "$HERE/offline.sh"
    root_uninstall
    exit 0
fi

for arg in "$@"; do
    case "$arg" in
        --keep-logs) KEEP_LOGS=1 ;;
        --force | -f | -y) FORCE=1 ;;
        -h | --help)
            echo "usage: $0 [--keep-logs] [--force]"
            echo "       $0 --root DIR [--keep-logs]   (what install.sh --root DIR installed)"
            exit 0
            ;;
        *) die "unknown argument $arg (usage: $0 [--keep-logs] [--force])" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root"

# A package-manager installation owns /usr/bin/xcp-vm-agent; leave it alone.
packaged=0
if command -v dpkg-query >/dev/null 2>&1 && dpkg-query -W -f='${Status}' $NAME 2>/dev/null | grep -q 'ok installed'; then
    packaged=1
elif command -v rpm >/dev/null 2>&1 && rpm -q $NAME >/dev/null 2>&1; then
    packaged=1
elif command -v apk >/dev/null 2>&1 && apk info -e $NAME >/dev/null 2>&1; then
    packaged=1
fi
if [ "$packaged" -eq 1 ] && [ "$FORCE" -ne 1 ]; then
    die "$NAME is installed by the package manager: remove it with apt, dnf, zypper or apk (or pass --force to remove only the tarball's files)"
fi

if [ "$FORCE" -ne 1 ]; then
    printf 'Remove %s, its config and state%s? [y/N] ' "$NAME" "$([ "$KEEP_LOGS" -eq 1 ] || echo ' and logs')"
    read -r answer || answer=""
    case "$answer" in
        y | Y | yes | YES) ;;
        *) die "aborted" ;;
    esac
fi

failed=0
try() {
    if ! "$@"; then
        say "warning: '$*' failed"
        failed=1
    fi
}

# Stop and disable under every init system that has our service.
if [ -f /etc/systemd/system/$NAME.service ]; then
    if [ -d /run/systemd/system ]; then
        try systemctl disable --now $NAME.service
    elif command -v systemctl >/dev/null 2>&1; then
        try systemctl disable $NAME.service
    fi
    # Only the unit install.sh wrote; a hand-written one stays (disabled).
    if head -n 1 /etc/systemd/system/$NAME.service | grep -q "^# systemd unit for $NAME"; then
        rm -f /etc/systemd/system/$NAME.service
    else
        say "kept the hand-written /etc/systemd/system/$NAME.service (disabled)"
    fi
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi
if [ -f /etc/init.d/$NAME ] && [ "$packaged" -eq 0 ]; then
    if head -n 1 /etc/init.d/$NAME | grep -q openrc-run; then
        [ -e /run/openrc/softlevel ] && try rc-service $NAME stop
        try rc-update del $NAME default
    else
        if [ -r /run/$NAME.pid ]; then
            try /etc/init.d/$NAME stop
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            rm -f /etc/init.d/$NAME
            try update-rc.d $NAME remove
        elif command -v chkconfig >/dev/null 2>&1; then
            try chkconfig --del $NAME
        elif command -v insserv >/dev/null 2>&1; then
            try insserv -r $NAME
        fi
    fi
    rm -f /etc/init.d/$NAME
fi
if [ -f /etc/rc.local ] && grep -qF "$MARK" /etc/rc.local; then
    grep -vF "$MARK" /etc/rc.local >/etc/rc.local.tmp.$$ && cat /etc/rc.local.tmp.$$ >/etc/rc.local
    rm -f /etc/rc.local.tmp.$$
fi
# A process started by the rc.local path or left over.
if [ -r /run/$NAME.pid ]; then
    kill -TERM "$(cat /run/$NAME.pid)" 2>/dev/null || true
    rm -f /run/$NAME.pid
fi

rm -f "$BIN" /usr/local/share/man/man8/$NAME.8
rmdir /usr/local/share/man/man8 2>/dev/null || true
if [ "$packaged" -eq 0 ]; then
    rm -f /etc/logrotate.d/$NAME
    rm -rf "/etc/${NAME:?}"
    purge_dir "/var/lib/${NAME:?}" || failed=1
    if [ "$KEEP_LOGS" -eq 1 ]; then
        say "logs kept in /var/log/$NAME"
    else
        rm -rf "/var/log/${NAME:?}"
    fi
fi
rm -rf "$SHARE"

if [ "$failed" -ne 0 ] && [ "$FORCE" -ne 1 ]; then
    die "some steps failed (see above); rerun with --force to ignore them"
fi
say "removed $NAME"
