#!/bin/bash
# Docker from get.docker.com, and the user in the docker group (as in the course's data-persist-chi lab).
# The block volume is mounted at /mnt/block before this runs (labctl's built-in step).
set -euo pipefail
if ! command -v docker >/dev/null; then
  curl -fsSL https://get.docker.com | sudo sh
fi
sudo groupadd -f docker
sudo usermod -aG docker "$USER"
docker --version || sudo docker --version
