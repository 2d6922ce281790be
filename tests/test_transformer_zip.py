"""ZipIt for transformers folders (merge.align.transformer_zip): heads zipped whole, one model of A's shape.

Models are tiny random transformers built from configs in the test; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T

from suture.merge.align.transformer_zip import TransformerZipper
from suture.merge.errors import SutureError
from suture.merge.graph.families import spec_from_names
from suture.merge.spec import permute_state
from suture.merge.store import open_store
from suture.recipes.runner import run_recipe
from tests.test_engines_foreign import _save_tokenizer, _texts
from tests.test_transformer_align import _batches, _logits

TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32)
CONFIGS = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**TEXT)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**TEXT, num_key_value_heads=2)),  # RoPE, grouped-query heads
}


def _model(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CONFIGS[family]().eval()


def _spec(model: torch.nn.Module, family: str):
    return spec_from_names({k: tuple(v.shape) for k, v in model.state_dict().items()}, model.config.to_dict(), family)


def _gpt2_folders(root) -> list:
    """Two tiny GPT-2 folders (seeds 1, 2) with tokenizer files."""
    folders = []
    for seed in (1, 2):
        folder = root / f"gpt2-{seed}"
        _model("gpt2", seed).save_pretrained(folder)
        _save_tokenizer(folder)
        folders.append(folder)
    return folders


def _permuted_copy(model: torch.nn.Module, spec, seed: int) -> torch.nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, spec.random_permutations(seed)))
    return other


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_zipping_a_model_with_a_permuted_copy_gives_back_its_function(family, beta):
    """Every feature pairs with its own copy (correlation 1), so the zip is the model itself, whichever comes first."""
    model = _model(family, 1)
    spec = _spec(model, family)
    other = _permuted_copy(model, spec, 7)
    ids = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(other.state_dict()[next(iter(spec.groups["residual"].members)).tensor],
                              model.state_dict()[next(iter(spec.groups["residual"].members)).tensor])
    for first, second in ((model, other), (other, model)):
        result = TransformerZipper(spec, [first, second], _batches()).zip(beta=beta)
        assert all(g["within_merges"] == [0, 0] for g in result.stats["groups"].values())
        torch.testing.assert_close(_logits(result.module, ids), _logits(first, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_identity_matcher_is_plain_weight_averaging(family):
    a, b = _model(family, 1), _model(family, 2)
    spec = _spec(a, family)
    result = TransformerZipper(spec, [a, b], _batches()).zip("identity")
    state_b = b.state_dict()
    for name, tensor in a.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(result.state[name], (tensor + state_b[name]) / 2, rtol=1e-6, atol=1e-6)


def _duplicate_head(model: torch.nn.Module, layer: int, src: int, dst: int) -> None:
    """GPT-2: head `dst` of block `layer` becomes a copy of head `src` (Q, K, V columns of c_attn; c_proj rows)."""
    attn = model.transformer.h[layer].attn
    d, n = attn.head_dim, attn.embed_dim
    with torch.no_grad():
        for block in range(3):
            s, t = block * n + src * d, block * n + dst * d
            attn.c_attn.weight[:, t:t + d] = attn.c_attn.weight[:, s:s + d]
            attn.c_attn.bias[t:t + d] = attn.c_attn.bias[s:s + d]
        attn.c_proj.weight[dst * d:(dst + 1) * d] = attn.c_proj.weight[src * d:(src + 1) * d]


def _clusters(result, group) -> list[list[tuple[int, int]]]:
    """Per output head, the (source head, dims mapped) of every stacked head feeding it; asserts whole heads."""
    d, n = group.head_dim, group.size
    u = result.matches[group.name].unmerge  # (k*n, n), 0/1
    out = []
    for c in range(n // d):
        block = u[:, c * d:(c + 1) * d]
        sources = sorted({int(r) // d for r in block.nonzero()[:, 0]})
        for h in sources:
            rows = block[h * d:(h + 1) * d]
            # the whole head joins this output head, each of its dims to a different dim: a head is never split
            assert torch.equal(rows.sum(0), torch.ones(d)) and torch.equal(rows.sum(1), torch.ones(d))
            assert float(u[h * d:(h + 1) * d].sum()) == d  # and it feeds no other output head
        out.append(sources)
    return out


def test_heads_are_zipped_whole_and_redundant_heads_merge_within_a_model():
    """A's head 1 duplicates its head 0: with a within-model budget ZipIt merges them; with beta=0 it cannot."""
    a, b = _model("gpt2", 1), _model("gpt2", 2)
    _duplicate_head(a, 0, 0, 1)
    spec = _spec(a, "gpt2")
    zipper = TransformerZipper(spec, [a, b], _batches(4))
    group = spec.groups["layer0.attn"]
    heads = group.size // group.head_dim
    with_budget = zipper.zip(beta=1.0)
    clusters = _clusters(with_budget, group)
    assert [0, 1] in clusters  # A's two copies of one head make one output head
    assert with_budget.stats["groups"]["layer0.attn"]["within_merges"][0] >= 1
    for g in spec.active_groups():
        if g.kind != "free":
            assert sorted(h for c in _clusters(with_budget, g) for h in c) == list(range(2 * heads))
    # GPT-2's lm_head is wte itself: the zip keeps them one tensor (wte's merge), though they sit on both sides
    # (some residual cluster holds more than two features, where the merge and the unmerge / 2 differ)
    assert int(with_budget.matches["residual"].unmerge.sum(0).max()) > 2
    assert torch.equal(with_budget.state["lm_head.weight"], with_budget.state["transformer.wte.weight"])
    across = _clusters(zipper.zip(beta=0.0), group)
    assert all(len(c) == 2 and c[0] < heads <= c[1] for c in across)  # one head of A with one head of B


