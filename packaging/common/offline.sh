# shellcheck shell=sh
# Offline install of xcp-vm-agent into a system that is not running: a root
# filesystem in a directory (install.sh --root DIR, uninstall.sh --root DIR)
# or in a disk image (install.sh --image FILE). Sourced by install.sh and
# uninstall.sh, which define NAME, HERE, say and die.
#
# Nothing from the target is ever run (no chroot): files are written, and the
# service is enabled by making the links the target's init system would make.
# Every path inside the target is resolved the way the target would resolve
# it (rpath), so an absolute symbolic link in the image (/var/run -> /run,
# /etc/rc.local -> /etc/rc.d/rc.local) never leads outside it.

NAME=xcp-vm-agent
OFF_BIN=/usr/local/bin/$NAME
OFF_SHARE=/usr/local/share/$NAME
OFF_CONF_DIR=/etc/$NAME
OFF_MARK="# $NAME (added by install.sh)"
OFF_BACKUP=/var/backups/$NAME-1.0.3

# Host path of PATH inside the tree at $R, with every symbolic link followed
# as the system at $R would follow it: an absolute target starts again at
# $R, and .. stops at $R. Components that do not exist are kept as they are.
rpath() {
    _rest=$1
    _cur=""
    _links=0
    while :; do
        while [ "${_rest#/}" != "$_rest" ]; do _rest=${_rest#/}; done
        [ -n "$_rest" ] || break
        case "$_rest" in
            */*)
                _c=${_rest%%/*}
                _rest=${_rest#*/}
                ;;
            *)
                _c=$_rest
                _rest=""
                ;;
        esac
        case "$_c" in
            .) continue ;;
            ..)
                _cur=${_cur%/*}
                continue
                ;;
        esac
        if [ -L "$R$_cur/$_c" ]; then
            _links=$((_links + 1))
            [ "$_links" -le 40 ] || die "too many symbolic links resolving $1 inside $R"
            _t=$(readlink "$R$_cur/$_c")
            case "$_t" in /*) _cur="" ;; esac
            _rest="$_t/$_rest"
        else
            _cur="$_cur/$_c"
        fi
    done
    printf '%s\n' "$R$_cur"
}

# One key of the target's /etc/os-release, read as text (never sourced).
os_release() {
    sed -n "s/^$1=//p" "$(rpath /etc/os-release)" | head -n 1 | tr -d "\"'"
}

# Refuse what is not a Linux root filesystem, and this machine's own /.
root_check() {
    [ -d "$R" ] || die "--root $R is not a directory"
    _given=$R
    R=$(cd "$R" && pwd -P)
    if [ "$R" = / ] || [ "$(stat -c %d:%i "$R")" = "$(stat -c %d:%i /)" ]; then
        die "--root $_given is this machine's own /: to install here, run install.sh without --root"
    fi
    [ -d "$(rpath /etc)" ] || die "--root $R has no /etc: not a Linux root filesystem"
    [ -f "$(rpath /etc/os-release)" ] || die "--root $R has no /etc/os-release: not a Linux root filesystem (or one too old to name its distribution)"
    OS_ID=$(os_release ID)
    OS_LIKE=$(os_release ID_LIKE)
    OS_NAME=$(os_release PRETTY_NAME)
    say "target: ${OFF_WHAT:-$R} (${OS_NAME:-${OS_ID:-unknown distribution}})"
}

# Sets INIT and INIT_WHY from the files of the target (or --init).
root_detect_init() {
    if [ -n "$WANT_INIT" ]; then
        INIT=$WANT_INIT
        INIT_WHY="chosen with --init"
        return
    fi
    _init=$(rpath /sbin/init)
    _sd=""
    for _p in /usr/lib/systemd/systemd /lib/systemd/systemd; do
        if [ -x "$(rpath "$_p")" ]; then
            _sd=$_p
            break
        fi
    done
    if [ -e "$_init" ] && [ "${_init##*/}" = systemd ]; then
        INIT=systemd
        INIT_WHY="/sbin/init is ${_init#"$R"}"
    elif [ ! -e "$_init" ] && [ -n "$_sd" ]; then
        INIT=systemd
        INIT_WHY="no /sbin/init, and $_sd exists"
    elif [ -d "$(rpath /etc/init.d)" ] && [ -f "$(rpath /etc/rc.conf)" ]; then
        INIT=openrc
        INIT_WHY="/sbin/init is not systemd, /etc/init.d and /etc/rc.conf exist"
    elif [ -d "$(rpath /etc/init.d)" ]; then
        INIT=sysv
        INIT_WHY="/sbin/init is not systemd, /etc/init.d exists, /etc/rc.conf does not"
    else
        INIT=standalone
        INIT_WHY="no systemd, no /etc/init.d: started from /etc/rc.local"
    fi
}

# A new empty file of our own (mktemp: exclusive create, never a name the
# image could have planted) in DIR, a directory already resolved in the tree.
root_tmp() { # resolved-dir
    mktemp "$1/.$NAME.XXXXXX" || die "cannot create a temporary file in ${1#"$R"}"
}

# Install FILE with MODE at PATH inside the target (atomically): written to
# a file of our own next to it, then renamed over it.
root_put() { # mode src path
    _dst=$(rpath "$3")
    [ ! -d "$_dst" ] || die "${3} in the target is a directory: move it away and rerun"
    mkdir -p "$(dirname "$_dst")"
    _tmp=$(root_tmp "$(dirname "$_dst")")
    cat "$2" >"$_tmp"
    chmod "$1" "$_tmp"
    mv -f "$_tmp" "$_dst"
}

# A service file with the binary path of the tarball install.
root_put_service() { # mode src path
    sed "s#/usr/bin/$NAME#$OFF_BIN#g" "$2" >"$OFF_TMP/service"
    root_put "$1" "$OFF_TMP/service" "$3"
}

