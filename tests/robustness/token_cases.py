"""Token canary cases: `suture push/inspect -v` against a Hub stand-in that echoes the token, folders that
carry the token, and a server that never answers. The canary must never be seen, and nothing may hang.

:func:`token_canary_counts` runs every case in-process (through the fuzz suites' CLI judge) and returns the
counts the robustness benchmark prints; the tests assert on them.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.hub_server import LocalHub, point_client_at, silent_server_url
from tests.robustness.harness import Case, Outcome, run_cli_case

CANARY = "hf_CANARYq7Zt0kP3vX9mB2nL5wR8sD4f"
TIMEOUT_S = 2.0  # the push time limit the silent-server cases use
SLACK_S = 8.0  # start-up and scheduling on a busy 2-core machine
CHUNK_EDGE = 2 << 20  # a multiple of any power-of-two read size up to 2 MiB


def make_folder(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A small publishable output folder: weights, config, card."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({"layer.weight": np.ones((4, 4), np.float32)}, str(path / "model.safetensors"), metadata=metadata)
    (path / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_size": 4}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [merge]\n---\n# canary test model\n")
    return path


def _escaped_metadata_file(path: Path) -> None:
    """A safetensors file whose metadata holds the canary JSON-escaped (no plain bytes of it in the file)."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in CANARY)
    header = ('{"__metadata__":{"note":"' + escaped + '"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}').encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")


@contextlib.contextmanager
def _canary_hub(hf_home: Path) -> Iterator[LocalHub]:
    """A running stand-in Hub that accepts the canary as a write token, with the client and HF_TOKEN on it."""
    with pytest.MonkeyPatch.context() as mp:
        hub = LocalHub().start()
        try:
            point_client_at(mp, hub.url, hf_home)
            mp.setenv("HF_TOKEN", CANARY)
            hub.tokens[CANARY] = {"user": "tester", "write": True}
            yield hub
        finally:
            hub.stop()


@dataclass
class _Result:
    case_id: str
    leak: bool
    hang: bool
    traceback: bool
    wrong: str  # "" when the case behaved as expected


def _seen(outcome: Outcome, roots: list[Path], hub: LocalHub | None, planted: set[Path]) -> list[str]:
    """Where the canary shows up: output, files under `roots` (except planted inputs), the server's copies."""
    places = [name for name, text in (("stdout", outcome.stdout), ("stderr", outcome.stderr)) if CANARY in text]
    needle = CANARY.encode()
    for root in roots:
        for path in root.rglob("*") if root.exists() else ():
            if path.is_file() and path not in planted and needle in path.read_bytes():
                places.append(str(path))
    if hub is not None:
        places += [f"server blob {sha[:8]}" for sha, data in hub.blobs.items() if needle in data]
        places += ["server README validation" for text in hub.validated if CANARY in text]
    return places


def _expect_refusal(outcome: Outcome, name: str, hub: LocalHub) -> str:
    if outcome.clean and name in outcome.error_lines[0] and not hub.requests:
        return ""
    return f"expected a refusal naming {name} before any request: {outcome.describe()}"


