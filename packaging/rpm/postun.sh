# %postun of xcp-vm-agent. $1: 0 = erase, >= 1 = upgrade: restart if running.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl try-restart xcp-vm-agent.service >/dev/null 2>&1 || :
    elif [ -x /etc/init.d/xcp-vm-agent ] && [ -r /run/xcp-vm-agent.pid ]; then
        /etc/init.d/xcp-vm-agent restart >/dev/null 2>&1 || :
    fi
fi
exit 0
