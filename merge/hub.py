"""Hugging Face Hub access: turn `org/name[@revision]` into a local snapshot, and publish an output folder.

Whether a reference names a Hub repo is decided syntactically (:func:`is_hub_id`), never with a network
call, so offline runs and relative local paths behave the same everywhere. Downloads go into the standard
Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``, read when the call is made) and fetch only what a merge
needs: safetensors weights and their index, configs, tokenizer files and the README (for the license).
Pickle checkpoints are fetched only when the caller opts in and the repo has no safetensors.

Every failure becomes an :class:`~merge.errors.InputError` with one readable line. Tokens are never
logged, printed, written to a file, or left in an error message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from suture.merge.errors import InputError
from suture.merge.redact import known_secrets, redact, register_secret

logger = logging.getLogger(__name__)

#: Files a merge reads from a model repo (root level only; sub-folders hold ONNX/other exports).
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt"]
SUBFOLDER_PATTERN = "*/*"

# Files never published from an output folder: temporary files of an interrupted write, caches, VCS data.
# Said to people, not to programmers: how to give Suture a token (the Python API's `token=` argument is documented).
LOGIN_HINT = ("log in once with `hf auth login` (it stores a token from https://huggingface.co/settings/tokens), "
              "or set the HF_TOKEN environment variable to such a token")
_SKIP_SUFFIXES = (".tmp", ".incomplete", ".lock", ".pyc")
_SKIP_DIRS = {"__pycache__"}
# Hub naming rules: letters, digits, '-', '_', '.'; no '--' or '..'; not starting/ending with '-' or '.'.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".yaml", ".yml", ".npz", ".onnx")
_HUB_PREFIX = "hf://"
_NETWORK_ERROR_NAMES = {
    "ConnectError",
    "ConnectTimeout",
    "ConnectionError",
    "NetworkError",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "TransportError",
    "ProxyError",
}

# progress(fraction in [0, 1], message): the order st.progress(value, text) uses; tqdm wrappers adapt it.
ProgressFn = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------------- references


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """Split `[hf://]org/name[@revision]` into (repo_id, revision or None) without checking validity."""
    text = ref.strip()
    if text.startswith(_HUB_PREFIX):
        text = text[len(_HUB_PREFIX):]
        if text.startswith("models/"):
            text = text[len("models/"):]
    repo_id, sep, revision = text.partition("@")
    return repo_id, (revision if sep else None)


def _valid_repo_id(repo_id: str) -> bool:
    parts = repo_id.split("/")
    if len(parts) != 2:
        return False
    for part in parts:
        if not _NAME_RE.match(part) or "--" in part or ".." in part:
            return False
    # A name ending like a model file is a missing local file, not a repo (e.g. "models/a.safetensors").
    return not parts[1].lower().endswith(_FILE_SUFFIXES)


def is_hub_id(ref: str, *, base_dir: str | Path | None = None) -> bool:
    """True when `ref` reads as a Hub model id `org/name[@revision]` and is not an existing local path."""
    if not isinstance(ref, str) or not ref.strip():
        return False
    text = ref.strip()
    explicit = text.startswith(_HUB_PREFIX)
    if not explicit:
        if text.startswith(("/", ".", "~", "\\")) or "\\" in text or ":" in text:
            return False
        local = Path(text).expanduser()
        if local.exists() or (base_dir is not None and (Path(base_dir) / text).exists()):
            return False
    repo_id, revision = split_hub_ref(text)
    if not _valid_repo_id(repo_id):
        return False
    return revision is None or (bool(_REVISION_RE.match(revision)) and ".." not in revision)


# ---------------------------------------------------------------------------------------------- environment


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """The Hub URL in use: ``HF_ENDPOINT`` read now (it may change after import), else the library default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring ``HF_HUB_CACHE`` and ``HF_HOME`` as they are set now."""
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for cache-only Hub access."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _resolve_token(token: str | None) -> str | None:
    """Explicit token, else ``HF_TOKEN``, else the one saved by `hf auth login` (None when there is none).

    The token found is registered with :mod:`merge.redact`, so no log record or error line shows it.
    """
    found: str | None = None
    if token:
        found = token.strip()
    else:
        env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        if env and env.strip():
            found = env.strip()
        else:
            try:
                from huggingface_hub import get_token

                found = get_token()
            except Exception:  # a broken token file must not hide the real problem
                logger.debug("could not read a saved Hugging Face token", exc_info=False)
    register_secret(found)
    return found


def _scrub(text: str, token: str | None) -> str:
    """Remove the token (and every known or token-shaped secret) from `text`."""
    return redact(text, token)


# ---------------------------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        pending.extend([current.__cause__, current.__context__])
    return seen


def _network_error(exc: BaseException) -> BaseException | None:
    """The connection/timeout error inside `exc`'s chain, if any (httpx, httpx2 or requests)."""
    for item in _chain(exc):
        names = {cls.__name__ for cls in type(item).__mro__}
        if names & _NETWORK_ERROR_NAMES or isinstance(item, (ConnectionError, TimeoutError)):
            return item
    return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    message = getattr(exc, "server_message", None)
    if message:
        return str(message).strip()
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hub_error(
    exc: BaseException,
    *,
    action: str,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    token: str | None,
    cache_dir: Path | None = None,
    writing: bool = False,
) -> InputError:
    """Translate a huggingface_hub / network exception into one readable, token-free InputError."""
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    gated = getattr(hf_errors, "GatedRepoError", ())
    revision_missing = getattr(hf_errors, "RevisionNotFoundError", ())
    repo_missing = getattr(hf_errors, "RepositoryNotFoundError", ())
    http_error = getattr(hf_errors, "HfHubHTTPError", ())
    entry_missing = getattr(hf_errors, "RemoteEntryNotFoundError", getattr(hf_errors, "EntryNotFoundError", ()))
    local_missing = tuple(
        cls for cls in (getattr(hf_errors, "LocalEntryNotFoundError", None), getattr(hf_errors, "IncompleteSnapshotError", None)) if cls
    )
    status = _status(exc)
    login_hint = LOGIN_HINT
    network = _network_error(exc)

    if gated and isinstance(exc, gated):
        text = (
            f"{action} {where}: the repository is gated; request access at {endpoint}/{repo_id} and use a token "
            f"of an account that was granted access ({login_hint})"
        )
    elif revision_missing and isinstance(exc, revision_missing):
        text = f"{action} {repo_id}: revision {revision!r} not found (expected a branch, tag or commit of that repository)"
    elif status == 401 and "Invalid credentials" in str(exc) or (status == 401 and token and not isinstance(exc, repo_missing)):
        text = f"{action} {where}: the Hub at {endpoint} rejected the token (HTTP 401 Unauthorized); check it, or {login_hint}"
    elif repo_missing and isinstance(exc, repo_missing):
        hint = (
            "check the spelling (org/name) and that your token can write to that namespace"
            if writing
            else f"check the spelling (org/name); if it is private or gated, {login_hint} with a token that can read it"
        )
        text = f"{action} {where}: repository not found on {endpoint} (HTTP {status or 404}); {hint}"
    elif status == 401:
        text = f"{action} {where}: the Hub at {endpoint} requires authentication (HTTP 401); {login_hint}"
    elif status == 403:
        need = "write" if writing else "read"
        text = f"{action} {where}: access denied (HTTP 403); the token lacks {need} permission for this repository"
    elif entry_missing and isinstance(exc, entry_missing):
        text = f"{action} {where}: a file listed by the Hub is missing on the server (HTTP 404): {_server_message(exc)}"
    elif is_offline() and (local_missing and isinstance(exc, local_missing) or network is None):
        cache = f" at {cache_dir}" if cache_dir else ""
        text = (
            f"{action} {where}: offline mode is on (HF_HUB_OFFLINE=1) and the model is not in the local cache{cache}; "
            "download it once while online, or use a local folder"
        )
    elif network is not None:
        cached = f" and it is not in the local cache at {cache_dir}" if cache_dir else ""
        text = (
            f"{action} {where}: cannot reach the Hub at {endpoint} ({type(network).__name__}: "
            f"{str(network).strip() or 'no response'}){cached}; check the connection and HF_ENDPOINT, or set "
            "HF_HUB_OFFLINE=1 to use cached models only"
        )
    elif http_error and isinstance(exc, http_error):
        text = f"{action} {where}: the Hub answered HTTP {status}: {_server_message(exc)}"
    elif local_missing and isinstance(exc, local_missing):
        text = f"{action} {where}: not available from {endpoint} and not in the local cache{f' at {cache_dir}' if cache_dir else ''}"
    else:
        text = f"{action} {where} failed: {type(exc).__name__}: {_server_message(exc)}"
    return InputError(_scrub(text, token))


