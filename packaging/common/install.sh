#!/bin/sh
# Install xcp-vm-agent from the release tarball on any Linux system, with or
# without a package manager:
#
#   sudo ./install.sh [SERVER_URL] [-y] [--skip-deps]
#
# SERVER_URL may be left out when /etc/xcp-vm-agent/config.json already
# names one (a takeover from the Python agent 1.0.3): the config is kept
# byte for byte. A 1.0.3 installation is taken over first (takeover.sh:
# old service stopped and disabled, its unit and /opt/xcp-vm-agent moved
# to /var/backups/xcp-vm-agent-1.0.3).
#
# - installs the tools disk jobs use (growpart, parted/sgdisk, e2fsprogs,
#   xfsprogs, util-linux) with apt-get, dnf, yum, zypper or apk, unless
#   --skip-deps;
# - installs the binary to /usr/local/bin and writes server_url into
#   /etc/xcp-vm-agent/config.json (mode 0600), keeping any other keys;
# - installs the service for the init system it finds (systemd, OpenRC, SysV,
#   or an /etc/rc.local entry when there is none), enables it, and starts it
#   only when that init system is running (not in a chroot or image build).
# -y answers yes to every question. uninstall.sh undoes all of it.
#
# Offline, into a system that is not running (a template, a stopped VM's
# disk), without running anything from it (offline.sh):
#
#   sudo ./install.sh --root DIR SERVER_URL [OPTIONS]
#   sudo ./install.sh --image FILE SERVER_URL [OPTIONS]
#
# OPTIONS: --init systemd|openrc|sysv|standalone, --client-cert CERT KEY,
# --server-cert CA. uninstall.sh --root DIR undoes --root.
set -eu

NAME=xcp-vm-agent
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=/usr/local/bin/$NAME
CONF_DIR=/etc/$NAME
CONF=$CONF_DIR/config.json
STATE_DIR=/var/lib/$NAME
LOG_DIR=/var/log/$NAME
SHARE=/usr/local/share/$NAME
MARK="# $NAME (added by install.sh)"

usage() {
    echo "usage: $0 [SERVER_URL] [-y] [--skip-deps]"
    echo "  SERVER_URL   the management server, for example https://mgmt.example.com:8443;"
    echo "               optional when $CONF already names one (it is then kept as it is)"
    echo "  -y           do not ask for confirmation"
    echo "  --skip-deps  do not install growpart, parted, e2fsprogs, xfsprogs, util-linux"
    echo "or, into a system that is not running (nothing from it is run):"
    echo "       $0 --root DIR SERVER_URL [--init INIT] [--client-cert CERT KEY] [--server-cert CA]"
    echo "       $0 --image FILE SERVER_URL [...]"
    echo "  --root DIR    the root filesystem of a Linux system, mounted at DIR"
    echo "  --image FILE  a disk image (raw; qcow2, VHD and others with qemu-utils): attached,"
    echo "                its root filesystem found by /etc/os-release, mounted, installed into, detached"
    echo "  --init INIT   systemd, openrc, sysv or standalone (/etc/rc.local); detected when not given"
    echo "  --client-cert CERT KEY  client certificate and key for mutual TLS (the key is kept 0600)"
    echo "  --server-cert CA        the CA that signed the server's certificate"
}

say() { echo "install.sh: $*"; }
die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

# --root and --image: offline.sh does all of it.
for arg in "$@"; do
    case "$arg" in
        --root | --image)
            # shellcheck source=/dev/null # offline.sh, checked on its own
            . "$HERE/offline.sh"
            offline_main "$@"
            exit 0
            ;;
    esac
done

SERVER_URL=""
YES=0
SKIP_DEPS=0
for arg in "$@"; do
    case "$arg" in
        -y | --yes) YES=1 ;;
        --skip-deps) SKIP_DEPS=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) usage >&2; die "unknown option $arg" ;;
        *)
            [ -z "$SERVER_URL" ] || die "only one SERVER_URL may be given"
            SERVER_URL=$arg
            ;;
    esac
done
if [ -z "$SERVER_URL" ] && ! grep -qs '"server_url"' "$CONF"; then
    usage >&2
    die "SERVER_URL is required ($CONF names none)"
fi
if [ -n "$SERVER_URL" ]; then
    case "$SERVER_URL" in
        https://?*) ;;
        *) die "SERVER_URL must start with https:// (the agent always verifies TLS; got $SERVER_URL)" ;;
    esac
    case "$SERVER_URL" in
        *'"'* | *\\* | *' '* | *'|'*) die "SERVER_URL must not contain quotes, backslashes, spaces or |" ;;
    esac
fi
[ "$(id -u)" -eq 0 ] || die "run as root"
[ -f "$HERE/$NAME" ] || die "$HERE/$NAME not found: run install.sh from the unpacked tarball"

