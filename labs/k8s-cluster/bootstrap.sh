#!/bin/sh
# node-1: kubeadm init on the cluster network, then a pod network (changes the host).
set -eu
token=$(sh "$HOME/k8s-token.sh")
sudo kubeadm init --apiserver-advertise-address=192.168.1.11 --pod-network-cidr=10.244.0.0/16 \
  --token "$token" --token-ttl 24h0m0s
mkdir -p "$HOME/.kube"
sudo cp /etc/kubernetes/admin.conf "$HOME/.kube/config"
sudo chown "$(id -u):$(id -g)" "$HOME/.kube/config"
kubectl apply -f https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml
