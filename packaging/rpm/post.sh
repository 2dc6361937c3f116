# %post of xcp-vm-agent. $1: 1 = install, 2 = upgrade (restart is in %postun).
# Enable on install; start only when the init system runs (not in chroots,
# containers or image builds). Never fail the transaction.
sysv_running() {
    [ -r /proc/1/root ] || return 1
    [ "$(stat -c %d:%i /)" = "$(stat -Lc %d:%i /proc/1/root 2>/dev/null)" ] || return 1
    rl=$(runlevel 2>/dev/null || true)
    [ -n "$rl" ] && [ "$rl" != unknown ]
}
# Replace the Python agent 1.0.3 first: its unit in /etc/systemd/system
# would override ours (docs/packaging.md).
took_over=0
if [ -x /usr/lib/xcp-vm-agent/takeover ]; then
    if [ -d /opt/xcp-vm-agent ] || grep -qs /opt/xcp-vm-agent /etc/systemd/system/xcp-vm-agent.service; then
        took_over=1
    fi
    /usr/lib/xcp-vm-agent/takeover || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] || [ "$took_over" -eq 1 ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload enable xcp-vm-agent.service >/dev/null 2>&1 || :
        if [ -d /run/systemd/system ]; then
            systemctl start xcp-vm-agent.service >/dev/null 2>&1 || :
        fi
    elif [ -x /etc/init.d/xcp-vm-agent ]; then
        if command -v chkconfig >/dev/null 2>&1; then
            chkconfig --add xcp-vm-agent >/dev/null 2>&1 || :
        elif command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d xcp-vm-agent defaults >/dev/null 2>&1 || :
        elif command -v insserv >/dev/null 2>&1; then
            insserv xcp-vm-agent >/dev/null 2>&1 || :
        fi
        if sysv_running; then
            /etc/init.d/xcp-vm-agent start >/dev/null 2>&1 || :
        fi
    fi
fi
exit 0
