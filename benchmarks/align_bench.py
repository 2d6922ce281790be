"""Speed and memory of Git Re-Basin weight matching; prints JSON.

Cases (each runs in a child process, so its peak RSS counts only its own allocations):
- `mlp`: the demo pair (64-512-512-512-10 ReLU MLPs trained on digits, seeds 1 and 2), spec by tracing.
  Floor: under 1 s on a 2-core CPU.
- `gpt2`: two random GPT-2-small-shaped models (12 layers, hidden 768, MLP 3072), spec from tensor names
  and config.json. Floor: under 120 s on a 2-core CPU; with `--device cuda` the cost-matrix products run
  on the GPU (assignment stays on the CPU).

- `qwen2-0.5b` (and `qwen2-1.5b`, only with `--qwen-1.5b`): two Qwen2-shaped causal LMs written as bf16
  safetensors folders with config.json (as the real checkpoints; cached under `--cache`): A random, B a
  planted permutation of A (spec from the qwen2 family, `spec.random_permutations`). Matching reads the
  two folders through lazy stores, exactly as `suture run` does, and must recover the inverse of the plant
  in every group. Floors (2-core CPU): 0.5B-shaped ≤ 600 s and peak RSS ≤ 1.5 × one model's fp32 size
  + 1 GB. Also reports the cost-product FLOPs per pass, so a 7B pair can be estimated (see `estimate_7b`).

Reports wall time, peak RSS, the time in cost products (`cost_s`, streamed reads included), in linear
assignment (`lap_s`) and in the objective, time per group, and the load average (the machine may be shared).

    python benchmarks/align_bench.py [--cases mlp gpt2 qwen2-0.5b] [--qwen-1.5b] [--device cpu|cuda]
                                     [--max-iter 100] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, not an installed copy

LAYERS, HIDDEN, MLP, VOCAB, POSITIONS = 12, 768, 3072, 50257, 1024


def gpt2_state(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with GPT-2's names and shapes (Conv1D weights stored (in, out))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    state = {"wte.weight": rnd(VOCAB, HIDDEN), "wpe.weight": rnd(POSITIONS, HIDDEN)}
    for i in range(LAYERS):
        p = f"h.{i}."
        state.update({
            p + "ln_1.weight": torch.ones(HIDDEN), p + "ln_1.bias": torch.zeros(HIDDEN),
            p + "attn.c_attn.weight": rnd(HIDDEN, 3 * HIDDEN), p + "attn.c_attn.bias": rnd(3 * HIDDEN),
            p + "attn.c_proj.weight": rnd(HIDDEN, HIDDEN), p + "attn.c_proj.bias": rnd(HIDDEN),
            p + "ln_2.weight": torch.ones(HIDDEN), p + "ln_2.bias": torch.zeros(HIDDEN),
            p + "mlp.c_fc.weight": rnd(HIDDEN, MLP), p + "mlp.c_fc.bias": rnd(MLP),
            p + "mlp.c_proj.weight": rnd(MLP, HIDDEN), p + "mlp.c_proj.bias": rnd(HIDDEN),
        })
    state["ln_f.weight"], state["ln_f.bias"] = torch.ones(HIDDEN), torch.zeros(HIDDEN)
    return state


GPT2_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2Model"], "n_embd": HIDDEN, "n_head": 12, "n_layer": LAYERS,
               "n_inner": MLP, "n_positions": POSITIONS, "vocab_size": VOCAB}


def summarize(result, seconds: float) -> dict:
    """Timing figures of a MatchResult."""
    total = result.total_time or seconds
    return {
        "wall_s": round(seconds, 3),
        "iterations": result.iterations,
        "converged": result.converged,
        "lap_s": round(result.lap_time, 3),
        "lap_share": round(result.lap_time / total, 3) if total else None,
        "cost_s": result.stats.get("cost_s"),
        "cost_share": round(result.stats.get("cost_s", 0.0) / total, 3) if total else None,
        "objective_s": result.stats.get("objective_s"),
        "time_per_group_s": {k: round(v, 3) for k, v in sorted(result.group_time.items(), key=lambda kv: -kv[1])[:12]},
    }


def bench_mlp(device: str, max_iter: int) -> dict:
    from suture.merge.align.weight_matching import weight_matching
    from suture.merge.derive import derive_spec
    from suture.merge.refs import demo_path
    from suture.merge.store import open_store

    a, b = open_store(demo_path("mlp-seed1")), open_store(demo_path("mlp-seed2"))
    spec, _ = derive_spec(a, input_shape=(2, 64))
    sa, sb = a.state_dict(), b.state_dict()
    t0 = time.perf_counter()
    result = weight_matching(spec, sa, sb, max_iter=max_iter, device=device)
    return {"groups": len(spec.active_groups()), **summarize(result, time.perf_counter() - t0)}


def bench_gpt2(device: str, max_iter: int) -> dict:
    from suture.merge.align.weight_matching import weight_matching
    from suture.merge.graph.families import spec_from_names

    sa, sb = gpt2_state(1), gpt2_state(2)
    spec = spec_from_names({k: tuple(v.shape) for k, v in sa.items()}, GPT2_CONFIG, "gpt2", permute_outputs=True)
    t0 = time.perf_counter()
    result = weight_matching(spec, sa, sb, max_iter=max_iter, device=device)
    frozen = {g.name: g.frozen_reason for g in spec if g.frozen}
    return {"groups": len(spec.active_groups()), "frozen_groups": len(frozen), **summarize(result, time.perf_counter() - t0)}


# Qwen2 shapes from the published config.json files (Qwen/Qwen2-0.5B, Qwen2-1.5B, Qwen2-7B); the small
# ones tie the LM head to the embeddings, so it is not stored
QWEN2 = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
PLANT_SEED = 7


def qwen2_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen2ForCausalLM checkpoint with config `cfg`."""
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def qwen2_config(case: str) -> dict:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "torch_dtype": "bfloat16",
            "head_dim": None, **QWEN2[case]}


