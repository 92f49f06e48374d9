#!/bin/bash
# Start the serve-edge lab's Jupyter container on port 8888 on a CPU node, as the course runs it on the
# Raspberry Pi 5 (quay.io/jupyter/minimal-notebook with the lab's models and notebook under work/, and
# onnxruntime installed), with a random token kept in ~/jupyter-token.txt. Running it again restarts it.
set -euo pipefail

image=quay.io/jupyter/minimal-notebook:latest
token_file="$HOME/jupyter-token.txt"
mkdir -p "$HOME/work"
cp -rn "$HOME/serve-edge-chi/workspace/models" "$HOME/work/" 2>/dev/null || true
cp -n "$HOME/serve-edge-chi/workspace/measure_pi.ipynb" "$HOME/work/" 2>/dev/null || true
if [ ! -s "$token_file" ]; then
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token_file")
fi

sudo docker rm -f jupyter >/dev/null 2>&1 || true
sudo docker pull -q "$image"
sudo docker run -d --name jupyter --restart unless-stopped -p 8888:8888 \
    -v "$HOME/work:/home/jovyan/work" "$image" \
    bash -c "python3 -m pip install -q onnxruntime && start-notebook.py --IdentityProvider.token=$(cat "$token_file")" \
    >/dev/null

for _ in $(seq 90); do
    if curl -fsS -o /dev/null http://127.0.0.1:8888/api/status -H "Authorization: token $(cat "$token_file")"; then
        echo "Jupyter is up on port 8888; the token is in ~/jupyter-token.txt"
        exit 0
    fi
    sleep 2
done
echo "Jupyter did not answer on port 8888 within 3 minutes; see: sudo docker logs jupyter" >&2
exit 1
