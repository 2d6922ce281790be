#!/usr/bin/env bash
# GPU check: on a machine with CUDA, run the merge and alignment benchmarks and the CUDA-parametrised tests
# with the device set to cuda, and print one JSON object with each step's exit status and output.
# On a machine without CUDA, print one JSON line saying so and exit 0.
#
#     PYTHON=/path/to/venv/bin/python benchmarks/gpu_check.sh [--quick]
#
# --quick leaves out the Qwen2-0.5B-shaped alignment case (minutes on the CPU side: linear assignment).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT" || exit 1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    printf '{"gpu_check": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is false)"}\n'
    exit 0
fi

ALIGN_CASES="mlp gpt2 qwen2-0.5b"
if [ "${1:-}" = "--quick" ]; then ALIGN_CASES="mlp gpt2"; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" benchmarks/merge_bench.py --device cuda >"$WORK/merge.out" 2>"$WORK/merge.err"; echo $? >"$WORK/merge.rc"
# shellcheck disable=SC2086
"$PY" benchmarks/align_bench.py --device cuda --cases $ALIGN_CASES >"$WORK/align.out" 2>"$WORK/align.err"
echo $? >"$WORK/align.rc"
# tests that run on CUDA are parametrised by device; -k cuda selects their CUDA cases
CUDA_TESTS="$(grep -l 'cuda' tests/test_*.py | tr '\n' ' ')"
# shellcheck disable=SC2086
"$PY" -m pytest -q -k cuda $CUDA_TESTS >"$WORK/tests.out" 2>&1; echo $? >"$WORK/tests.rc"

"$PY" - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

work = Path(sys.argv[1])


def step(name: str, is_json: bool) -> dict:
    rc = int((work / f"{name}.rc").read_text())
    text = (work / f"{name}.out").read_text()
    entry = {"rc": rc}
    if is_json:
        try:
            entry["result"] = json.loads(text)
        except ValueError:
            entry["output_tail"] = text[-2000:]
            entry["stderr_tail"] = (work / f"{name}.err").read_text()[-2000:]
    else:
        entry["summary"] = (text.strip().splitlines() or [""])[-1]
    return entry


out = {"gpu_check": "ran", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "merge_bench": step("merge", True), "align_bench": step("align", True), "cuda_tests": step("tests", False)}
out["ok"] = all(out[k]["rc"] == 0 for k in ("merge_bench", "align_bench")) and out["cuda_tests"]["rc"] in (0, 5)
print(json.dumps(out, indent=2))
sys.exit(0 if out["ok"] else 1)
PYEOF