def qwen2_spec(case: str):
    from suture.merge.graph.families import spec_from_names

    cfg = qwen2_config(case)
    return spec_from_names(qwen2_shapes(cfg), cfg, "qwen2")


def cost_flops(case: str) -> float:
    """Multiply-adds x 2 of one pass of cost products: every group of size n costs 2 n x (its members' elements)."""
    cfg = qwen2_config(case)
    spec, shapes = qwen2_spec(case), qwen2_shapes(cfg)
    return float(sum(2 * g.size * math.prod(shapes[m.tensor]) for g in spec.active_groups() for m in g.members
                     if m.tensor in shapes))


def write_qwen2_pair(case: str, cache: Path) -> tuple[Path, Path]:
    """A random bf16 Qwen2-shaped model and a planted permutation of it, as safetensors folders (cached)."""
    from safetensors.torch import save_file

    from suture.merge.spec import permute_state

    a_dir, b_dir = cache / f"{case}-a", cache / f"{case}-b"
    if (a_dir / "model.safetensors").exists() and (b_dir / "model.safetensors").exists():
        return a_dir, b_dir
    cfg = qwen2_config(case)
    g = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in qwen2_shapes(cfg).items()}
    spec = qwen2_spec(case)
    planted = permute_state(state, spec, spec.random_permutations(PLANT_SEED))
    for folder, tensors in ((a_dir, state), (b_dir, planted)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors.tmp"))
        os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    return a_dir, b_dir


def bench_qwen2(case: str, device: str, max_iter: int, cache: Path) -> dict:
    """Match B's folder to A's through lazy stores; check the planted permutation is undone in every group."""
    from suture.merge.align.weight_matching import weight_matching
    from suture.merge.graph.families import spec_from_store
    from suture.merge.spec import invert_permutation
    from suture.merge.store import open_store

    a_dir, b_dir = cache / f"{case}-a", cache / f"{case}-b"
    a, b = open_store(a_dir), open_store(b_dir)
    spec = spec_from_store(a)
    planted = spec.random_permutations(PLANT_SEED)
    t0 = time.perf_counter()
    result = weight_matching(spec, a, b, max_iter=max_iter, device=device)
    seconds = time.perf_counter() - t0
    wrong = [g.name for g in spec.active_groups() if not torch.equal(result.perms[g.name], invert_permutation(planted[g.name]))]
    params = sum(math.prod(s) for s in a.shapes().values())
    fp32_gb = params * 4 / 1e9
    out = {"parameters": params, "stored_dtype": "bfloat16", "groups": len(spec.active_groups()),
           "recovered_planted_permutation": not wrong, "groups_not_recovered": wrong[:10],
           "cost_gflop_per_pass": round(cost_flops(case) / 1e9, 1),
           "rss_floor_gb": round(1.5 * fp32_gb + 1, 3), **summarize(result, seconds)}
    return out


CASES = {"mlp": bench_mlp, "gpt2": bench_gpt2}
QWEN_CASES = ("qwen2-0.5b", "qwen2-1.5b")


def peak_rss_gb() -> float:
    """This process's peak resident set (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_child(case: str, args: argparse.Namespace) -> dict:
    """Run one case in a fresh interpreter and return its JSON (with its own peak RSS)."""
    cmd = [sys.executable, __file__, "--child", case, "--device", args.device, "--max-iter", str(args.max_iter),
           "--cache", str(args.cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(case: str, args: argparse.Namespace) -> None:
    if case.startswith("prepare:"):
        write_qwen2_pair(case.split(":", 1)[1], args.cache)
        print(json.dumps({}))
        return
    load_before = os.getloadavg()
    if case in QWEN_CASES:
        out = bench_qwen2(case, args.device, args.max_iter, args.cache)
    else:
        out = CASES[case](args.device, args.max_iter)
    out["peak_rss_gb"] = round(peak_rss_gb(), 3)
    if "rss_floor_gb" in out:
        out["meets_floors"] = out["peak_rss_gb"] <= out["rss_floor_gb"] and out["wall_s"] <= 600 and out["recovered_planted_permutation"]
    out["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(out))


def estimate_7b(measured: dict, case: str) -> dict:
    """7B pair on one GPU, extrapolated from the measured case (assumptions spelled out in the output)."""
    gflop_7b = cost_flops("qwen2-7b") / 1e9
    iterations = max(measured.get("iterations", 2), 1)
    mlp_n, mlp_7b = QWEN2[case]["intermediate_size"], QWEN2["qwen2-7b"]["intermediate_size"]
    layers, layers_7b = QWEN2[case]["num_hidden_layers"], QWEN2["qwen2-7b"]["num_hidden_layers"]
    lap_7b = measured["lap_s"] * (mlp_7b / mlp_n) ** 2.8 * layers_7b / layers
    tflops = 25.0  # sustained fp32 (TF32 off) GEMM on an H100, assumed: no GPU was measured here
    cost_7b = gflop_7b * iterations / (tflops * 1e3)
    return {
        "from_case": case, "cost_gflop_per_pass": round(gflop_7b), "passes_assumed": iterations,
        "cost_products_s": round(cost_7b, 1), "lap_s_cpu": round(lap_7b, 1), "total_s": round(cost_7b + lap_7b, 1),
        "gpu_memory_gb_bf16_resident": round(2 * 2 * sum(math.prod(s) for s in qwen2_shapes(qwen2_config("qwen2-7b")).values()) / 1e9, 1),
        "method": (f"cost products: the 7B pair's FLOPs per pass (counted from the qwen2 spec) x the measured number of "
                   f"passes / an assumed {tflops:.0f} TFLOP/s fp32 GEMM rate; linear assignment stays on the CPU: the "
                   f"measured lap_s scaled by (MLP width ratio)^2.8 (scipy's measured growth) and the layer ratio. "
                   "Both tensors of the pair stay resident on the GPU in bf16."),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mlp", "gpt2", "qwen2-0.5b"], choices=[*CASES, *QWEN_CASES])
    parser.add_argument("--qwen-1.5b", dest="qwen15", action="store_true", help="also run the Qwen2-1.5B-shaped pair")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("SUTURE_BENCH_CACHE", Path(tempfile.gettempdir()) / "suture-align-bench")))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return 0
    cases = list(args.cases) + (["qwen2-1.5b"] if args.qwen15 and "qwen2-1.5b" not in args.cases else [])
    out = {"benchmark": "align_bench", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "torch_threads": torch.get_num_threads(), "device": args.device,
                                                   "load_average": [round(x, 2) for x in os.getloadavg()]}}
    for case in cases:
        if case in QWEN_CASES:
            t0 = time.perf_counter()
            prep = run_child(f"prepare:{case}", args)
            if "error" in prep:
                out[case] = prep
                continue
            out[case] = {"prepare_s": round(time.perf_counter() - t0, 1), **run_child(case, args)}
        else:
            out[case] = run_child(case, args)
    measured = next((c for c in ("qwen2-1.5b", "qwen2-0.5b") if c in out and "lap_s" in out[c]), None)
    if measured:
        out["estimate_7b_one_gpu"] = estimate_7b(out[measured], measured)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
