#!/usr/bin/env bash
# Run here, before the GPU calls: downloads the wheels of the Python packages that the GPU machine
# lacks into .whl/ (git-ignored through .git/info/exclude; nothing is committed), for its Python
# (3.12, x86-64). The device tool's run then carries them (carry: [".whl"]) and
# benchmarks/gpu_check.sh installs them there before its first step.
#
# The one such package is pytorch-metric-learning (pure Python; its needs, numpy, scikit-learn,
# tqdm and torch, are there): the rival in the loss benchmark's step (bench_ap_loss.py), so that
# the peer is measured on the GPU in the same run as fastap.
#
# Env: PYTHON (python3), PACKAGES ("pytorch-metric-learning==2.9.0").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
read -ra packages <<<"${PACKAGES:-pytorch-metric-learning==2.9.0}"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
if ! grep -qx '/.whl/' "$exclude" 2>/dev/null; then
  [[ ! -s $exclude || -z $(tail -c1 "$exclude") ]] || echo >>"$exclude"  # end its last line
  echo '/.whl/' >>"$exclude"
fi
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
ls -l .whl
[[ -z $(git status --porcelain --ignored=no -- .whl) ]] || {
  echo "error: .whl is not ignored by git" >&2; exit 1; }