# --- detection -------------------------------------------------------------
detect_pkg_manager() {
    for pm in apt-get dnf yum zypper apk; do
        if command -v "$pm" >/dev/null 2>&1; then
            echo "$pm"
            return
        fi
    done
    echo none
}

# Prints systemd, openrc, sysv or none: the init system that is running, or
# else the one installed (image builds: enabled now, started at first boot).
detect_init() {
    if [ -d /run/systemd/system ]; then
        echo systemd
    elif [ -e /run/openrc/softlevel ]; then
        echo openrc
    elif command -v systemctl >/dev/null 2>&1 && { [ -x /lib/systemd/systemd ] || [ -x /usr/lib/systemd/systemd ]; }; then
        echo systemd
    elif [ -x /sbin/openrc-run ] || command -v openrc-run >/dev/null 2>&1; then
        echo openrc
    elif [ -d /etc/init.d ] && { command -v update-rc.d >/dev/null 2>&1 || command -v chkconfig >/dev/null 2>&1 || command -v insserv >/dev/null 2>&1; }; then
        echo sysv
    else
        echo none
    fi
}

# True when we run in the system that booted (not a chroot or image build).
booted_system() {
    [ -r /proc/1/root ] || return 1
    [ "$(stat -c %d:%i /)" = "$(stat -Lc %d:%i /proc/1/root 2>/dev/null)" ]
}

# True when the given init system is the one running the machine.
init_running() {
    case "$1" in
        systemd) [ -d /run/systemd/system ] ;;
        openrc) [ -e /run/openrc/softlevel ] ;;
        sysv)
            booted_system || return 1
            rl=$(runlevel 2>/dev/null || true)
            [ -n "$rl" ] && [ "$rl" != unknown ]
            ;;
        *) booted_system ;;
    esac
}

PM=$(detect_pkg_manager)
INIT=$(detect_init)
say "package manager: $PM, init system: $INIT"

if [ "$YES" -ne 1 ]; then
    printf 'Install %s for server %s? [y/N] ' "$NAME" "${SERVER_URL:-named in $CONF}"
    read -r answer || answer=""
    case "$answer" in
        y | Y | yes | YES) ;;
        *) die "aborted" ;;
    esac
fi

# --- dependencies ----------------------------------------------------------
if [ "$SKIP_DEPS" -eq 1 ]; then
    say "skipping dependencies (--skip-deps)"
else
    case "$PM" in
        apt-get)
            DEBIAN_FRONTEND=noninteractive apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q cloud-guest-utils parted gdisk e2fsprogs xfsprogs util-linux
            ;;
        dnf | yum) "$PM" install -y cloud-utils-growpart parted gdisk e2fsprogs xfsprogs util-linux ;;
        zypper) zypper --non-interactive install growpart parted gptfdisk e2fsprogs xfsprogs util-linux ;;
        apk) apk add --no-cache cloud-utils-growpart parted sgdisk e2fsprogs xfsprogs util-linux ;;
        *) say "no known package manager: install growpart, parted or sgdisk, e2fsprogs, xfsprogs and util-linux yourself" ;;
    esac
fi

# --- files -----------------------------------------------------------------
install_file() { # mode src dst
    mkdir -p "$(dirname "$3")"
    cp "$2" "$3.tmp.$$"
    chmod "$1" "$3.tmp.$$"
    mv -f "$3.tmp.$$" "$3"
}
# Service files name /usr/bin/xcp-vm-agent; the tarball installs to /usr/local/bin.
install_service_file() { # mode src dst
    mkdir -p "$(dirname "$3")"
    sed "s#/usr/bin/$NAME#$BIN#g" "$2" >"$3.tmp.$$"
    chmod "$1" "$3.tmp.$$"
    mv -f "$3.tmp.$$" "$3"
}

if booted_system && [ -x "$BIN" ] && [ "$INIT" != systemd ] && [ -r /run/$NAME.pid ]; then
    kill -TERM "$(cat /run/$NAME.pid)" 2>/dev/null || true
fi
install_file 0755 "$HERE/$NAME" "$BIN"
install_file 0755 "$HERE/uninstall.sh" "$SHARE/uninstall.sh"
install_file 0644 "$HERE/offline.sh" "$SHARE/offline.sh"
[ -f "$HERE/$NAME.8" ] && install_file 0644 "$HERE/$NAME.8" /usr/local/share/man/man8/$NAME.8
if [ -d /etc/logrotate.d ]; then
    install_file 0644 "$HERE/$NAME.logrotate" /etc/logrotate.d/$NAME
fi
mkdir -p "$STATE_DIR" "$LOG_DIR" "$CONF_DIR"
chmod 0700 "$STATE_DIR"
chmod 0750 "$LOG_DIR"

# Take over from the Python agent 1.0.3 before anything of ours is enabled.
sh "$HERE/takeover.sh" --tarball || say "warning: the takeover from 1.0.3 is incomplete (see above)"

