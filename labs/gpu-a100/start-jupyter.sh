#!/bin/bash
# Start Jupyter (PyTorch, CUDA 12) in a container on port 8888 with the node's GPUs and a random token.
# Running it again restarts the container with the same token.
set -euo pipefail

image=quay.io/jupyter/pytorch-notebook:cuda12-latest
token_file="$HOME/jupyter-token.txt"
mkdir -p "$HOME/work"
if [ ! -s "$token_file" ]; then
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token_file")
fi

sudo docker rm -f jupyter >/dev/null 2>&1 || true
sudo docker pull -q "$image"
sudo docker run -d --name jupyter --restart unless-stopped --gpus all \
    -p 8888:8888 -v "$HOME/work:/home/jovyan/work" \
    "$image" start-notebook.py --IdentityProvider.token="$(cat "$token_file")" >/dev/null

for _ in $(seq 60); do
    if curl -fsS -o /dev/null http://127.0.0.1:8888/api/status -H "Authorization: token $(cat "$token_file")"; then
        echo "Jupyter is up on port 8888; the token is in ~/jupyter-token.txt"
        exit 0
    fi
    sleep 2
done
echo "Jupyter did not answer on port 8888 within 2 minutes; see: sudo docker logs jupyter" >&2
exit 1
