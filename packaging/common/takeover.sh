#!/bin/sh
# Take over from the Python agent 1.0.3 (run by the .deb postinst, the .rpm
# %post, the .apk post-install and install.sh; needs no input).
#
#   takeover [--tarball]
#
# 1.0.3's installer left /opt/xcp-vm-agent and a unit of the same name as
# ours in /etc/systemd/system, which overrides the packaged unit in
# /usr/lib/systemd/system. When that layout is found: stop and disable the
# old service, move the old unit and /opt/xcp-vm-agent into ONE directory,
# /var/backups/xcp-vm-agent-1.0.3 (with a README saying how to go back),
# daemon-reload, and log one line (stdout, /var/log/xcp-vm-agent/agent.log
# and syslog). /etc/xcp-vm-agent (config.json, certificates) and the old
# log are not touched. The caller then enables and starts our service.
#
# A unit in /etc/systemd/system/xcp-vm-agent.service that 1.0.3 did not
# write (it does not run /opt/xcp-vm-agent) is left alone with a warning:
# it overrides the packaged unit. --tarball: install.sh's own unit (first
# line "# systemd unit for xcp-vm-agent") is not foreign; install.sh
# rewrites it. Exit status: 0 (nothing to do or done), 1 (a step failed).
set -u

NAME=xcp-vm-agent
UNIT=/etc/systemd/system/$NAME.service
OLD=/opt/$NAME
BACKUP=/var/backups/$NAME-1.0.3
LOG=/var/log/$NAME/agent.log
TARBALL=0
[ "${1:-}" = "--tarball" ] && TARBALL=1

say() {
    echo "$NAME: $*"
    if [ -d /run/systemd/system ] && command -v logger >/dev/null 2>&1; then
        logger -t "$NAME" -- "$*" 2>/dev/null || true
    fi
}

old_unit=0
if [ -f "$UNIT" ] && [ ! -L "$UNIT" ]; then
    if grep -q "/opt/$NAME" "$UNIT"; then
        old_unit=1
    elif [ "$TARBALL" -eq 1 ] && head -n 1 "$UNIT" | grep -q "^# systemd unit for $NAME"; then
        :
    else
        say "warning: $UNIT was not written by the Python agent 1.0.3 (it does not run $OLD), so it is left alone; it overrides the packaged unit, and systemd runs what it says. Remove it and run 'systemctl daemon-reload' to use the packaged unit."
    fi
fi
if [ "$old_unit" -eq 0 ] && [ ! -d "$OLD" ]; then
    exit 0
fi

failed=0
if [ "$old_unit" -eq 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop "$NAME.service" >/dev/null 2>&1 || failed=1
        systemctl disable "$NAME.service" >/dev/null 2>&1 || true
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl disable "$NAME.service" >/dev/null 2>&1 || true
    fi
    # Whatever made them (systemctl or a hand), drop the enablement links
    # that point at the old unit.
    for l in /etc/systemd/system/*.wants/"$NAME.service"; do
        if [ -L "$l" ] && [ "$(readlink "$l")" = "$UNIT" ]; then
            rm -f "$l"
        fi
    done
fi

dest=$BACKUP
if [ -e "$dest" ]; then
    dest=$BACKUP.$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$dest" && chmod 0700 "$dest" || exit 1
moved=""
if [ "$old_unit" -eq 1 ]; then
    mv "$UNIT" "$dest/$NAME.service" || failed=1
    moved="$UNIT"
    if [ -d "$UNIT.d" ]; then
        mv "$UNIT.d" "$dest/$NAME.service.d" || failed=1
        moved="$moved $UNIT.d"
    fi
fi
if [ -d "$OLD" ]; then
    mv "$OLD" "$dest/opt-$NAME" || failed=1
    moved="${moved:+$moved and }$OLD"
fi
cat >"$dest/README" <<README
Moved here by the $NAME package or install.sh on $(date -u '+%Y-%m-%d %H:%M UTC')
when it took over from the Python agent 1.0.3:
  $NAME.service   was $UNIT (it ran /opt/$NAME)
  opt-$NAME       was /opt/$NAME
Kept where they were: /etc/$NAME (config.json, certificates) and
/var/log/$NAME/agent.log. The old service was stopped and disabled.
README
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || failed=1
fi

kept="/etc/$NAME/config.json (unchanged)"
[ -d /etc/$NAME ] || kept="no /etc/$NAME"
[ -f "$LOG" ] && kept="$kept and $LOG"
line="took over from the Python agent 1.0.3: stopped and disabled it, moved $moved to $dest; kept $kept"
mkdir -p "/var/log/$NAME"
echo "$(date -u '+%Y-%m-%dT%H:%M:%SZ') $NAME: $line" >>"$LOG"
say "$line"
if [ "$failed" -ne 0 ]; then
    say "warning: a step of the takeover failed (see above)"
    exit 1
fi
exit 0
