"""Speed and memory of `suture run` on two random Llama-style models; prints JSON.

Builds (once, cached in --workdir) two random fp32 models shaped like a small Llama (hidden 1024, 8 layers,
intermediate 2816, vocab 32000: about 170M parameters, 673 MB each), then runs `suture run` in a fresh
subprocess per method and records wall time and the child's peak RSS (getrusage). Floors on a 2-core CPU:
linear <= 10 s and <= 800 MB peak RSS, ties <= 25 s.

    python benchmarks/merge_bench.py [--workdir /tmp/suture-bench] [--methods linear ties] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, HEADS = 1024, 8, 2816, 32000, 16

RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [{"model": "{a}", "parameters": {"weight": 0.5}}, {"model": "{b}", "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "{a}",
        "models": [{"model": "{b}", "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the benchmark model (Hugging Face Llama naming)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def build_model(folder: Path, seed: int) -> Path:
    """Write one random model with the streaming writer (cached: skipped when present)."""
    import torch

    from suture.merge.writer import ShardedWriter, TensorEntry, atomic_output_dir

    if (folder / "model.safetensors").exists():
        return folder
    shapes = llama_shapes()
    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        writer = ShardedWriter(tmp, [TensorEntry(n, s, torch.float32) for n, s in shapes.items()])
        for name, shape in shapes.items():
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            writer.write(name, t)
        writer.finish()
        config = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "torch_dtype": "float32",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def measure(cmd: list[str]) -> dict:
    """Run a command in a child process; wall seconds and the child's peak RSS in MB."""
    probe = (
        "import resource, subprocess, sys, time, json;"
        "t=time.perf_counter(); rc=subprocess.call(sys.argv[1:]);"
        "w=time.perf_counter()-t; r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
        "print(json.dumps({'rc': rc, 'wall_s': w, 'peak_rss_mb': r/1024}))"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark command failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "suture-bench"))
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()

    import yaml

    work = Path(args.workdir)
    a = build_model(work / "model_a", seed=1)
    b = build_model(work / "model_b", seed=2)
    suture = [sys.executable, "-m", "suture.recipes.cli"]
    results = {
        "benchmark": "merge_bench",
        "models": {"hidden": HIDDEN, "layers": LAYERS, "intermediate": INTERMEDIATE, "vocab": VOCAB,
                   "bytes_each": sum(os.path.getsize(p) for p in a.glob("*.safetensors"))},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": args.device},
        "runs": {},
    }
    t0 = time.perf_counter()
    help_run = measure([*suture, "--help"])
    results["help_wall_s"] = round(help_run["wall_s"], 3)
    for method in args.methods:
        recipe = json.loads(json.dumps(RECIPES[method]).replace("{a}", str(a)).replace("{b}", str(b)))
        recipe_path = work / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run = measure([*suture, "run", str(recipe_path), str(work / f"out_{method}"), "--overwrite", "-q", "--device", args.device])
        results["runs"][method] = {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}
    results["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2))
    return 0 if all(r["rc"] == 0 for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
