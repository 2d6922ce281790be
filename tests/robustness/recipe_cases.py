"""Hostile and careless recipes for `suture run`: each must be refused with one clear line.

:func:`recipe_cases` writes tiny models and well over 100 mutated recipes into a folder and returns them as
:class:`~tests.robustness.harness.Case` objects (``suture run RECIPE OUT``). The mutations cover wrong types
at every top-level key, unknown keys, parameter values of the wrong kind, YAML attacks (alias bombs, deep
nesting, huge documents, control characters, Python tags), non-UTF-8 files, shard sizes, missing or
offline models, impossible combinations, and architectures that a model's config.json names outside the zoo.

The malicious factories live in ``evil_recipe_module.py`` inside the folder, which writes
``<folder>/MARKER`` when imported: put the folder on ``sys.path`` so that a missing trust check would import it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.robustness.harness import Case

WIDTHS = [64, 8, 10]
EVIL_MODULE = "evil_recipe_module"
MARKER = "MARKER"

# (top-level key, a value of the wrong type) for every key of the recipe schema
WRONG_TYPES: list[tuple[str, str]] = [
    ("name", "[1, 2]"), ("merge_method", "5"), ("merge_method", "[linear]"), ("base_model", "5"), ("base_model", "[a, b]"),
    ("models", "just-a-string"), ("models", "{a: 1}"), ("slices", "3"), ("slices", "[5]"), ("parameters", "[1, 2]"),
    ("parameters", "7"), ("dtype", "3"), ("dtype", "fp17"), ("out_dtype", "true"), ("out_dtype", "half_float"),
    ("tokenizer_source", "5"), ("tokenizer_source", "[x]"), ("tokenizer", "text"), ("chat_template", "5"),
    ("architecture", "5"), ("architecture", "{kwargs: {}}"), ("allow_pickle", "'yes'"), ("trust_remote_code", "'yes'"),
    ("trust_remote_code", "1"), ("strict", "2"), ("out_shard_size", "[1]"), ("out_shard_size", "1.5"),
    ("out_shard_size", "true"), ("seed", "'x'"), ("seed", "1.5"), ("alignment", "align-please"), ("stitch", "7"),
    ("evaluate", "5"), ("publish", "[x]"),
]

# (id, parameter block, a merge method) whose values do not fit the method's parameters
BAD_PARAMETERS: list[tuple[str, str, str]] = [
    ("weight-text", "weight: half", "linear"), ("weight-nan", "weight: .nan", "linear"), ("weight-inf", "weight: .inf", "linear"),
    ("weight-neg-inf", "weight: -.inf", "linear"), ("weight-1e400", "weight: 1e400", "linear"),
    ("weight-1.0e+400", "weight: 1.0e+400", "linear"), ("weight-huge-int", "weight: " + "9" * 400, "linear"),
    ("weight-bool", "weight: true", "linear"), ("weight-null-list", "weight: []", "linear"),
    ("weight-mixed-gradient", "weight: [1, a]", "linear"), ("weight-gradient-nan", "weight: [0.1, .nan]", "linear"),
    ("weight-condition-bad-filter", "weight: [{filter: 5, value: 1}]", "linear"),
    ("weight-condition-no-value", "weight: [{filter: mlp}]", "linear"),
    ("weight-condition-text", "weight: [{filter: layers, value: lots}]", "linear"),
    ("weight-condition-pattern", "weight: [{pattern: layers, value: 1}]", "linear"),
    ("weight-nested-conditions", "weight: [{filter: a, value: [{filter: b, value: 1}]}]", "linear"),
    ("weight-mapping-list", "weight: [{filter: a, value: 1}, 3]", "linear"),
    ("weight-mapping-empty", "weight: {}", "linear"),
]
BAD_GLOBALS: list[tuple[str, str, str]] = [
    ("normalize-yes", "normalize: 'yes'", "linear"), ("normalize-number", "normalize: 1", "linear"),
    ("t-text", "t: middle", "slerp"), ("t-nan", "t: .nan", "slerp"), ("t-bool", "t: false", "slerp"),
    ("lambda-inf", "lambda: .inf", "task_arithmetic"), ("int8-mask-text", "int8_mask: sure", "task_arithmetic"),
]

YAML_ATTACKS: dict[str, str] = {
    "alias-bomb": "\n".join(
        [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" if i else "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
         for i in range(10)]) + "\n",
    "alias-bomb-mapping": "a: &a {x: 1, y: 2, z: 3, w: 4}\n" + "".join(
        f"b{i}: &b{i} {{p: *{'a' if i == 0 else f'b{i - 1}'}, q: *{'a' if i == 0 else f'b{i - 1}'}, r: *{'a' if i == 0 else f'b{i - 1}'}}}\n"
        for i in range(14)),
    "alias-bomb-in-parameters": "merge_method: linear\nmodels: []\nparameters:\n  weight: &w [" + ", ".join(["1"] * 10) + "]\n" + "".join(
        f"  w{i}: &w{i} [{', '.join([f'*w{i - 1}' if i else '*w'] * 10)}]\n" for i in range(7)),
    "deep-lists": "merge_method: " + "[" * 3000 + "]" * 3000 + "\n",
    "deep-mappings": "merge_method: linear\nalignment: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
    "deep-block": "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n",
    "huge-document": "merge_method: linear\nname: '" + "x" * (1024 * 1024 + 10) + "'\n",
    "huge-comment": "# " + "y" * (1024 * 1024 + 10) + "\nmerge_method: linear\n",
    "control-character": "merge_method: lin\x00ear\n",
    "escape-character": "merge_method: \x1b[31mlinear\n",
    "python-tag": "merge_method: !!python/object/apply:os.system ['touch MARKER']\n",
    "python-name-tag": "merge_method: !!python/name:os.system\n",
    "binary-tag": "merge_method: !!binary aGVsbG8=\n",
    "set-tag": "models: !!set {a, b}\nmerge_method: linear\n",
    "recursive-alias": "a: &a [1, *a]\n",
    "recursive-mapping": "a: &a {b: *a}\n",
    "merge-key-bad": "a: {<<: 5}\n",
    "two-documents": "merge_method: linear\n---\nmerge_method: ties\n",
    "duplicate-key": "merge_method: linear\nmerge_method: ties\n",
    "tab-indent": "merge_method: linear\nmodels:\n\t- model: a\n",
    "unclosed-bracket": "merge_method: [linear\n",
    "unclosed-quote": "merge_method: 'linear\n",
    "list-key": "? [a, b]\n: 1\n",
    "bool-key": "yes: 1\nmerge_method: linear\n",
    "top-level-list": "- merge_method: linear\n",
    "top-level-scalar": "linear\n",
    "top-level-number": "42\n",
    "empty": "",
    "only-comments": "# nothing here\n# at all\n",
    "only-null": "~\n",
}

NON_UTF8: dict[str, bytes] = {
    "latin-1": "merge_method: linéaire\n".encode("latin-1"),
    "utf-16": "merge_method: linear\n".encode("utf-16"),
    "binary-junk": bytes(range(256)) * 4,
    "safetensors-as-recipe": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
}

SHARD_SIZES = ["0", "-1", "-5GB", "'0MB'", "abc", "'5 parsecs'", "'1e3XB'", "0.0001"]
CLI_SHARD_SIZES = ["0", "-1", "0B", "-2GB", "lots", "1.5.5MB", "0.1"]


def _models_block(models: list[str], weights: list[str] | None = None) -> str:
    weights = weights or ["0.5"] * len(models)
    return "models:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in zip(models, weights))


def _write_models(root: Path) -> dict[str, Path]:
    """Two tiny zoo MLPs, a narrower one, weights without config, a non-safetensors file and three malicious configs."""
    from safetensors.torch import save_file

    from suture.merge import zoo

    root.mkdir(parents=True, exist_ok=True)
    marker = root.parent / MARKER
    (root.parent / f"{EVIL_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def make(widths):\n    from merge.zoo import mlp\n    return mlp(widths)\n"
    )
    out: dict[str, Path] = {}
    for name, seed, widths, factory, kwargs in (
        ("a", 1, WIDTHS, "suture.merge.zoo:mlp", {"widths": WIDTHS}),
        ("b", 2, WIDTHS, "suture.merge.zoo:mlp", {"widths": WIDTHS}),
        ("narrow", 3, [64, 4, 10], "suture.merge.zoo:mlp", {"widths": [64, 4, 10]}),
        ("evil", 4, WIDTHS, f"{EVIL_MODULE}:make", {"widths": WIDTHS}),
        ("shell", 5, WIDTHS, "os:system", {"command": f"touch {marker}"}),
        ("subprocess", 6, WIDTHS, "subprocess:run", {"args": ["touch", str(marker)]}),
    ):
        out[name] = zoo.save_module(zoo.build_seeded("suture.merge.zoo:mlp", seed, widths=widths), root / name, factory, kwargs)
    bare = root / "bare"
    bare.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in zoo.mlp(WIDTHS).state_dict().items()}, str(bare / "model.safetensors"))
    out["bare"] = bare
    (root / "notes.safetensors").write_text("these are not tensors\n")
    out["text"] = root / "notes.safetensors"
    (root / "empty.safetensors").write_bytes(b"")
    out["empty"] = root / "empty.safetensors"
    (root / "model.bin").write_bytes(b"\x80\x04not really a pickle")
    out["pickle"] = root / "model.bin"
    (root / "bad-config").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in zoo.mlp(WIDTHS).state_dict().items()}, str(root / "bad-config" / "model.safetensors"))
    (root / "bad-config" / "config.json").write_text(json.dumps({"suture_architecture": {"factory": "suture.merge.zoo:mlp", "kwargs": [1, 2]}}))
    out["bad-config"] = root / "bad-config"
    return out


def recipe_cases(workdir: Path) -> list[Case]:
    """Write the models and every mutated recipe under `workdir`; one Case per `suture run RECIPE OUT`."""
    workdir = Path(workdir)
    recipes = workdir / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    m = _write_models(workdir / "models")
    a, b = str(m["a"]), str(m["b"])
    good = "merge_method: linear\n" + _models_block([a, b])
    cases: list[Case] = []

    def add(case_id: str, text: str | bytes | None = None, *, path: Path | None = None, extra_args: list[str] | None = None) -> None:
        taken = {c.case_id for c in cases}
        if case_id in taken:  # a second wrong value for the same key
            case_id = next(f"{case_id}-{n}" for n in range(2, 100) if f"{case_id}-{n}" not in taken)
        if path is None:
            path = recipes / f"{len(cases):03d}-{case_id}.yml"
            if isinstance(text, bytes):
                path.write_bytes(text)
            else:
                path.write_text(text or "", encoding="utf-8")
        out = workdir / "out" / f"{len(cases):03d}-{case_id}"
        cases.append(Case(case_id, ["run", str(path), str(out), *(extra_args or [])], out))

    # wrong types at every top-level key
    for key, value in WRONG_TYPES:
        base = good if key not in ("models", "merge_method") else (
            "merge_method: linear\n" if key == "models" else _models_block([a, b]))
        add(f"type-{key}", base + f"{key}: {value}\n")
    # wrong types inside model entries and sections
    nested = {
        "entry-model-number": "merge_method: linear\nmodels:\n  - model: 5\n  - model: " + b + "\n",
        "entry-not-mapping": "merge_method: linear\nmodels:\n  - [" + a + "]\n  - model: " + b + "\n",
        "entry-parameters-list": "merge_method: linear\nmodels:\n  - model: " + a + "\n    parameters: [1]\n  - model: " + b + "\n",
        "entry-missing-model": "merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n  - model: " + b + "\n",
        "slice-range-text": "merge_method: passthrough\nslices:\n  - sources:\n      - model: " + a + "\n        layer_range: [a, b]\n",
        "slice-range-reversed": "merge_method: passthrough\nslices:\n  - sources:\n      - model: " + a + "\n        layer_range: [2, 0]\n",
        "slice-range-negative": "merge_method: passthrough\nslices:\n  - sources:\n      - model: " + a + "\n        layer_range: [-1, 1]\n",
        "slice-no-sources": "merge_method: passthrough\nslices:\n  - sources: []\n",
        "alignment-engine-number": good + "alignment: {engine: 5}\n",
        "alignment-max-iter-text": good + "alignment: {engine: weight_matching, max_iter: many}\n",
        "evaluate-points-negative": good + "evaluate: {data: 'sklearn:digits', points: -3}\n",
        "evaluate-data-number": good + "evaluate: {data: 5}\n",
        "tokenizer-pad-text": good + "tokenizer: {source: union, pad_to_multiple_of: eight}\n",
        "publish-private-text": good + "publish: {repo_id: me/x, private: maybe}\n",
    }
    for case_id, text in nested.items():
        add(case_id, text)
    # unknown keys
    for case_id, text in {
        "unknown-top": good + "merge_methd: ties\n",
        "unknown-entry": "merge_method: linear\nmodels:\n  - model: " + a + "\n    weight: 0.5\n  - model: " + b + "\n",
        "unknown-alignment": good + "alignment: {engine: weight_matching, iterations: 5}\n",
        "unknown-evaluate": good + "evaluate: {data: 'sklearn:digits', metric: f1}\n",
        "unknown-tokenizer": good + "tokenizer: {source: union, vocab: 5}\n",
        "unknown-architecture": good + "architecture: {factory: 'suture.merge.zoo:mlp', args: [1]}\n",
        "unknown-stitch": "stitch: {source: {model: " + a + ", layer: 1}, target: {model: " + b + ", layer: 1}, method: procrustes, extra: 1}\n",
        "unknown-publish": good + "publish: {repo_id: me/x, token: hf_abc}\n",
    }.items():
        add(case_id, text)
    # parameter values of the wrong kind (key path and YAML line)
    for case_id, block, method in BAD_PARAMETERS:
        add(f"param-{case_id}", f"merge_method: {method}\nmodels:\n  - model: {a}\n    parameters:\n      {block}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")
    for case_id, block, method in BAD_GLOBALS:
        base_model = f"base_model: {a}\n" if method == "task_arithmetic" else ""
        models = _models_block([b] if base_model else [a, b])
        add(f"global-{case_id}", f"merge_method: {method}\n{base_model}{models}parameters:\n  {block}\n")
    # YAML attacks and malformed documents
    for case_id, text in YAML_ATTACKS.items():
        add(f"yaml-{case_id}", text)
    for case_id, data in NON_UTF8.items():
        add(f"bytes-{case_id}", data)
    add("recipe-is-a-directory", path=recipes)
    add("recipe-missing", path=recipes / "no-such-recipe.yml")
    add("recipe-missing-other-suffix", path=recipes / "no-such-recipe.txt")
    # shard sizes: in the recipe and on the command line
    for size in SHARD_SIZES:
        add(f"shard-{size}", good + f"out_shard_size: {size}\n")
    good_path = recipes / "good.yml"
    good_path.write_text(good)
    for size in CLI_SHARD_SIZES:
        add(f"cli-shard-{size}", path=good_path, extra_args=[f"--out-shard-size={size}"])
    # models that are missing, offline, not safetensors, or do not fit together
    for case_id, refs in {
        "model-missing": [a, str(workdir / "no-such-model")],
        "model-missing-relative": [a, "./nowhere/model"],
        "hub-offline": [a, "suture-fuzz/does-not-exist"],
        "hub-offline-revision": [a, "suture-fuzz/does-not-exist@v1"],
        "hub-offline-lora": [a, f"{b}+suture-fuzz/adapter"],
        "demo-unknown": [a, "demo:mlp-seed99"],
        "not-safetensors": [a, str(m["text"])],
        "empty-safetensors": [a, str(m["empty"])],
        "pickle-not-allowed": [a, str(m["pickle"])],
        "different-widths": [a, str(m["narrow"])],
    }.items():
        add(case_id, "merge_method: linear\n" + _models_block(refs))
    # impossible combinations
    for case_id, text in {
        "unknown-method": good.replace("linear", "linaer"),
        "method-missing": _models_block([a, b]),
        "models-and-slices": good + "slices:\n  - sources:\n      - model: " + a + "\n        layer_range: [0, 1]\n",
        "no-models": "merge_method: linear\n",
        "empty-models": "merge_method: linear\nmodels: []\n",
        "duplicate-model": "merge_method: linear\n" + _models_block([a, a]),
        "needs-base": "merge_method: task_arithmetic\n" + _models_block([a, b]),
        "tokenizer-both": good + "tokenizer_source: union\ntokenizer: {source: union}\n",
        "tokenizer-base-without-base": good + "tokenizer_source: base\n",
        "alignment-unknown-engine": good + "alignment: {engine: telepathy}\n",
        "alignment-reference-elsewhere": good + f"alignment: {{engine: weight_matching, reference: {m['narrow']}}}\n",
        "alignment-blend-ties": f"merge_method: ties\nbase_model: {a}\n" + _models_block([b]) + "alignment: {engine: weight_matching, blend: 0.3}\n",
        "alignment-widths-differ": "merge_method: linear\n" + _models_block([a, str(m["narrow"])]) + "alignment: {engine: weight_matching}\n",
        "zipit-without-data": "alignment: {engine: zipit}\n" + _models_block([a, b]),
        "repair-without-architecture": "merge_method: linear\n" + _models_block([str(m["bare"]), a])
        + "alignment: {engine: weight_matching, repair: repair}\n",
        "evaluate-without-architecture": "merge_method: linear\n" + _models_block([str(m["bare"]), str(m["bare"]) + "/model.safetensors"])
        + "evaluate: {data: 'sklearn:digits', plot: false}\n",
        "stitch-with-method": "merge_method: linear\nstitch: {source: {model: " + a + ", layer: 1}, target: {model: " + b + ", layer: 1}, method: procrustes}\n",
        "stitch-layer-out-of-range": "stitch: {source: {model: " + a + ", layer: 99}, target: {model: " + b + ", layer: 1}, method: procrustes}\n",
        "evaluate-unknown-data": good + "evaluate: {data: 'sklearn:no_such_set', plot: false}\n",
        "evaluate-data-missing-file": good + f"evaluate: {{data: '{workdir / 'no-such-data.npz'}', plot: false}}\n",
        "architecture-missing-module": good + "architecture: 'no_such_package_for_fuzz:make'\nalignment: {engine: activation_matching, data: 'sklearn:digits'}\n",
        "architecture-not-callable": good + "architecture: 'suture.merge.zoo:ARCH_KEY'\nalignment: {engine: activation_matching, data: 'sklearn:digits'}\n",
        "config-kwargs-list": "merge_method: linear\n" + _models_block([str(m["bad-config"]), a]) + "evaluate: {data: 'sklearn:digits', plot: false}\n",
    }.items():
        add(case_id, text)
    # architectures that a model's own config.json names outside the zoo (must never be imported or called)
    sections: dict[str, Callable[[str], str]] = {
        "alignment": lambda ref: "alignment: {engine: activation_matching, data: 'sklearn:digits', max_items: 64, reference: " + ref + "}\n",
        "evaluate": lambda ref: "evaluate: {data: 'sklearn:digits', plot: false, max_items: 64}\n",
        "ot": lambda ref: "alignment: {engine: ot, data: 'sklearn:digits', max_items: 64, reference: " + ref + "}\n",
    }
    for evil in ("evil", "shell", "subprocess"):
        for label, section in sections.items():
            add(f"malicious-{evil}-{label}", "merge_method: linear\n" + _models_block([str(m[evil]), b]) + section(str(m[evil])))
        add(f"malicious-{evil}-zipit", _models_block([str(m[evil]), b]) + "alignment: {engine: zipit, data: 'sklearn:digits', max_items: 64}\n")
    add("malicious-stitch", "stitch: {source: {model: " + str(m["evil"]) + ", layer: 1}, target: {model: " + b + ", layer: 1}, method: procrustes}\n")
    return cases


__all__ = ["EVIL_MODULE", "MARKER", "recipe_cases"]