# ---------------------------------------------------------------------------------------------- download


def _has(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"*{suffix}") if p.is_file()) if folder.is_dir() else []


def _repo_files(repo_id: str, revision: str | None, cache_dir: Path) -> list[str] | None:
    """All file paths of a repo revision, from the tree listing cached by the last download (no network)."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        return None
    try:
        return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir))
    except Exception:
        return None


def resolve_model_ref(
    ref: str | Path,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local folder for a model reference: local paths as they are, `org/name[@rev]` via the Hub cache."""
    text = str(ref)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if not is_hub_id(text):
        raise InputError(
            f"{text}: no such file or folder, and not a Hugging Face Hub id (expected a local path or org/name[@revision])"
        )
    repo_id, ref_revision = split_hub_ref(text)
    if revision and ref_revision and revision != ref_revision:
        raise InputError(f"{text}: the reference names revision {ref_revision!r} but revision={revision!r} was also given")
    revision = revision or ref_revision
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    token = _resolve_token(token)
    offline = is_offline()

    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        logger.info("fetching %s%s from %s (%s)", repo_id, f"@{revision}" if revision else "", endpoint, ", ".join(patterns))
        try:
            folder = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache),
                allow_patterns=patterns,
                ignore_patterns=[SUBFOLDER_PATTERN],
                token=token if token else False,
                endpoint=endpoint,
                local_files_only=offline,
                library_name="suture",
            )
        except InputError:
            raise
        except Exception as exc:  # every Hub/network failure becomes one readable line
            logger.debug("download of %s failed: %s", repo_id, _scrub(repr(exc), token))
            raise _hub_error(
                exc, action="cannot download", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token, cache_dir=cache
            ) from None
        return Path(folder)

    folder = fetch(WEIGHT_PATTERNS + META_PATTERNS)
    if _has(folder, ".safetensors"):
        return folder

    files = _repo_files(repo_id, revision, cache) or []
    pickles = [f for f in files if "/" not in f and f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if allow_pickle and (pickles or not files):
        folder = fetch(PICKLE_PATTERNS + META_PATTERNS)
        if any(_has(folder, s) for s in (".bin", ".pt", ".pth", ".ckpt")):
            logger.warning("%s has no safetensors weights; using pickle checkpoints (loaded with weights_only=True)", repo_id)
            return folder
    where = f"{repo_id}@{revision}" if revision else repo_id
    if pickles and not allow_pickle:
        raise InputError(
            f"{where}: the repository has no .safetensors weights, only pickle checkpoints ({', '.join(pickles[:4])}); "
            "pickle can run code, so it is refused unless you opt in with --allow-pickle / `allow_pickle: true`"
        )
    listing = f" (files: {', '.join(files[:8])}{', ...' if len(files) > 8 else ''})" if files else ""
    raise InputError(f"{where}: the repository has no model weights at its root (expected *.safetensors){listing}")


# ---------------------------------------------------------------------------------------------- upload


def _files_to_push(out_dir: Path) -> list[Path]:
    files = []
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts):
            continue
        if path.is_file() and not path.name.endswith(_SKIP_SUFFIXES):
            files.append(path)
    return files