# The symbolic link LINK -> TARGET inside the target, as the init system's
# own tool makes it (the target path is written as given, not resolved).
root_link() { # target link
    _l=$(rpath "$(dirname "$2")")/${2##*/}
    mkdir -p "$(dirname "$_l")"
    rm -f "$_l"
    ln -s "$1" "$_l"
}

# Set "key": value (VALUE is raw JSON on one line) in the config, keeping
# every other line; a key on one line is replaced, a missing one added first.
json_set() { # file key value
    _v=$(printf '%s' "$3" | sed 's/[&]/\\&/g')
    if [ "$(tr -d ' \t\r\n' <"$1")" = "{}" ]; then
        printf '{\n  "%s": %s\n}\n' "$2" "$3" >"$1.new"
    elif grep -q "^[[:space:]]*\"$2\"[[:space:]]*:" "$1"; then
        # A value that opens [ or { on this line and closes it on a later
        # one (as jq . writes) cannot be replaced line by line.
        _was=$(grep -m 1 "^[[:space:]]*\"$2\"[[:space:]]*:" "$1")
        _was=${_was#*:}
        case "$_was" in
            *'['* | *'{'*)
                case "$_was" in *']'* | *'}'*) ;; *) die "cannot set $2 in the target's config.json: its value spans several lines; put it on one line (\"$2\": ...) in $OFF_CONF_DIR/config.json, or edit it by hand" ;; esac
                ;;
        esac
        sed "s|^\([[:space:]]*\)\"$2\"[[:space:]]*:.*[^,]\(,\{0,1\}\)[[:space:]]*$|\1\"$2\": $_v\2|" "$1" >"$1.new"
    elif grep -q "\"$2\"" "$1"; then
        die "cannot set $2 in the target's config.json: it is not on a line of its own; edit $OFF_CONF_DIR/config.json by hand"
    else
        sed "0,/{/s|{|{\n  \"$2\": $_v,|" "$1" >"$1.new"
    fi
    mv -f "$1.new" "$1"
}

