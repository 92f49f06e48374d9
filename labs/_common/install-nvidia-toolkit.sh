#!/bin/bash
# Install the NVIDIA container toolkit and make it Docker's GPU runtime (as in the course's mltrain and
# serve labs), then check that a container sees the GPU.
set -euo pipefail

keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | sudo gpg --batch --yes --dearmor -o "$keyring"
curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
    | sed "s#deb https://#deb [signed-by=$keyring] https://#g" \
    | sudo tee /etc/apt/sources.list.d/nvidia-container-toolkit.list >/dev/null

sudo apt-get update -q
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-container-toolkit jq
sudo nvidia-ctk runtime configure --runtime=docker

# Work around https://github.com/NVIDIA/nvidia-container-toolkit/issues/48 (GPUs lost after a
# systemd daemon-reload) by using the cgroupfs driver.
sudo jq 'if has("exec-opts") then . else . + {"exec-opts": ["native.cgroupdriver=cgroupfs"]} end' \
    /etc/docker/daemon.json | sudo tee /etc/docker/daemon.json.tmp >/dev/null
sudo mv /etc/docker/daemon.json.tmp /etc/docker/daemon.json
sudo systemctl restart docker

sudo docker run --rm --gpus all ubuntu:24.04 nvidia-smi -L