def token_canary_counts(workdir: str | Path) -> dict:
    """Run every token case under `workdir`: counts of cases tried, leaks, hangs, tracebacks and wrong outcomes.

    A case leaks when the canary shows in stdout/stderr (logs included), in a file under `workdir` it did not
    plant, or in what the server stored; it is wrong when it did not end as expected (published, one 401
    line, a refusal naming the file before any request, or one "timed out" line within the bound).
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    hf_home = work / "hf_home"
    results: list[_Result] = []
    planted: set[Path] = set()  # input files that carry the canary on purpose

    def run(case_id: str, argv: list[str], judge: Callable[[Outcome, float], str], *, hub: LocalHub | None,
            limit: float = 60.0) -> None:
        start = time.monotonic()
        outcome = run_cli_case(Case(case_id, argv), timeout=limit)
        elapsed = time.monotonic() - start
        places = _seen(outcome, [work], hub, planted)
        wrong = judge(outcome, elapsed)
        if places:
            wrong = f"{wrong}; canary seen in {', '.join(places)}".lstrip("; ")
        results.append(_Result(case_id, bool(places), outcome.hang, outcome.traceback, wrong))

    with _canary_hub(hf_home) as hub:
        hub.echo_auth = True
        folder = make_folder(work / "out")

        ok = lambda o, _t: "" if o.exit_code == 0 and "published:" in o.stdout else f"push failed: {o.describe()}"  # noqa: E731
        run("push -v, server echoes the token", ["push", str(folder), "tester/canary", "-v"], ok, hub=hub)
        run("push -v to a branch, echoing server", ["push", str(folder), "tester/canary", "--revision", "dev", "-v"], ok, hub=hub)
        for name in ("tester/private", "tester/private2"):
            hub.add_repo(name, {"model.safetensors": (folder / "model.safetensors").read_bytes(), "config.json": b"{}"}, private=True)
        run("inspect -v of a private Hub model, echoing server", ["inspect", "tester/private", "-v"],
            lambda o, _t: "" if o.exit_code == 0 and "layer.weight" in o.stdout else f"inspect failed: {o.describe()}", hub=hub)

        del hub.tokens[CANARY]  # now the server rejects the canary and quotes it in its error message
        rejected = lambda o, _t: "" if o.clean and "401" in o.error_lines[0] else f"expected one 401 line: {o.describe()}"  # noqa: E731
        run("push -v, server rejects and quotes the token", ["push", str(folder), "tester/canary", "-v"], rejected, hub=hub)
        run("inspect -v, server rejects and quotes the token", ["inspect", "tester/private2", "-v"], rejected, hub=hub)

    refusals: list[tuple[str, str, Callable[[Path], Path]]] = [
        ("README.md", "token in README.md", lambda f: _write(f / "README.md", f"# model\nHF_TOKEN={CANARY}\n")),
        ("suture_recipe.yml", "token in the recipe", lambda f: _write(f / "suture_recipe.yml", f"publish:\n  token: {CANARY}\n")),
        ("tokenizer_config.json", "token in a tokenizer file",
         lambda f: _write(f / "tokenizer_config.json", json.dumps({"auth": f"Bearer {CANARY}"}))),
        ("model.safetensors", "token in safetensors __metadata__",
         lambda f: (make_folder(f, metadata={"pushed_with": CANARY}), f / "model.safetensors")[1]),
        ("extra.safetensors", "token JSON-escaped in safetensors metadata", lambda f: _escaped(f / "extra.safetensors")),
        ("logs/train.txt", "token across a read-chunk boundary deep in a 3 MB text file", lambda f: _large(f / "logs" / "train.txt")),
        ("vocab.txt", "token in a UTF-16 text file", lambda f: _write(f / "vocab.txt", f"a\nb\n{CANARY}\n", "utf-16")),
    ]
    for index, (name, case_id, plant) in enumerate(refusals):
        with _canary_hub(hf_home) as hub:
            folder = make_folder(work / f"planted{index}")
            planted.add(plant(folder))
            run(case_id, ["push", str(folder), "tester/planted", "-v"], lambda o, _t, n=name, h=hub: _expect_refusal(o, n, h), hub=hub)

    silent = [
        ("silent server, --timeout", ["--timeout", f"{TIMEOUT_S:g}"], None),
        ("silent server, SUTURE_PUSH_TIMEOUT", [], f"{TIMEOUT_S:g}"),
    ]
    for case_id, extra, env in silent:
        with pytest.MonkeyPatch.context() as mp, silent_server_url() as url:
            point_client_at(mp, url, hf_home)
            mp.setenv("HF_TOKEN", CANARY)
            if env is not None:
                mp.setenv("SUTURE_PUSH_TIMEOUT", env)
            folder = make_folder(work / "out")

            def timed_out(o: Outcome, elapsed: float, url: str = url) -> str:
                expected = f"push to {url}/tester/silent timed out after {TIMEOUT_S:g} s"
                if not (o.clean and expected in o.error_lines[0]):
                    return f"expected one line {expected!r}: {o.describe()}"
                return "" if elapsed < TIMEOUT_S + SLACK_S else f"took {elapsed:.1f} s"

            run(case_id, ["push", str(folder), "tester/silent", "-v", *extra], timed_out, hub=None, limit=TIMEOUT_S + SLACK_S + 20)
            results[-1].hang = results[-1].hang or "took" in results[-1].wrong

    return {
        "cases": len(results),
        "leaks": sum(r.leak for r in results),
        "hangs": sum(r.hang for r in results),
        "tracebacks": sum(r.traceback for r in results),
        "wrong": sum(bool(r.wrong) for r in results),
        "failures": [f"{r.case_id}: {r.wrong}" for r in results if r.wrong],
    }


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _escaped(path: Path) -> Path:
    _escaped_metadata_file(path)
    return path


def _large(path: Path) -> Path:
    """3 MB of log lines with the canary straddling the 2 MiB mark."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = b"step 1234 loss 0.123456 lr 0.0001 grad_norm 1.0\n"
    body = bytearray(line * ((3 << 20) // len(line)))
    start = CHUNK_EDGE - len(CANARY) // 2
    body[start:start + len(CANARY)] = CANARY.encode()
    path.write_bytes(bytes(body))
    return path


__all__ = ["CANARY", "token_canary_counts"]

if __name__ == "__main__":  # pragma: no cover - a quick look by hand
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(token_canary_counts(tmp), indent=2))