# The 1.0.3 Python agent in the target, taken over by the rules of a live
# install (takeover.sh): its unit (and unit.d) and /opt/xcp-vm-agent move to
# one backup directory with a README, the links enabling the old unit go,
# /etc/xcp-vm-agent and the old log stay, and one line says so (stdout and
# the agent's log). A unit neither 1.0.3 nor install.sh wrote is refused.
root_takeover() {
    _unit=$(rpath /etc/systemd/system/$NAME.service)
    _opt=$(rpath /opt/$NAME)
    _old_unit=0
    if [ -f "$_unit" ] && [ ! -L "$_unit" ]; then
        if grep -q "/opt/$NAME" "$_unit"; then
            _old_unit=1
        elif ! head -n 1 "$_unit" | grep -q "^# systemd unit for $NAME" && ! grep -q "^ExecStart=$OFF_BIN " "$_unit"; then
            die "/etc/systemd/system/$NAME.service in the target was written by someone else ($(grep -m1 '^ExecStart=' "$_unit")): it is left alone; move it away and rerun"
        fi
    fi
    [ "$_old_unit" -eq 1 ] || [ -d "$_opt" ] || return 0
    if [ "$_old_unit" -eq 1 ]; then
        for _l in "$(rpath /etc/systemd/system)"/*.wants/"$NAME.service"; do
            if [ -L "$_l" ] && [ "$(readlink "$_l")" = "/etc/systemd/system/$NAME.service" ]; then
                rm -f "$_l"
            fi
        done
    fi
    # A directory this run creates (mkdir, not -p): one the image already
    # has at a predictable name could hold links leading to host files.
    mkdir -p "$(rpath /var/backups)"
    _dest=$OFF_BACKUP
    _n=0
    while ! mkdir -m 0700 "$(rpath "$_dest")" 2>/dev/null; do
        _n=$((_n + 1))
        [ "$_n" -le 50 ] || die "cannot create a new backup directory $OFF_BACKUP.* in the target"
        _dest=$OFF_BACKUP.$(date +%Y%m%d-%H%M%S)
        [ "$_n" -eq 1 ] || _dest=$_dest.$_n
    done
    _bk=$(rpath "$_dest")
    chmod 0700 "$_bk"
    _moved=""
    if [ "$_old_unit" -eq 1 ]; then
        mv "$_unit" "$_bk/$NAME.service"
        _moved="/etc/systemd/system/$NAME.service"
        if [ -d "$_unit.d" ]; then
            mv "$_unit.d" "$_bk/$NAME.service.d"
            _moved="$_moved /etc/systemd/system/$NAME.service.d"
        fi
    fi
    if [ -d "$_opt" ]; then
        mv "$_opt" "$_bk/opt-$NAME"
        _moved="${_moved:+$_moved and }/opt/$NAME"
    fi
    # Copies of what stays in place (uninstall.sh --root removes it), links
    # copied as links: nothing outside the tree is read.
    _etc=$(rpath /etc/$NAME)
    [ ! -d "$_etc" ] || cp -a "$_etc" "$_bk/etc-$NAME"
    _log=$(rpath /var/log/$NAME/agent.log)
    [ ! -f "$_log" ] || cp -a "$_log" "$_bk/agent.log"
    cat >"$OFF_TMP/README" <<README
Moved here by install.sh --root (offline, from the host) on $(date -u '+%Y-%m-%d %H:%M UTC')
when it took over from the Python agent 1.0.3:
  $NAME.service   was /etc/systemd/system/$NAME.service (it ran /opt/$NAME)
  opt-$NAME       was /opt/$NAME
  etc-$NAME       a copy of /etc/$NAME (config.json, certificates) as 1.0.3 left it
  agent.log       a copy of /var/log/$NAME/agent.log as 1.0.3 left it
/etc/$NAME and the log also stay where they were and are used by the new
agent (install.sh may have set server_url and certificates in config.json);
uninstall.sh --root removes them there, these copies stay. The old service
was disabled.
README
    root_put 0644 "$OFF_TMP/README" "$_dest/README"
    _kept="/etc/$NAME/config.json (unchanged)"
    [ -d "$(rpath /etc/$NAME)" ] || _kept="no /etc/$NAME"
    _log=$(rpath /var/log/$NAME/agent.log)
    [ -f "$_log" ] && _kept="$_kept and /var/log/$NAME/agent.log"
    _line="took over from the Python agent 1.0.3: disabled it, moved $_moved to $_dest; kept $_kept"
    mkdir -p "$(dirname "$_log")"
    echo "$(date -u '+%Y-%m-%dT%H:%M:%SZ') $NAME: $_line" >>"$_log"
    say "takeover: $_line"
}

# Config: an existing one keeps every key and gets server_url (and the
# certificates when given); key 0600.
root_config() {
    _cd=$(rpath "$OFF_CONF_DIR")
    mkdir -p "$_cd"
    chmod 0755 "$_cd"
    if [ -n "$CLIENT_CERT" ]; then
        root_put 0644 "$CLIENT_CERT" "$OFF_CONF_DIR/agent-cert.pem"
        root_put 0600 "$CLIENT_KEY" "$OFF_CONF_DIR/agent-key.pem"
    fi
    if [ -n "$SERVER_CERT" ]; then
        root_put 0644 "$SERVER_CERT" "$OFF_CONF_DIR/ca-cert.pem"
    fi
    # The file itself resolved in the tree: a link planted at config.json
    # must not lead to a host file.
    _c=$(rpath "$OFF_CONF_DIR/config.json")
    if [ -f "$_c" ]; then
        cp -p "$_c" "$OFF_TMP/config.json"
    else
        cp "$HERE/config.json" "$OFF_TMP/config.json"
    fi
    _old=$(cat "$OFF_TMP/config.json")
    json_set "$OFF_TMP/config.json" server_url "\"$SERVER_URL\""
    if [ -n "$CLIENT_CERT" ]; then
        json_set "$OFF_TMP/config.json" client_cert "[\"$OFF_CONF_DIR/agent-cert.pem\", \"$OFF_CONF_DIR/agent-key.pem\"]"
    fi
    if [ -n "$SERVER_CERT" ]; then
        json_set "$OFF_TMP/config.json" server_cert "\"$OFF_CONF_DIR/ca-cert.pem\""
    fi
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$OFF_TMP/config.json" 2>"$OFF_TMP/json.err" \
            || die "the edited config.json would not be valid JSON ($(tail -n 1 "$OFF_TMP/json.err")): $OFF_CONF_DIR/config.json is left as it was; fix it by hand and rerun"
    fi
    if [ -f "$_c" ] && [ "$(cat "$OFF_TMP/config.json")" = "$_old" ]; then
        say "config: $OFF_CONF_DIR/config.json already says this, left as it was"
    else
        root_put 0600 "$OFF_TMP/config.json" "$OFF_CONF_DIR/config.json"
        say "config: wrote $OFF_CONF_DIR/config.json (server_url${CLIENT_CERT:+, client_cert}${SERVER_CERT:+, server_cert})"
    fi
    chmod 0600 "$_c"
}

# SysV links as Debian's update-rc.d makes them: it calls insserv, which
# numbers every link from the dependencies of all scripts (and may renumber
# others). This machine's insserv runs on the target's /etc/init.d, with the
# target's insserv.conf. Without insserv in the target: the numbers of the
# script's chkconfig header, as chkconfig --add makes them.
# root_sysv_links add NAME: enable; root_sysv_links remove NAME: after the
# script is gone, drop its links and renumber the rest (update-rc.d remove).
root_sysv_links() { # add|remove name
    _id=$(rpath /etc/init.d)
    if [ -e "$(rpath /sbin/insserv)" ] || [ -e "$(rpath /usr/sbin/insserv)" ] || [ -e "$(rpath /usr/lib/insserv/insserv)" ]; then
        _ins=$(command -v insserv || true)
        [ -n "$_ins" ] || [ ! -x /usr/sbin/insserv ] || _ins=/usr/sbin/insserv
        [ -n "$_ins" ] || [ ! -x /sbin/insserv ] || _ins=/sbin/insserv
        [ -n "$_ins" ] || die "the target orders SysV scripts with insserv, and this machine has no insserv to number the links the same way: install it here (Debian/Ubuntu: apt-get install insserv), or use --init standalone"
        # update-rc.d adds -f when initscripts is not installed.
        _f=""
        if ! ls "$(rpath /etc/rcS.d)"/S??mountkernfs.sh >/dev/null 2>&1; then _f=-f; fi
        if [ "$1" = add ]; then
            # shellcheck disable=SC2086 # $_f is one flag or nothing
            "$_ins" $_f -p "$_id" -c "$(rpath /etc/insserv.conf)" -o "$(rpath /etc/insserv/overrides)" -i "$_id" "$2" \
                || die "$_ins on the target's /etc/init.d failed"
        else
            # shellcheck disable=SC2086
            "$_ins" $_f -p "$_id" -c "$(rpath /etc/insserv.conf)" -o "$(rpath /etc/insserv/overrides)" -i "$_id" \
                || die "$_ins on the target's /etc/init.d failed"
        fi
        return
    fi
    # chkconfig: 2345 90 10 (Red Hat and SUSE without insserv).
    _start=90
    _stop=10
    if [ "$1" = remove ]; then
        for _lvl in 0 1 2 3 4 5 6; do
            rm -f "$(rpath /etc/rc$_lvl.d)/S$_start$2" "$(rpath /etc/rc$_lvl.d)/K$_stop$2"
        done
        return
    fi
    for _lvl in 2 3 4 5; do root_link "../init.d/$2" "/etc/rc$_lvl.d/S$_start$2"; done
    for _lvl in 0 1 6; do root_link "../init.d/$2" "/etc/rc$_lvl.d/K$_stop$2"; done
}

# The service for $INIT, enabled with the links that init system makes.
root_service() {
    case "$INIT" in
        systemd)
            root_put_service 0644 "$HERE/$NAME.service" /etc/systemd/system/$NAME.service
            root_link /etc/systemd/system/$NAME.service /etc/systemd/system/multi-user.target.wants/$NAME.service
            say "service: /etc/systemd/system/$NAME.service, enabled: multi-user.target.wants/$NAME.service (as systemctl enable)"
            ;;
        openrc)
            # Debian's (and Devuan's) OpenRC runs the LSB scripts of
            # /etc/init.d, as the .deb ships ours: it has no localmount for
            # the openrc-run script to need, and dpkg's start-stop-daemon
            # has no --stdout for its output_log.
            case " $OS_ID $OS_LIKE " in
                *" debian "*)
                    root_put_service 0755 "$HERE/$NAME.init" /etc/init.d/$NAME
                    _kind="LSB script, as Debian's OpenRC runs them"
                    ;;
                *)
                    root_put_service 0755 "$HERE/$NAME.openrc" /etc/init.d/$NAME
                    _kind=openrc-run
                    ;;
            esac
            root_link /etc/init.d/$NAME /etc/runlevels/default/$NAME
            say "service: /etc/init.d/$NAME ($_kind), enabled: /etc/runlevels/default/$NAME (as rc-update add $NAME default)"
            ;;
        sysv)
            root_put_service 0755 "$HERE/$NAME.init" /etc/init.d/$NAME
            root_sysv_links add "$NAME"
            say "service: /etc/init.d/$NAME, enabled: $(cd "$(rpath /etc)" && find rc?.d -name "[SK]??$NAME" | sort | tr '\n' ' ')"
            ;;
        standalone)
            _rc=$(rpath /etc/rc.local)
            if [ ! -f "$_rc" ]; then
                mkdir -p "$(dirname "$_rc")"
                printf '#!/bin/sh\nexit 0\n' >"$_rc"
            fi
            chmod 0755 "$_rc"
            if ! grep -qF "$OFF_MARK" "$_rc"; then
                _line="$OFF_BIN --config $OFF_CONF_DIR/config.json run >>/var/log/$NAME/console.log 2>\&1 \& $OFF_MARK"
                if grep -q '^exit 0' "$_rc"; then
                    _t=$(root_tmp "$(dirname "$_rc")")
                    sed "0,/^exit 0/s||$_line\nexit 0|" "$_rc" >"$_t"
                    cat "$_t" >"$_rc"
                    rm -f "$_t"
                else
                    printf '%s\n' "$OFF_BIN --config $OFF_CONF_DIR/config.json run >>/var/log/$NAME/console.log 2>&1 & $OFF_MARK" >>"$_rc"
                fi
            fi
            say "service: a line in /etc/rc.local starts $NAME at boot"
            ;;
        *) die "unknown init system $INIT (systemd, openrc, sysv or standalone)" ;;
    esac
}

# The disk tools the target lacks, with its distribution's package names.
root_missing_tools() {
    _missing=""
    _pkgs=""
    case " $OS_ID $OS_LIKE " in
        *" debian "* | *" ubuntu "*) _fam=debian ;;
        *" alpine "*) _fam=alpine ;;
        *" suse "* | *" opensuse "* | *" sles "*) _fam=suse ;;
        *" rhel "* | *" fedora "* | *" centos "*) _fam=rhel ;;
        *" arch "*) _fam=arch ;;
        *) _fam=other ;;
    esac
    for _t in growpart resize2fs xfs_growfs sfdisk/sgdisk; do
        _found=0
        for _alt in $(echo "$_t" | tr / ' '); do
            for _d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
                if [ -f "$(rpath "$_d/$_alt")" ]; then _found=1; fi
            done
        done
        [ "$_found" -eq 0 ] || continue
        _missing="$_missing ${_t%%/*}"
        case "$_fam:$_t" in
            debian:growpart) _p=cloud-guest-utils ;;
            rhel:growpart | alpine:growpart) _p=cloud-utils-growpart ;;
            suse:growpart) _p=growpart ;;
            arch:growpart) _p=cloud-guest-utils ;;
            alpine:resize2fs) _p=e2fsprogs-extra ;;
            *:resize2fs) _p=e2fsprogs ;;
            *:xfs_growfs) _p=xfsprogs ;;
            debian:sfdisk/sgdisk) _p=fdisk ;;
            alpine:sfdisk/sgdisk) _p=sfdisk ;;
            *:sfdisk/sgdisk) _p=util-linux ;;
        esac
        _pkgs="$_pkgs $_p"
    done
    if [ -z "$_missing" ]; then
        say "disk tools: growpart, resize2fs, xfs_growfs and sfdisk/sgdisk are all in the target"
        return
    fi
    case "$_fam" in
        debian) _how="apt-get install$_pkgs" ;;
        rhel) _how="dnf install$_pkgs" ;;
        suse) _how="zypper install$_pkgs" ;;
        alpine) _how="apk add$_pkgs" ;;
        arch) _how="pacman -S$_pkgs" ;;
        *) _how="the packages that provide:$_missing" ;;
    esac
    say "disk tools missing in the target:$_missing (disk jobs that need them fail until they are there); install in the VM: $_how"
}

# install.sh --root: everything into the tree at $R.
root_install() {
    root_check
    root_detect_init
    say "init system: $INIT ($INIT_WHY)"
    OFF_TMP=$(mktemp -d)
    root_takeover
    root_put 0755 "$HERE/$NAME" "$OFF_BIN"
    root_put 0755 "$HERE/uninstall.sh" "$OFF_SHARE/uninstall.sh"
    root_put 0644 "$HERE/offline.sh" "$OFF_SHARE/offline.sh"
    if [ -f "$HERE/$NAME.8" ]; then root_put 0644 "$HERE/$NAME.8" /usr/local/share/man/man8/$NAME.8; fi
    if [ -d "$(rpath /etc/logrotate.d)" ]; then
        root_put 0644 "$HERE/$NAME.logrotate" /etc/logrotate.d/$NAME
    else
        say "logrotate: the target has no /etc/logrotate.d, no rotation file written"
    fi
    mkdir -p "$(rpath /var/lib/$NAME)" "$(rpath /var/log/$NAME)"
    chmod 0700 "$(rpath /var/lib/$NAME)"
    chmod 0750 "$(rpath /var/log/$NAME)"
    root_config
    if ! "$HERE/$NAME" --config "$(rpath $OFF_CONF_DIR/config.json)" check-config >/dev/null 2>&1; then
        say "warning: the config does not pass check-config here (certificate paths are checked on this machine, not in the target)"
    fi
    root_service
    root_missing_tools
    rm -rf "$OFF_TMP"
    say "done: $NAME installed into ${OFF_WHAT:-$R}; it starts at the target's next boot"
}

# uninstall.sh --root: remove what root_install put into $R (the backup of
# a 1.0.3 agent stays).
root_uninstall() {
    root_check
    _i=$(rpath /etc/init.d/$NAME)
    _u=$(rpath /etc/systemd/system/$NAME.service)
    if [ -f "$_u" ] && grep -q "^ExecStart=$OFF_BIN " "$_u"; then
        rm -f "$_u" "$(rpath /etc/systemd/system/multi-user.target.wants)/$NAME.service"
        rmdir "$(rpath /etc/systemd/system/multi-user.target.wants)" 2>/dev/null || true
        say "removed the systemd unit and its link"
    fi
    if [ -f "$_i" ] && grep -q "$OFF_BIN" "$_i"; then
        # OpenRC: runlevel links (to the openrc-run script, or to the LSB
        # script on Debian's OpenRC); else SysV rc?.d links.
        _rl=0
        for _l in "$(rpath /etc/runlevels)"/*/"$NAME"; do
            if [ -L "$_l" ]; then
                rm -f "$_l"
                _rl=1
            fi
        done
        if [ "$_rl" -eq 1 ] || head -n 1 "$_i" | grep -q openrc-run; then
            rm -f "$_i"
            say "removed the OpenRC service and its runlevel links"
        else
            rm -f "$_i"
            root_sysv_links remove "$NAME"
            say "removed the SysV script and its rc?.d links"
        fi
    fi
    _rc=$(rpath /etc/rc.local)
    if [ -f "$_rc" ] && grep -qF "$OFF_MARK" "$_rc"; then
        _t=$(root_tmp "$(dirname "$_rc")")
        grep -vF "$OFF_MARK" "$_rc" >"$_t" || true
        cat "$_t" >"$_rc"
        rm -f "$_t"
        say "removed the line from /etc/rc.local"
    fi
    rm -f "$(rpath "$OFF_BIN")" "$(rpath /usr/local/share/man/man8/$NAME.8)" "$(rpath /etc/logrotate.d/$NAME)"
    rm -rf "$(rpath "$OFF_SHARE")" "$(rpath "$OFF_CONF_DIR")"
    # uninstall.sh's: unmount what is left under it, one filesystem only.
    purge_dir "$(rpath /var/lib/$NAME)"
    if [ "$KEEP_LOGS" -eq 1 ]; then
        say "logs kept in /var/log/$NAME"
    else
        rm -rf "$(rpath /var/log/$NAME)"
    fi
    if [ -d "$(rpath "$OFF_BACKUP")" ]; then
        say "kept $OFF_BACKUP (the 1.0.3 agent's files)"
    fi
    say "removed $NAME from $R"
}

