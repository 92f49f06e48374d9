#!/bin/bash
# Build nvtop from source with AMD GPU support (the Ubuntu package is too old for the MI100), as the
# course's mltrain-chi lab does (snippets/create_server_amd.md).
set -euo pipefail

if command -v nvtop >/dev/null 2>&1; then
    echo "nvtop is already installed: $(command -v nvtop)"
    exit 0
fi
sudo apt-get update -q
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake libncurses-dev libsystemd-dev libudev-dev \
    libdrm-dev libgtest-dev
rm -rf "$HOME/nvtop"
git clone --depth 1 https://github.com/Syllo/nvtop "$HOME/nvtop"
mkdir -p "$HOME/nvtop/build"
cd "$HOME/nvtop/build"
cmake .. -DAMDGPU_SUPPORT=ON
sudo make install
