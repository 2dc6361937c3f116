# %preun of xcp-vm-agent. $1: 0 = erase, >= 1 = upgrade (nothing to do).
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now xcp-vm-agent.service >/dev/null 2>&1 || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload disable xcp-vm-agent.service >/dev/null 2>&1 || :
    elif [ -x /etc/init.d/xcp-vm-agent ]; then
        if [ -r /run/xcp-vm-agent.pid ]; then
            /etc/init.d/xcp-vm-agent stop >/dev/null 2>&1 || :
        fi
        if command -v chkconfig >/dev/null 2>&1; then
            chkconfig --del xcp-vm-agent >/dev/null 2>&1 || :
        elif command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d -f xcp-vm-agent remove >/dev/null 2>&1 || :
        elif command -v insserv >/dev/null 2>&1; then
            insserv -r xcp-vm-agent >/dev/null 2>&1 || :
        fi
    fi
fi
exit 0