# Config: keep every key of an existing file, set server_url; a file that
# already names this server (or no SERVER_URL given) is kept byte for byte.
umask 077
if [ -f "$CONF" ] && { [ -z "$SERVER_URL" ] || grep -q "\"server_url\"[[:space:]]*:[[:space:]]*\"$SERVER_URL\"" "$CONF"; }; then
    say "kept $CONF as it is (server_url $(sed -n 's/.*"server_url"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$CONF"))"
elif [ -f "$CONF" ] && [ "$(tr -d ' \t\r\n' <"$CONF")" = "{}" ]; then
    printf '{\n  "server_url": "%s"\n}\n' "$SERVER_URL" >"$CONF.tmp.$$"
    say "wrote $CONF"
elif [ -f "$CONF" ]; then
    cp -p "$CONF" "$CONF.bak"
    if grep -q '"server_url"' "$CONF"; then
        sed "s|\"server_url\"[[:space:]]*:[[:space:]]*\"[^\"]*\"|\"server_url\": \"$SERVER_URL\"|" "$CONF" >"$CONF.tmp.$$"
    else
        sed "0,/{/s|{|{\n  \"server_url\": \"$SERVER_URL\",|" "$CONF" >"$CONF.tmp.$$"
    fi
    say "updated server_url in $CONF (previous file kept as $CONF.bak)"
else
    sed "0,/{/s|{|{\n  \"server_url\": \"$SERVER_URL\",|" "$HERE/config.json" >"$CONF.tmp.$$"
    say "wrote $CONF"
fi
if [ -f "$CONF.tmp.$$" ]; then
    chmod 0600 "$CONF.tmp.$$"
    mv -f "$CONF.tmp.$$" "$CONF"
fi
umask 022
if ! "$BIN" --config "$CONF" check-config >/dev/null 2>&1; then
    say "warning: '$BIN --config $CONF check-config' reports a problem; fix $CONF"
fi

# --- service ---------------------------------------------------------------
case "$INIT" in
    systemd)
        # A unit someone wrote by hand stays (takeover.sh said why above).
        if [ -f /etc/systemd/system/$NAME.service ] && ! head -n 1 /etc/systemd/system/$NAME.service | grep -q "^# systemd unit for $NAME"; then
            say "warning: kept the hand-written /etc/systemd/system/$NAME.service: the unit of this tarball is not in force"
        else
            install_service_file 0644 "$HERE/$NAME.service" /etc/systemd/system/$NAME.service
        fi
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload
            systemctl enable $NAME.service
            systemctl restart $NAME.service
            say "started $NAME.service (systemctl status $NAME)"
        else
            systemctl enable $NAME.service || say "warning: systemctl enable failed"
            say "systemd is not running here: $NAME.service is enabled and starts at boot"
        fi
        ;;
    openrc)
        install_service_file 0755 "$HERE/$NAME.openrc" /etc/init.d/$NAME
        rc-update add $NAME default >/dev/null
        if init_running openrc; then
            rc-service $NAME restart
        else
            say "OpenRC is not running here: $NAME is enabled and starts at boot"
        fi
        ;;
    sysv)
        install_service_file 0755 "$HERE/$NAME.init" /etc/init.d/$NAME
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d $NAME defaults >/dev/null
        elif command -v chkconfig >/dev/null 2>&1; then
            chkconfig --add $NAME
        else
            insserv $NAME
        fi
        if init_running sysv; then
            /etc/init.d/$NAME restart
        else
            say "init is not running here: $NAME is enabled and starts at boot"
        fi
        ;;
    none)
        RC=/etc/rc.local
        if [ ! -f "$RC" ]; then
            printf '#!/bin/sh\nexit 0\n' >"$RC"
        fi
        chmod 0755 "$RC"
        if ! grep -qF "$MARK" "$RC"; then
            line="$BIN --config $CONF run >>$LOG_DIR/console.log 2>\&1 \& $MARK"
            if grep -q '^exit 0' "$RC"; then
                sed "0,/^exit 0/s||$line\nexit 0|" "$RC" >"$RC.tmp.$$"
                cat "$RC.tmp.$$" >"$RC"
                rm -f "$RC.tmp.$$"
            else
                printf '%s\n' "$BIN --config $CONF run >>$LOG_DIR/console.log 2>&1 & $MARK" >>"$RC"
            fi
        fi
        if init_running none; then
            nohup "$BIN" --config "$CONF" run >>"$LOG_DIR/console.log" 2>&1 </dev/null &
            echo $! >/run/$NAME.pid
            say "started $NAME (pid $!); $RC starts it at boot"
        else
            say "not the booted system: $RC starts $NAME at boot"
        fi
        ;;
esac
say "done. Uninstall with $SHARE/uninstall.sh"
