#!/bin/sh
# Write a marker file naming the lab, node and time, and show the node's accelerators if it has any.
# Changes nothing on the host (no sudo, no packages): safe on --site sim.
lab="${1:?usage: node-info.sh LAB}"
node="${LABCTL_NODE:-$(hostname)}"
echo "labctl $lab on $node at $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "labctl-$lab.txt"
cat "labctl-$lab.txt"
echo "cpus: $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?')"
awk '/^MemTotal/ {printf "memory: %.1f GiB\n", $2 / 1048576}' /proc/meminfo 2>/dev/null
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
elif command -v rocm-smi >/dev/null 2>&1; then
    rocm-smi --showproductname || rocm-smi
else
    echo "no GPU tools found (nvidia-smi, rocm-smi): CPU only, or drivers not loaded"
fi
