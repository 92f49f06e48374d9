#!/bin/sh
# Every node: cluster names in /etc/hosts, containerd and kubeadm/kubelet/kubectl (changes the host).
set -eu
grep -q ' node-1 ' /etc/hosts || sudo sh -c 'cat ~cc/cluster-hosts >> /etc/hosts' 2>/dev/null \
  || sudo sh -c "cat $HOME/cluster-hosts >> /etc/hosts"
sudo swapoff -a
sudo apt-get update -q
sudo apt-get install -y -q containerd apt-transport-https ca-certificates curl gpg
sudo mkdir -p /etc/containerd /etc/apt/keyrings
containerd config default | sed 's/SystemdCgroup = false/SystemdCgroup = true/' | sudo tee /etc/containerd/config.toml >/dev/null
sudo systemctl restart containerd
curl -fsSL https://pkgs.k8s.io/core:/stable:/v1.31/deb/Release.key | sudo gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes.gpg
echo 'deb [signed-by=/etc/apt/keyrings/kubernetes.gpg] https://pkgs.k8s.io/core:/stable:/v1.31/deb/ /' \
  | sudo tee /etc/apt/sources.list.d/kubernetes.list >/dev/null
sudo apt-get update -q
sudo apt-get install -y -q kubelet kubeadm kubectl
echo 'net.ipv4.ip_forward=1' | sudo tee /etc/sysctl.d/k8s.conf >/dev/null
sudo sysctl --system >/dev/null
