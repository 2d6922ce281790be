"""Speed of Git Re-Basin weight matching; prints JSON.

Two cases:
- `mlp`: the demo pair (64-512-512-512-10 ReLU MLPs trained on digits, seeds 1 and 2), spec by tracing.
  Floor: under 1 s on a 2-core CPU.
- `gpt2`: two random GPT-2-small-shaped models (12 layers, hidden 768, MLP 3072), spec from tensor names
  and config.json. Floor: under 120 s on a 2-core CPU; with `--device cuda` the cost-matrix products run
  on the GPU (assignment stays on the CPU).

Reports total time, time per group and the share spent in linear assignment.

    python benchmarks/align_bench.py [--cases mlp gpt2] [--device cpu|cuda] [--max-iter 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

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


CASES = {"mlp": bench_mlp, "gpt2": bench_gpt2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args()
    out = {"benchmark": "align_bench", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "torch_threads": torch.get_num_threads(), "device": args.device}}
    for case in args.cases:
        out[case] = CASES[case](args.device, args.max_iter)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
