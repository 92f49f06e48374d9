#!/bin/sh
# The other nodes: join node-1's control plane over the cluster network (changes the host).
set -eu
token=$(sh "$HOME/k8s-token.sh")
sudo kubeadm join 192.168.1.11:6443 --token "$token" --discovery-token-unsafe-skip-ca-verification