# --- install.sh --image FILE -------------------------------------------------
# Attach the image (loop device; qcow2, VHD and other formats through
# qemu-nbd when the nbd module is there, else qemu-storage-daemon's FUSE
# export), find the root filesystem by its /etc/os-release (also in a linear
# LVM volume, read through a loop device at the volume's offset: no
# device-mapper needed), mount it and any /usr or /var it has elsewhere,
# install as --root, and undo all of it on every path out (trap).

OFF_MOUNTS=""
OFF_LOOPS=""
OFF_NBD=""
OFF_QSD=""
OFF_FUSE=""
OFF_WORK=""
OFF_LVM_CFG='devices { obtain_device_list_from_udev=0 } activation { udev_sync=0 udev_rules=0 }'

# OFF_MOUNTS: one mount point a line, innermost first (TMPDIR may have spaces).
image_cleanup() {
    set +e
    _busy=0
    while IFS= read -r _m; do
        [ -n "$_m" ] || continue
        umount "$_m" 2>/dev/null || umount -l "$_m" || {
            say "warning: could not unmount $_m"
            _busy=1
        }
    done <<EOF
$OFF_MOUNTS
EOF
    OFF_MOUNTS=""
    for _l in $OFF_LOOPS; do
        partx -d "$_l" 2>/dev/null
        losetup -d "$_l" || say "warning: could not detach $_l"
    done
    OFF_LOOPS=""
    if [ -n "$OFF_NBD" ]; then
        qemu-nbd --disconnect "$OFF_NBD" >/dev/null || say "warning: could not disconnect $OFF_NBD"
        OFF_NBD=""
    fi
    if [ -n "$OFF_QSD" ]; then
        kill -TERM "$OFF_QSD" 2>/dev/null
        _i=0
        while [ -d "/proc/$OFF_QSD" ] && [ $_i -lt 100 ]; do
            sleep 0.1
            _i=$((_i + 1))
        done
        OFF_QSD=""
    fi
    if [ -n "$OFF_FUSE" ] && awk -v m="$OFF_FUSE" '{ gsub(/\\040/, " ", $5) } $5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        umount "$OFF_FUSE" 2>/dev/null || umount -l "$OFF_FUSE"
    fi
    OFF_FUSE=""
    if [ -n "$OFF_WORK" ]; then
        # Never remove while something is still mounted below (that would
        # delete the image's files), and never cross into another filesystem.
        if [ "$_busy" -eq 0 ]; then
            rm -rf --one-file-system "$OFF_WORK" || say "warning: could not remove $OFF_WORK"
        else
            say "warning: $OFF_WORK is left in place: something is still mounted below it"
        fi
        OFF_WORK=""
    fi
    if [ -n "${OFF_TMP:-}" ]; then rm -rf "$OFF_TMP"; fi
}