def test_recipe_zips_two_gpt2_folders_into_a_loadable_folder_with_lm_loss(tmp_path):
    """`alignment: {engine: zipit, data: <.txt>}` + `evaluate:` on two GPT-2 folders: an HF folder and LM figures."""
    folders = _gpt2_folders(tmp_path)
    data = _texts(tmp_path / "lines.txt", n=12)
    recipe = {"models": [{"model": str(f)} for f in folders],
              "alignment": {"engine": "zipit", "data": str(data), "batch_size": 4},
              "evaluate": {"data": str(data), "plot": False}}
    result = run_recipe(recipe, tmp_path / "out")
    report = result.report
    assert report["alignment"]["engine"] == "zipit" and report["alignment"]["heads"] == "average"
    ev = report["evaluation"]
    assert ev["language_model"]["kind"] == "causal"
    assert set(ev["models"]) == {str(f) for f in folders} and set(ev["baselines"]) == {"naive averaging", "permutation"}
    mean_end = sum(m["loss"] for m in ev["models"].values()) / 2
    assert ev["barriers"]["zipit"]["loss_midpoint"] == pytest.approx(ev["merged"]["loss"] - mean_end, abs=1e-5)
    assert "zipit                        loss barrier" in result.summary()  # the CLI's summary lists it
    assert ev["merged"]["perplexity"] == pytest.approx(torch.tensor(ev["merged"]["loss"]).exp().item(), rel=1e-5)
    # a plain transformers folder: config, weights with A's tensor names, tokenizer
    out = result.out_dir
    assert set(open_store(out).names()) == set(open_store(folders[0]).names())
    assert json.loads((out / "config.json").read_text())["n_head"] == 4
    loaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = T.AutoTokenizer.from_pretrained(out)
    ids = tok(data.read_text().splitlines()[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = loaded(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    # transformers' own loader ties lm_head to the zipped wte, as Suture's module does
    from suture.merge.derive import derive_spec, load_module

    store = open_store(out)
    torch.testing.assert_close(_logits(loaded, ids), _logits(load_module(store, derive_spec(store)[1]), ids))
    assert (out / "README.md").is_file()


def test_partial_zipping_of_transformers_is_refused_in_one_line(tmp_path):
    folders = _gpt2_folders(tmp_path)
    data = _texts(tmp_path / "lines.txt")
    recipe = {"models": [{"model": str(f)} for f in folders],
              "alignment": {"engine": "zipit", "data": str(data), "stop_at": "layer0.mlp"}}
    with pytest.raises(SutureError, match="stop_at.*partial zipping of transformers") as err:
        run_recipe(recipe, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
