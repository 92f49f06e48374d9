#!/bin/sh
# Print basic facts about this machine with commands found on any Linux (no sudo, changes nothing).

section() { printf '\n== %s ==\n' "$1"; }

section "host"
echo "hostname: $(hostname)"
echo "user:     $(id -un)"
echo "kernel:   $(uname -srm)"
if [ -r /etc/os-release ]; then
    . /etc/os-release
    echo "os:       ${PRETTY_NAME:-unknown}"
fi
echo "uptime:   $(cat /proc/uptime 2>/dev/null | cut -d' ' -f1) s"

section "cpu and memory"
echo "cpus:     $(getconf _NPROCESSORS_ONLN 2>/dev/null || grep -c ^processor /proc/cpuinfo)"
grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: /model:    /'
awk '/^MemTotal/ {printf "memory:   %.1f GiB\n", $2 / 1048576}' /proc/meminfo 2>/dev/null

section "disk"
df -h "$HOME" 2>/dev/null | tail -n 1

section "network"
if command -v ip >/dev/null 2>&1; then
    ip -o -4 addr show 2>/dev/null | awk '{print $2": "$4}'
else
    hostname -I 2>/dev/null || echo "(no 'ip' command)"
fi

section "gpu"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
else
    echo "no NVIDIA GPU (nvidia-smi not found)"
fi

section "hello.txt"
cat "$HOME/hello.txt" 2>/dev/null || echo "(no hello.txt yet)"