# Processes that have FILE open ("PID (command)"), for the refusal.
image_holders() {
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$(readlink -f "$1")" 2>/dev/null | while read -r _fd; do
        _p=${_fd#/proc/}
        _p=${_p%%/*}
        echo "$_p ($(cat "/proc/$_p/comm" 2>/dev/null))"
    done | sort -u | tr '\n' ' ' | sed 's/ $//'
}

# XFS gets nouuid: a clone of the image (another VM made from the same
# template, being injected at the same time) carries the same filesystem
# UUID, and XFS refuses to mount a UUID that is already mounted.
image_mount() { # device dir [options]
    mkdir -p "$2"
    _xo=""
    [ "$(blkid -p -o value -s TYPE "$1" 2>/dev/null)" != xfs ] || _xo=nouuid,
    mount -o "${_xo}nodev,nosuid,noexec${3:+,$3}" "$1" "$2" || return 1
    OFF_MOUNTS="$2
$OFF_MOUNTS"
}

image_umount() { # dir
    umount "$1"
    _keep=""
    while IFS= read -r _m; do
        [ -z "$_m" ] || [ "$_m" = "$1" ] || _keep="$_keep$_m
"
    done <<EOF
$OFF_MOUNTS
EOF
    OFF_MOUNTS=$_keep
}

image_loop() { # losetup arguments...: sets LOOP (not in a subshell: the list must survive)
    LOOP=$(losetup --find --show "$@") || die "losetup $* failed"
    OFF_LOOPS="$LOOP $OFF_LOOPS"
}

# The partitions of the disk's table (partx reads it), once their /dev
# nodes exist: devtmpfs makes them a moment after the scan (bounded wait).
# A kernel built without partition table parsers scans nothing: partx -a
# tells it about each partition (BLKPG) and is a no-op where it did.
image_partitions() { # /dev/loopN
    _nrs=$(partx -g -o NR "$1" 2>/dev/null || true)
    [ -z "$_nrs" ] || [ -b "$1p${_nrs%% *}" ] || partx -a "$1" 2>/dev/null || true
    for _nr in $_nrs; do
        _i=0
        while [ ! -b "$1p$_nr" ] && [ $_i -lt 200 ]; do
            sleep 0.05
            _i=$((_i + 1))
        done
        [ -b "$1p$_nr" ] || die "$1p$_nr did not appear"
        echo "$1p$_nr"
    done
}

# Loop devices over the linear logical volumes of an LVM physical volume
# (read with this machine's lvm, never activated): adds them to OFF_DEVS
# and "dev vg/lv" lines to OFF_LVS.
image_lvm() { # pv device
    if ! command -v lvm >/dev/null 2>&1; then
        say "$1 is an LVM physical volume and this machine has no lvm (Debian: apt-get install lvm2): its volumes are not searched"
        return 0
    fi
    _pe=$(LVM_SUPPRESS_FD_WARNINGS=1 lvm pvs --devices "$1" --config "$OFF_LVM_CFG" --noheadings --units b --nosuffix -o pe_start "$1" 2>/dev/null | tr -d ' ')
    _segs=$(LVM_SUPPRESS_FD_WARNINGS=1 lvm lvs --devices "$1" --config "$OFF_LVM_CFG" --noheadings --units b --nosuffix --separator : -o vg_name,lv_name,segtype,seg_pe_ranges,vg_extent_size 2>/dev/null | tr -d ' ')
    [ -n "$_pe" ] && [ -n "$_segs" ] || return 0
    for _s in $_segs; do
        _vl=$(echo "$_s" | cut -d: -f1,2)
        if [ "$(echo "$_segs" | grep -c "^$_vl:")" -ne 1 ] || [ "$(echo "$_s" | cut -d: -f3)" != linear ]; then
            say "LVM volume ${_vl%%:*}/${_vl#*:} is not one linear segment on this disk: without device-mapper it cannot be read here, so it is not searched"
            continue
        fi
        _range=$(echo "$_s" | cut -d: -f5)
        _ext=$(echo "$_s" | cut -d: -f6)
        _first=${_range%-*}
        _last=${_range#*-}
        image_loop --offset $((_pe + _first * _ext)) --sizelimit $(((_last - _first + 1) * _ext)) "$1"
        OFF_DEVS="$OFF_DEVS $LOOP"
        OFF_LVS="$OFF_LVS
$LOOP ${_vl%%:*}/${_vl#*:}"
        say "LVM volume ${_vl%%:*}/${_vl#*:}: $LOOP (offset $((_pe + _first * _ext)) bytes)"
    done
}

# The device an /etc/fstab spec names, among the image's devices.
image_resolve() { # spec
    case "$1" in
        UUID=* | LABEL=* | PARTUUID=*)
            _k=${1%%=*}
            _v=${1#*=}
            ;;
        /dev/disk/by-uuid/*) _k=UUID _v=${1##*/} ;;
        /dev/disk/by-label/*) _k=LABEL _v=${1##*/} ;;
        /dev/disk/by-partuuid/*) _k=PARTUUID _v=${1##*/} ;;
        /dev/mapper/*)
            # VG-LV, each with its dashes doubled.
            echo "$OFF_LVS" | awk -v w="${1#/dev/mapper/}" 'NF == 2 {
                split($2, a, "/"); v = a[1]; l = a[2]
                gsub(/-/, "--", v); gsub(/-/, "--", l)
                if (v "-" l == w) print $1 }'
            return
            ;;
        /dev/*/*)
            echo "$OFF_LVS" | awk -v w="${1#/dev/}" '$2 == w { print $1 }'
            return
            ;;
        *) return ;;
    esac
    for _d in $OFF_DEVS; do
        if [ "$(blkid -p -o value -s "$_k" "$_d" 2>/dev/null)" = "$_v" ] \
            || { [ "$_k" = PARTUUID ] && [ "$(blkid -o value -s PARTUUID "$_d" 2>/dev/null)" = "$_v" ]; }; then
            echo "$_d"
            return
        fi
    done
}

