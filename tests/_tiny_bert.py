"""Two tiny BERT classifiers fine-tuned from one random base on two keyword tasks, saved as Hugging Face folders.

Built from a ``BertConfig`` (width 32, 2 blocks) with a WordPiece vocabulary written here, so nothing is
downloaded. Task A reads sentences over words ``a0..a19`` and labels 1 when one of ``a0..a4`` occurs; task B
the same over ``b0..b19`` and ``b0..b4``. Both fine-tunes start from the same base and keep one 2-way head,
so the merged model must serve both tasks: their inputs differ, which is what RegMean uses.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = {"a": [f"a{i}" for i in range(20)], "b": [f"b{i}" for i in range(20)]}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentences(task: str, n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = [rng.choice(WORDS[task][5:]) for _ in range(6)]
        if label:
            words[rng.randrange(6)] = rng.choice(WORDS[task][:5])
        out.append((" ".join(words), int(label)))
    return out


def write_text(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def build(root: Path, steps: int = 60, seed: int = 0) -> dict[str, Path]:
    """Folders ``base``, ``a``, ``b`` (models) and data files ``a_train.txt``, ``a_test.txt``, ``b_train.txt``, ``b_test.txt``.

    Trained on one thread: the products are tiny, and one thread is several times faster on a busy machine."""
    from suture.merge.threads import single_threaded

    with single_threaded():
        return _build(root, steps, seed)


def _build(root: Path, steps: int, seed: int) -> dict[str, Path]:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS["a"] + WORDS["b"])})
    config = BertConfig(vocab_size=len(SPECIAL) + 40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    base = BertForSequenceClassification(config).eval()
    out = {"base": root / "base"}
    base.save_pretrained(out["base"], safe_serialization=True)
    tok.save_pretrained(out["base"])
    for k, task in enumerate("ab"):
        out[f"{task}_train"] = write_text(root / f"{task}_train.txt", _sentences(task, 400, seed + 10 + k))
        out[f"{task}_test"] = write_text(root / f"{task}_test.txt", _sentences(task, 200, seed + 20 + k))
        model = BertForSequenceClassification(config)
        model.load_state_dict(base.state_dict())
        rows = _sentences(task, 400, seed + 10 + k)
        enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        labels = torch.tensor([y for _, y in rows])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed + k)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(rows), (16,), generator=gen)
            loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        out[task] = root / task
        model.save_pretrained(out[task], safe_serialization=True)
        tok.save_pretrained(out[task])
    return out
