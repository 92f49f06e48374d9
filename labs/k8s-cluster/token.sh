#!/bin/sh
# A kubeadm bootstrap token derived from the deployment name, so node-1 and the others agree without talking.
name=${LABCTL_NODE:-$(hostname)}
deployment=${name%-node-*}
h=$(printf '%s' "$deployment" | sha256sum | cut -c1-22)
echo "$(echo "$h" | cut -c1-6).$(echo "$h" | cut -c7-22)"