image_install() {
    [ -f "$IMAGE" ] || die "--image $IMAGE is not a file"
    _held=$(image_holders "$IMAGE")
    [ -z "$_held" ] || die "$IMAGE is open by $_held: shut the VM down (or stop what holds it) first"
    [ -z "$(losetup -j "$IMAGE")" ] || die "$IMAGE is attached as $(losetup -j "$IMAGE" | cut -d: -f1 | tr '\n' ' '): detach it first"
    trap image_cleanup EXIT
    trap 'say "interrupted: cleaning up"; exit 130' INT
    trap 'say "terminated: cleaning up"; exit 143' TERM HUP
    trap 'exit 141' PIPE
    OFF_WORK=$(mktemp -d "${TMPDIR:-/tmp}/$NAME-image.XXXXXX")
    _fmt=raw
    if command -v qemu-img >/dev/null 2>&1; then
        _fmt=$(qemu-img info --output=json "$IMAGE" | sed -n 's/^    "format": "\(.*\)",*$/\1/p' | head -n 1) \
            || die "qemu-img info $IMAGE failed (is a VM still using it?)"
    elif [ "$(head -c 4 "$IMAGE" | od -An -c | tr -d ' ')" = 'QFI\373' ]; then
        die "$IMAGE is a qcow2 image: install qemu-utils (qemu-img, qemu-nbd) to attach it"
    fi
    say "image: $IMAGE (format ${_fmt:-unknown})"
    case "$_fmt" in
        raw)
            image_loop --partscan "$IMAGE"
            _disk=$LOOP
            ;;
        "") die "cannot tell the format of $IMAGE" ;;
        *)
            if [ -e /sys/block/nbd0 ] && command -v qemu-nbd >/dev/null 2>&1; then
                for _n in /sys/block/nbd*; do
                    if [ "$(cat "$_n/size")" = 0 ] && [ ! -e "$_n/pid" ]; then
                        OFF_NBD=/dev/${_n##*/}
                        break
                    fi
                done
                [ -n "$OFF_NBD" ] || die "no free nbd device"
                qemu-nbd --connect="$OFF_NBD" --format="$_fmt" "$IMAGE" || { OFF_NBD=""; die "qemu-nbd --connect $IMAGE failed"; }
                _i=0
                while [ "$(cat "/sys/block/${OFF_NBD#/dev/}/size")" = 0 ] && [ $_i -lt 100 ]; do
                    sleep 0.05
                    _i=$((_i + 1))
                done
                say "attached with qemu-nbd as $OFF_NBD"
                image_loop --partscan "$OFF_NBD"
                _disk=$LOOP
            elif command -v qemu-storage-daemon >/dev/null 2>&1 && [ -e /dev/fuse ]; then
                OFF_FUSE=$OFF_WORK/disk.raw
                : >"$OFF_FUSE"
                qemu-storage-daemon --daemonize --pidfile "$OFF_WORK/qsd.pid" \
                    --blockdev "driver=file,node-name=file,filename=$IMAGE" \
                    --blockdev "driver=$_fmt,node-name=disk,file=file" \
                    --export "type=fuse,id=disk,node-name=disk,mountpoint=$OFF_FUSE,writable=on" \
                    || die "qemu-storage-daemon could not open $IMAGE as $_fmt"
                OFF_QSD=$(cat "$OFF_WORK/qsd.pid")
                say "attached with qemu-storage-daemon (FUSE export; no nbd module on this machine)"
                image_loop --partscan "$OFF_FUSE"
                _disk=$LOOP
            else
                die "$IMAGE is $_fmt: attaching it needs qemu-nbd and the nbd kernel module, or qemu-storage-daemon and /dev/fuse (Debian: apt-get install qemu-utils); or convert it: qemu-img convert -O raw $IMAGE disk.raw"
            fi
            ;;
    esac
    OFF_DEVS=$(image_partitions "$_disk")
    [ -n "$OFF_DEVS" ] || OFF_DEVS=$_disk
    OFF_LVS=""
    for _d in $OFF_DEVS; do
        if [ "$(blkid -p -o value -s TYPE "$_d" 2>/dev/null)" = LVM2_member ]; then
            image_lvm "$_d"
        fi
    done
    _root=""
    _n=0
    for _d in $OFF_DEVS; do
        _t=$(blkid -p -o value -s TYPE "$_d" 2>/dev/null)
        case "$_t" in ext2 | ext3 | ext4 | xfs | btrfs) ;; *) continue ;; esac
        _n=$((_n + 1))
        _m=$OFF_WORK/probe$_n
        image_mount "$_d" "$_m" ro || continue
        if [ -f "$(R=$_m rpath /etc/os-release)" ]; then
            _root=$_d
            _opts=""
        elif [ "$_t" = btrfs ]; then
            for _sv in "$_m"/*; do
                if [ -f "$(R=$_sv rpath /etc/os-release)" ]; then
                    _root=$_d
                    _opts=subvol=${_sv##*/}
                    break
                fi
            done
        fi
        image_umount "$_m"
        [ -z "$_root" ] || break
    done
    [ -n "$_root" ] || die "no root filesystem (one with /etc/os-release) found in $IMAGE among: $OFF_DEVS"
    R=$OFF_WORK/root
    image_mount "$_root" "$R" "$_opts" || die "cannot mount $_root"
    say "root filesystem: $_root${_opts:+ ($_opts)}, mounted at $R"
    OFF_WHAT="the root filesystem of $IMAGE"
    # /usr, /var (and below) on filesystems of their own, from the image's fstab.
    _fstab=$(rpath /etc/fstab)
    if [ -f "$_fstab" ]; then
        # shellcheck disable=SC2034 # the fields after the options are read to skip them
        grep -v '^[[:space:]]*#' "$_fstab" | while read -r _spec _mp _type _o _rest; do
            [ -z "$_mp" ] || echo "$_spec $_mp ${_type:-auto} ${_o:-defaults}"
        done >"$OFF_WORK/fstab"
        while read -r _spec _mp _type _o; do
            case "$_mp" in /usr | /usr/* | /var | /var/* | /opt | /opt/*) ;; *) continue ;; esac
            # Only what the installer writes below needs its filesystem.
            _need=0
            for _w in /usr/local/bin /usr/local/share /var/lib/$NAME /var/log/$NAME /var/backups /opt/$NAME; do
                case "$_w/" in "${_mp%/}"/*) _need=1 ;; esac
            done
            if [ "$_need" -eq 0 ]; then
                continue
            fi
            case ",$_o," in
                *,bind,* | *,rbind,* | *,noauto,*)
                    say "not mounting $_mp ($_o in the image's fstab)"
                    continue
                    ;;
            esac
            case "$_type" in
                tmpfs | ramfs | nfs | nfs4 | cifs | smb3 | fuse | fuse.* | fuseblk | none | swap)
                    say "not mounting $_mp ($_type in the image's fstab: nothing of the image's disk)"
                    continue
                    ;;
            esac
            _dev=$(image_resolve "$_spec")
            [ -n "$_dev" ] || die "the image's /etc/fstab mounts $_mp from $_spec, which is not in $IMAGE (or cannot be read here): refusing to install into a root whose $_mp is elsewhere"
            # btrfs: the same subvolume the guest mounts there.
            _sv=$(echo "$_o" | tr ',' '\n' | grep -E '^(subvol|subvolid)=' | tr '\n' ',' | sed 's/,$//')
            image_mount "$_dev" "$(rpath "$_mp")" "$_sv" || die "cannot mount $_dev on $_mp${_sv:+ ($_sv)}"
            say "mounted $_spec on $_mp${_sv:+ ($_sv)}"
        done <"$OFF_WORK/fstab"
    fi
    if [ -n "${XCP_VM_AGENT_TEST_PAUSE:-}" ]; then
        say "paused (test hook)"
        sleep "$XCP_VM_AGENT_TEST_PAUSE"
    fi
    root_install
    image_cleanup
    trap - EXIT INT TERM HUP PIPE
    say "detached $IMAGE"
}

# install.sh --root DIR | --image FILE: parse the arguments, then install.
offline_main() {
    R=""
    IMAGE=""
    WANT_INIT=""
    CLIENT_CERT=""
    CLIENT_KEY=""
    SERVER_CERT=""
    SERVER_URL=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --root | --image | --init | --server-cert)
                [ $# -ge 2 ] || die "$1 needs an argument"
                case "$1" in
                    --root) R=$2 ;;
                    --image) IMAGE=$2 ;;
                    --init)
                        case "$2" in systemd | openrc | sysv | standalone) ;; *) die "--init takes systemd, openrc, sysv or standalone, not $2" ;; esac
                        WANT_INIT=$2
                        ;;
                    --server-cert) SERVER_CERT=$2 ;;
                esac
                shift 2
                ;;
            --client-cert)
                [ $# -ge 3 ] || die "--client-cert needs CERT and KEY"
                CLIENT_CERT=$2
                CLIENT_KEY=$3
                shift 3
                ;;
            -y | --yes | --skip-deps) shift ;;
            -h | --help)
                usage
                exit 0
                ;;
            -*) die "unknown option $1" ;;
            *)
                [ -z "$SERVER_URL" ] || die "only one SERVER_URL may be given"
                SERVER_URL=$1
                shift
                ;;
        esac
    done
    [ -z "$R" ] || [ -z "$IMAGE" ] || die "give --root or --image, not both"
    [ -n "$SERVER_URL" ] || die "SERVER_URL is required"
    case "$SERVER_URL" in
        https://?*) ;;
        *) die "SERVER_URL must start with https:// (the agent always verifies TLS; got $SERVER_URL)" ;;
    esac
    case "$SERVER_URL" in
        *'"'* | *\\* | *' '* | *'|'*) die "SERVER_URL must not contain quotes, backslashes, spaces or |" ;;
    esac
    for _f in "$CLIENT_CERT" "$CLIENT_KEY" "$SERVER_CERT"; do
        [ -z "$_f" ] || [ -r "$_f" ] || die "cannot read $_f"
    done
    [ "$(id -u)" -eq 0 ] || die "run as root"
    [ -f "$HERE/$NAME" ] || die "$HERE/$NAME not found: run install.sh from the unpacked tarball"
    if [ -n "$IMAGE" ]; then
        image_install
    else
        trap 'rm -rf "${OFF_TMP:-}"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM HUP
        root_install
    fi
}