_SCAN_CHUNK = 1 << 20
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on a header


def _stream_contains(path: Path, needles: list[bytes]) -> bool:
    """True when any needle occurs in the file, read in chunks that overlap by a needle's length."""
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    with path.open("rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:] if overlap > 0 else b""
    return False


def _header_contains(path: Path, secrets: list[str]) -> bool:
    """True when a safetensors header (tensor names, ``__metadata__``) holds a secret; the weights are not read."""
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return False
        header = fh.read(min(int.from_bytes(prefix, "little"), _MAX_HEADER))
    if any(s.encode() in header for s in secrets):
        return True
    try:  # JSON escapes (\u0068f_...) would hide a token from the byte search
        text = json.dumps(json.loads(header), ensure_ascii=False)
    except (ValueError, RecursionError):
        return False
    return any(s in text for s in secrets)


def _refuse_token_in_files(files: list[Path], out_dir: Path, token: str) -> None:
    """Refuse to publish a folder that carries a token: in a safetensors header, or anywhere in another file.

    Every file but the weights is searched whole (README, config, recipe, report, tokenizer files of any
    size), as UTF-8 and UTF-16; of a .safetensors file only the header, where metadata strings live.
    """
    secrets = sorted({token, *known_secrets()}, key=len, reverse=True)
    needles = [s.encode(enc) for s in secrets for enc in ("utf-8", "utf-16-le", "utf-16-be")]
    for path in files:
        if path.suffix == ".safetensors":
            found, where = _header_contains(path, secrets), " (in its safetensors metadata)"
        else:
            found, where = _stream_contains(path, needles), ""
        if found:
            raise InputError(_scrub(
                f"{path.relative_to(out_dir)}: contains a Hugging Face token{where}; remove it before publishing the folder",
                token,
            ))


def push_timeout(value: float | str | None = None) -> float:
    """Seconds a push waits for any one answer from the Hub: `value`, else ``SUTURE_PUSH_TIMEOUT``, else 60."""
    from suture.merge.hub_http import DEFAULT_SECONDS

    source = "timeout"
    if value is None:
        value, source = os.environ.get("SUTURE_PUSH_TIMEOUT", "").strip() or None, "SUTURE_PUSH_TIMEOUT"
        if value is None:
            return DEFAULT_SECONDS
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{source}={value!r}: expected a positive number of seconds")
    return seconds


def push_folder(
    out_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    progress: ProgressFn | None = None,
    endpoint: str | None = None,
    timeout: float | None = None,
) -> str:
    """Publish an output folder (shards, index, config, tokenizer, recipe, report, card) to a Hub model repo.

    `timeout` (default ``SUTURE_PUSH_TIMEOUT`` or 60 s) bounds each wait for the Hub: a server that stops
    answering fails the push after that long instead of hanging (see :mod:`merge.hub_http`).
    """
    folder = Path(out_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder to publish")
    repo_id, ref_revision = split_hub_ref(repo_id)
    if not _valid_repo_id(repo_id):
        raise InputError(f"{repo_id!r}: not a valid Hub repository id (expected org/name)")
    if revision and ref_revision and revision != ref_revision:
        raise InputError(f"{repo_id}: revision given twice ({ref_revision!r} and {revision!r})")
    revision = revision or ref_revision
    if revision is not None and not _REVISION_RE.match(revision):
        raise InputError(f"{revision!r}: not a valid branch name")
    seconds = push_timeout(timeout)
    files = _files_to_push(folder)
    if not files:
        raise InputError(f"{folder}: the folder is empty; nothing to publish")
    if not any(p.suffix == ".safetensors" for p in files):
        logger.warning("%s holds no .safetensors files; publishing it anyway", folder)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    if is_offline():
        raise InputError(f"cannot publish {repo_id}: offline mode is on (HF_HUB_OFFLINE=1)")
    token = _resolve_token(token)
    if not token:
        raise InputError(f"cannot publish {repo_id}: no Hugging Face token; {LOGIN_HINT}")
    _refuse_token_in_files(files, folder, token)

    def report(fraction: float, message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(fraction, message)

    from huggingface_hub import CommitOperationAdd, HfApi

    from suture.merge import __version__
    from suture.merge.hub_http import HubTimeout, bound_hub_requests

    bound_hub_requests(seconds)
    api = HfApi(endpoint=endpoint, token=token, library_name="suture", library_version=__version__)
    target = f"{repo_id}@{revision}" if revision else repo_id
    step = "cannot create repository"
    try:
        report(0.0, f"creating {repo_id} on {endpoint} (if missing)")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not revision.startswith("refs/"):
            step = "cannot create branch"
            report(0.1, f"creating branch {revision} (if missing)")
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "cannot upload to"
        total = sum(p.stat().st_size for p in files)
        report(0.2, f"uploading {len(files)} files ({total / 1e6:.1f} MB) to {target}")
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload model made with Suture",
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except InputError:
        raise
    except Exception as exc:  # every Hub/network failure becomes one readable line
        logger.debug("push to %s failed: %s", repo_id, _scrub(repr(exc), token))
        if any(isinstance(item, HubTimeout) for item in _chain(exc)):
            raise InputError(_scrub(
                f"push to {endpoint}/{repo_id} timed out after {seconds:g} s: the Hub sent no answer "
                "(raise --timeout or SUTURE_PUSH_TIMEOUT on a slow link)", token)) from None
        raise _hub_error(exc, action=step, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token, writing=True) from None

    if create_pr and getattr(info, "pr_url", None):
        url = str(info.pr_url)
    elif revision and revision != "main":
        url = f"{endpoint}/{repo_id}/tree/{quote(revision, safe='')}"
    else:
        url = f"{endpoint}/{repo_id}"
    report(1.0, f"published {target} (commit {getattr(info, 'oid', '?')}): {url}")
    return _scrub(url, token)


__all__ = [
    "WEIGHT_PATTERNS",
    "META_PATTERNS",
    "PICKLE_PATTERNS",
    "split_hub_ref",
    "is_hub_id",
    "hub_endpoint",
    "hub_cache_dir",
    "is_offline",
    "resolve_model_ref",
    "push_timeout",
    "push_folder",
]
