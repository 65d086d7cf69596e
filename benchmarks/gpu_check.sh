#!/usr/bin/env bash
# The checks that need a CUDA machine, as one run that fits a short loan of one: the `gpu` tests,
# then FlexLLMGen side by side with flexjob (`python -m benchmarks --suite gpu --parts flexgen`:
# opt-1.3b, FlexGen's policy `100 0 100 0 100 0` 32x1, prompt 512, gen 32).
#
# A lent GPU machine has torch, transformers, accelerate, pyarrow, rich and click, but reaches no
# package index and no model hub, so what else is needed travels with the repository:
#
#   benchmarks/gpu_check.sh fetch   # here, where pip reaches an index: wheels into .whl/ (git-ignored)
#   benchmarks/gpu_check.sh run     # there, from the repository root, with .whl carried
#
# `run` writes gpu-check.log (everything it printed), pytest-gpu.xml (one line per test) and the
# suite's report (suite-<date>.md / .json) into $OUT (default /tmp/gpu-check), and exits non-zero
# when a test or the benchmark failed. FlexLLMGen loads the tokenizer of facebook/opt-30b from the
# hub; `run` serves it from a local hub cache holding the offline tokenizer of `flexjob make-model`
# (any tokenizer does for its benchmark: the prompts are padded to the prompt length).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=.whl
python_version=${GPU_CHECK_PYTHON:-3.12}  # the lent machines' python3

fetch() {
  grep -qxF "/$wheels/" .git/info/exclude 2>/dev/null || echo "/$wheels/" >>.git/info/exclude
  # What pyproject.toml needs beyond the machine's packages, and FlexLLMGen with its one missing need.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" \
    "pulp>=2.8,<4" "sqlalchemy>=2.0" "alembic>=1.13" mako "platformdirs>=3" flexgen attrs
  du -sh "$wheels"
}

run() {
  local out=${OUT:-/tmp/gpu-check} status=0
  mkdir -p "$out"
  checks "$out" 2>&1 | tee "$out/gpu-check.log" || status=1
  return $status
}

checks() {
  local out=$1 status=0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  python3 -m pip list --path /tmp/site 2>/dev/null | tail -n +3 | tr -s ' ' | paste -sd, -  # what was installed
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

  python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 300 --junitxml "$out/pytest-gpu.xml" tests || status=1

  # The hub cache's layout: refs/main names the snapshot; AutoTokenizer reads the config beside the tokenizer.
  local hub=/tmp/gpu-check-hub/hub/models--facebook--opt-30b snapshot=0000000000000000000000000000000000000000
  mkdir -p "$hub/refs" "$hub/snapshots/$snapshot"
  printf %s "$snapshot" >"$hub/refs/main"
  python3 -c "import json, sys; from pathlib import Path
from engine.model.config import preset; from engine.model.synthetic_tokenizer import write_tokenizer
cfg, into = preset('1.3b'), Path(sys.argv[1])
write_tokenizer(into, cfg.vocab_size); (into / 'config.json').write_text(json.dumps(cfg.to_hf_dict()))" \
    "$hub/snapshots/$snapshot"
  HF_HOME=/tmp/gpu-check-hub HF_HUB_OFFLINE=1 python3 -m benchmarks --suite gpu --parts flexgen \
    --work-dir /tmp/gpu-check-suite --out "$out" || status=1
  return $status
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
