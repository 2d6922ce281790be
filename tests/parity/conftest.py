"""Fixtures for the mergekit parity suite: tiny checkpoints in mergekit-readable form and two runners.

Each family (Llama, Mistral, Qwen2, GPT-2) gets a base model and three fine-tunes written as
``config.json`` + ``model.safetensors`` (configs from transformers' own config classes), and, where a test
asks for it, a tiny word-level tokenizer built with the ``tokenizers`` library; fine-tunes' tokenizers add
their own words so a ``union`` vocabulary differs from every input's. The same recipe then runs through
mergekit's Python API (``run_merge``, the code behind ``mergekit-yaml``) and through ``suture run``.
Each module skips itself when mergekit is not installed (``pip install -e '.[parity]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
#: each test module skips itself (with this reason) when mergekit is not installed
NEEDS_MERGEKIT = "the parity suite compares against mergekit: pip install -e '.[parity]' (make test does)"

HIDDEN = 32
VOCAB = 48


def _family_config(family: str, vocab: int) -> Any:
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=4, n_head=4, n_positions=32, vocab_size=vocab,
                             architectures=["GPT2LMHeadModel"])
    common = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    if family == "mistral":
        return tf.MistralConfig(architectures=["MistralForCausalLM"], **common)
    if family == "qwen2":
        return tf.Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    raise ValueError(family)


def _shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the architecture, from a model built on the meta device."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        names.pop("lm_head.weight", None)  # tied heads are not stored, as save_pretrained does
    return names


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def write_tokenizer(folder: Path, extra: list[str]) -> int:
    """A word-level tokenizer (4 specials + shared words + ``extra``) saved as transformers files; its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return len(vocab)


def write_model(folder: Path, family: str, seed: int, *, base: dict[str, torch.Tensor] | None = None,
                scale: float = 0.05, extra_words: list[str] | None = None, tokenizer: bool = False,
                vocab: int | None = None) -> dict[str, torch.Tensor]:
    """A random checkpoint (or ``base`` plus seeded noise of ``scale``) written as config + safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = extra_words or []
    n_vocab = vocab if vocab is not None else VOCAB + len(extra)
    if tokenizer:
        n_vocab = write_tokenizer(folder, extra)
    config = _family_config(family, n_vocab)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _shapes(config).items():
        if base is not None and name in base and base[name].shape[1:] == shape[1:]:
            ref = base[name]
            rows = min(ref.shape[0], shape[0]) if ref.dim() else 0
            t = torch.randn(shape, generator=g) * 0.02
            if ref.dim():
                t[:rows] = ref[:rows] + scale * torch.randn(ref[:rows].shape, generator=g)
            # a few exactly shared entries so sign/agreement/nearswap edge cases occur
            t.view(-1)[::7] = torch.cat([ref.reshape(-1), t.reshape(-1)])[: t.numel()][::7]
        elif name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        tensors[name] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return tensors


class Zoo:
    """Lazily written tiny models per family: ``zoo.path(family, 'base' | 'ft1' | 'ft2' | 'ft3')``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bases: dict[str, dict[str, torch.Tensor]] = {}

    def path(self, family: str, name: str, *, tokenizer: bool = False) -> str:
        key = f"{family}-{name}" + ("-tok" if tokenizer else "")
        folder = self.root / key
        if not (folder / "model.safetensors").exists():
            seed = sum(map(ord, key))
            if name == "base":
                self._bases[key] = write_model(folder, family, seed, tokenizer=tokenizer)
            else:
                base_key = f"{family}-base" + ("-tok" if tokenizer else "")
                if base_key not in self._bases:
                    self.path(family, "base", tokenizer=tokenizer)
                i = int(name[-1])
                words = [f"{name}_x{j}" for j in range(i)] + ([f"shared_{i % 2}"] if tokenizer else [])
                write_model(folder, family, seed, base=self._bases[base_key], scale=0.02 * i,
                            extra_words=words if tokenizer else None, tokenizer=tokenizer)
        if name == "base" and key not in self._bases:
            self._bases[key] = load_file(str(folder / "model.safetensors"))
        return str(folder)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("parity-models"))


def run_mergekit(recipe: dict, out: Path, seed: int | None = None) -> Path:
    """Run a recipe through mergekit's own code path (what ``mergekit-yaml`` calls) in this process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False,
                           random_seed=seed)
    run_merge(config, str(out), options=options)
    return out


def run_suture(recipe: dict, out: Path, *extra: str) -> Path:
    """Run the same recipe through ``suture run`` (its CLI entry point, in this process)."""
    from suture.recipes.cli import main

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc = main(["run", str(path), str(out), "--overwrite", "--device", "cpu", "-q", *extra])
    assert rc == 0, f"suture run failed on {path}"
    return out


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder (all shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny), in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-12)) if a.numel() else 0.0


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    """Assert identical names, shapes, dtypes, and every tensor within ``tol`` relative error."""
    assert sorted(ours) == sorted(theirs), f"names differ: only suture {sorted(set(ours) - set(theirs))}, " \
                                           f"only mergekit {sorted(set(theirs) - set(ours))}"
    bad = []
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs mergekit {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs mergekit {b.dtype}"
        err = rel_err(a, b)
        if not err <= tol:
            bad.append(f"{name}: {err:.3g}")
    assert not bad, f"{len(bad)} tensors above {tol}: " + "; ".join(bad[:8])


def config_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
