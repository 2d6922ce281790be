"""A local, in-memory stand-in for the Hugging Face Hub HTTP API, driven by the real huggingface_hub client.

It implements the endpoints an upload and a download touch: repo creation, README metadata validation,
preupload (regular vs LFS), NDJSON commits (inline files, LFS files, deletions, pull requests), branch
creation, repo info, tree listing, refs, file resolution (HEAD/GET with the headers the client checks), and
the git-LFS batch / PUT / verify protocol. Errors carry the ``X-Error-Code`` values the client maps to its
exception types (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and a bad token gets a 401.

`hub_server` (a pytest fixture) starts one on 127.0.0.1 with a random port, points the client at it
(``HF_ENDPOINT`` plus the client's import-time constants) and gives it a private HF_HOME.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
DEFAULT_TOKEN = "hf_LocalHubWriteToken0123456789abcdef"
READ_ONLY_TOKEN = "hf_LocalHubReadOnlyToken0123456789abc"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that stands for a large file in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, dict[str, Any]]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    n_prs: int = 0


class HubError(Exception):
    """An HTTP error answer: status, message, and the Hub's X-Error-Code when there is one."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


class LocalHub:
    """The server: state, helpers for tests, and the request handling."""

    def __init__(self, *, lfs_threshold: int | None = None) -> None:
        self.tokens: dict[str, dict[str, Any]] = {
            DEFAULT_TOKEN: {"user": "tester", "write": True},
            READ_ONLY_TOKEN: {"user": "reader", "write": False},
        }
        self.token = DEFAULT_TOKEN
        self.lfs_threshold = lfs_threshold  # files at least this large are "lfs"; None: every file is "regular"
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content
        self.lfs_objects: set[str] = set()  # sha256 of objects uploaded and verified over git-LFS
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authenticated); never headers
        self.validated: list[str] = []  # README contents sent to /api/validate-yaml
        # a careless server: every answer repeats the request's Authorization header (a header and, on errors,
        # the message), so tests can prove the client side never shows it
        self.echo_auth = False
        # requests whose path contains this text get no answer until the server stops (a Hub that stalls mid-push);
        # with stall_after_headers the status line and headers go out first, then the body never comes
        self.stall_on: str | None = None
        self.stall_after_headers = False
        self._stopping = threading.Event()
        self.lock = threading.RLock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ------------------------------------------------------------------ helpers for tests

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False, repo_type: str = "model") -> str:
        """Create a repo holding `files` on main (one commit); return the commit oid."""
        with self.lock:
            repo = self._create_repo(repo_id, repo_type, private=private)
            repo.gated = gated
            entries = {path: self._store(data, lfs=self._is_lfs(len(data))) for path, data in files.items()}
            return self._commit(repo, "main", entries, deleted=(), message="Add files")

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Content of `path` at `revision`."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            commit = repo.commits[self._resolve_rev(repo, revision)]
            return self.blobs[commit.files[path]["sha256"]]

    def file_entry(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> dict[str, Any]:
        """Stored metadata of `path` at `revision` (sha256, size, lfs flag)."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            return dict(repo.commits[self._resolve_rev(repo, revision)].files[path])

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Paths present at `revision`."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            return sorted(repo.commits[self._resolve_rev(repo, revision)].files)

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """Number of commits in the repo (all refs)."""
        with self.lock:
            return len(self.repos[(repo_type, repo_id)].commits)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit oid a ref points to."""
        with self.lock:
            return self._resolve_rev(self.repos[(repo_type, repo_id)], revision)

    def count(self, method: str, path_part: str) -> int:
        """How many requests with `method` had `path_part` in their path."""
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    # ------------------------------------------------------------------ state (call with the lock held)

    def _is_lfs(self, size: int) -> bool:
        return self.lfs_threshold is not None and size >= self.lfs_threshold and size > 0

    def _store(self, data: bytes, *, lfs: bool) -> dict[str, Any]:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        oid = git_blob_oid(lfs_pointer(sha, len(data))) if lfs else git_blob_oid(data)
        return {"sha256": sha, "size": len(data), "lfs": lfs, "git_oid": oid, "blob_oid": git_blob_oid(data)}

    def _create_repo(self, repo_id: str, repo_type: str, *, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
        self.repos[(repo_type, repo_id)] = repo
        self._commit(repo, None, {".gitattributes": self._store(GITATTRIBUTES, lfs=False)}, deleted=(), message="initial commit")
        repo.refs["main"] = next(iter(repo.commits))
        return repo

    def _commit(self, repo: Repo, ref: str | None, added: dict[str, dict], deleted: tuple, message: str) -> str:
        parent = repo.refs.get(ref) if ref else None
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            files.pop(path, None)
        files.update(added)
        self._commit_counter += 1
        digest = json.dumps([parent, message, sorted((p, f["sha256"]) for p, f in files.items()), self._commit_counter])
        oid = hashlib.sha1(digest.encode()).hexdigest()
        repo.commits[oid] = Commit(oid=oid, parent=parent, message=message, files=files)
        if ref:
            repo.refs[ref] = oid
        return oid

    def _resolve_rev(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in repo.refs:
            return repo.refs[revision[len("refs/heads/"):]]
        if len(revision) >= 7:
            matches = [oid for oid in repo.commits if oid.startswith(revision.lower())]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _split_front_matter(content: str) -> str | None:
    if not content.startswith("---"):
        return None
    end = content.find("\n---", 3)
    return content[3:end] if end != -1 else None


def validate_card_metadata(content: str) -> list[str]:
    """Errors the Hub would report for a README's YAML metadata (the subset this server checks)."""
    block = _split_front_matter(content)
    if block is None:
        return []
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in metadata: {exc}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    base = meta.get("base_model")
    if base is not None and not (isinstance(base, str) or (isinstance(base, list) and all(isinstance(b, str) for b in base))):
        errors.append('"base_model" must be a string or a list of strings')
    for key in ("tags", "datasets", "metrics"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    for key in ("license", "library_name", "pipeline_tag"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
        if not base:
            errors.append('"base_model_relation" needs "base_model"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: LocalHub

    # silence the default stderr access log (and never record headers anywhere)
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> LocalHub:
        return self.server_hub

    def _base(self) -> str:
        return self.hub.url

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self, raw: bytes) -> Any:
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from exc

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if self.hub.echo_auth and self.headers.get("Authorization"):
            self.send_header("X-Echo-Authorization", self.headers["Authorization"])
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _user(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        info = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return info["user"]

    def _writer(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write")
        token = self.headers["Authorization"].partition(" ")[2].strip()
        if not self.hub.tokens[token]["write"]:
            raise HubError(403, "You don't have the rights to write with this token")
        return user

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        user = self._writer() if write else self._user()
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user is None):
            # the Hub answers 401 for private repos without a token, 404 otherwise; both carry RepoNotFound
            status = 401 if repo is not None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        segs = [s for s in parts.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body = self._read_body() if method in ("POST", "PUT") else b""
        with self.hub.lock:
            self.hub.requests.append((method, parts.path, self.headers.get("Authorization") is not None))
        if self.hub.stall_on and self.hub.stall_on in parts.path:
            if self.hub.stall_after_headers:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"objects": [')
                self.wfile.flush()
            self.hub._stopping.wait()
            self.close_connection = True
            return
        try:
            with self.hub.lock:
                self._route(method, segs, query, body)
        except HubError as err:
            headers = dict(err.headers)
            if self.hub.echo_auth:
                err.message = f"{err.message} (you sent Authorization: {self.headers.get('Authorization')})"
                err.body = {**(err.body or {}), "error": err.message}
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json(err.status, err.body or {"error": err.message}, headers)
        except Exception as exc:  # a bug in the stand-in: answer 500 so the test shows it
            self._send_json(500, {"error": f"local hub error: {type(exc).__name__}: {exc}"})

    def _route(self, method: str, segs: list[str], query: dict[str, str], body: bytes) -> None:
        if segs[:1] == ["api"]:
            return self._api(method, segs[1:], query, body)
        if segs[:1] == ["__lfs_upload"] and method == "PUT" and len(segs) == 2:
            return self._lfs_put(segs[1], body)
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
        if len(segs) >= 2 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])[:-4]}"
            if segs[5:] == ["batch"]:
                return self._lfs_batch(repo_type, repo_id, body)
            if segs[5:] == ["verify"]:
                return self._lfs_verify(repo_type, repo_id, body)
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
            return self._resolve(repo_type, repo_id, unquote(segs[3]), unquote("/".join(segs[4:])))
        raise HubError(404, f"no route for {method} /{'/'.join(segs)}")

    def _api(self, method: str, segs: list[str], query: dict[str, str], body: bytes) -> None:
        if segs == ["agent-harnesses"] and method == "GET":
            return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if segs == ["whoami-v2"] and method == "GET":
            user = self._user()
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._send_json(200, {"type": "user", "name": user, "orgs": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(self._json_body(body))
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(self._json_body(body))
        if len(segs) >= 3 and segs[0] in REPO_TYPES:
            repo_type = REPO_TYPES[segs[0]]
            repo_id = f"{unquote(segs[1])}/{unquote(segs[2])}"
            rest = [unquote(s) for s in segs[3:]]
            if method == "GET" and not rest:
                return self._info(repo_type, repo_id, "main")
            if method == "GET" and rest[:1] == ["revision"] and len(rest) == 2:
                return self._info(repo_type, repo_id, rest[1])
            if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_type, repo_id)
            if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                return self._preupload(repo_type, repo_id, rest[1], self._json_body(body), query)
            if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                return self._commit(repo_type, repo_id, rest[1], body, query)
            if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                return self._branch(repo_type, repo_id, rest[1], self._json_body(body))
        raise HubError(404, f"no route for {method} /api/{'/'.join(segs)}")

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, payload: dict) -> None:
        user = self._writer()
        name = payload.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "name is required")
        repo_id = f"{payload.get('organization') or user}/{name}"
        repo_type = payload.get("type") or "model"
        url = f"{self._base()}/{repo_id}" if repo_type == "model" else f"{self._base()}/{repo_type}s/{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            raise HubError(409, f"You already created this {repo_type} repo", body={"error": f"You already created this {repo_type} repo", "url": url})
        private = payload.get("private") or payload.get("visibility") == "private"
        self.hub._create_repo(repo_id, repo_type, private=bool(private))
        self._send_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        self.hub.validated.append(content)
        errors = validate_card_metadata(content)
        if errors:
            raise HubError(400, "Invalid metadata", body={"errors": [{"message": e} for e in errors], "warnings": []})
        self._send_json(200, {"errors": [], "warnings": []})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.commits[self.hub._resolve_rev(repo, revision)]
        siblings = [
            {"rfilename": path, **({"lfs": {"sha256": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}} if f["lfs"] else {})}
            for path, f in sorted(commit.files.items())
        ]
        self._send_json(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "createdAt": "2024-01-01T00:00:00.000Z",
                "lastModified": "2024-01-01T00:00:00.000Z",
            },
        )

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str, query: dict[str, str]) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.commits[self.hub._resolve_rev(repo, revision)]
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = prefix.strip("/")
        entries: list[dict] = []
        folders: set[str] = set()
        for path, f in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            if "/" in rel:
                parts = rel.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
                if not recursive:
                    continue
            entry = {"type": "file", "oid": f["git_oid"], "size": f["size"], "path": path}
            if f["lfs"]:
                entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(folders)]
        self._send_json(200, entries)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.refs.items() if not n.startswith("refs/")]
        prs = [{"name": n, "ref": n, "targetCommit": o} for n, o in repo.refs.items() if n.startswith("refs/pr/")]
        self._send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _branch(self, repo_type: str, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if branch in repo.refs:
            raise HubError(409, "Reference already exists")
        start = payload.get("startingPoint") or "main"
        repo.refs[branch] = self.hub._resolve_rev(repo, start)
        self._send_json(200, {})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict, query: dict[str, str]) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        head = self.hub._resolve_rev(repo, revision)
        files = repo.commits[head].files
        answer = []
        for item in payload.get("files", []):
            lfs = self.hub._is_lfs(int(item["size"]))
            existing = files.get(item["path"])
            oid = None
            if existing is not None:
                # the client compares this with sha256 (LFS) or the git blob id (regular) of its local file
                oid = existing["sha256"] if lfs else existing["blob_oid"]
            answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": answer, "commitOid": head})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict[str, str]) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        head = self.hub._resolve_rev(repo, revision)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        if not header.get("summary"):
            raise HubError(400, "commit summary is required")
        if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        added: dict[str, dict] = {}
        deleted: list[str] = []
        current = repo.commits[head].files
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                added[value["path"]] = self.hub._store(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                sha = value["oid"]
                if sha not in self.hub.lfs_objects:
                    raise HubError(422, f"LFS object {sha} for {value['path']} was never uploaded")
                added[value["path"]] = self.hub._store(self.hub.blobs[sha], lfs=True)
            elif key == "deletedFile":
                if value["path"] not in current:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                deleted += [p for p in current if p.startswith(prefix)]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        ref = revision if revision in repo.refs else None
        pr_url = None
        if query.get("create_pr") in ("1", "true", "True"):
            repo.n_prs += 1
            ref = f"refs/pr/{repo.n_prs}"
            repo.refs[ref] = head
            pr_url = f"{self._base()}/{repo_id}/discussions/{repo.n_prs}"
        elif ref is None:
            raise HubError(400, f"cannot commit to {revision!r}: not a branch")
        message = header["summary"] + ("\n\n" + header["description"] if header.get("description") else "")
        oid = self.hub._commit(repo, ref, added, tuple(deleted), message)
        self._send_json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self._base()}/{repo_id}/commit/{oid}", "hookOutput": "", "pullRequestUrl": pr_url})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self.hub._resolve_rev(repo, revision)
        if repo.gated and self._user() not in repo.granted:
            raise HubError(403, f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it.", "GatedRepo")
        entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
        data = self.hub.blobs[entry["sha256"]]
        etag = entry["sha256"] if entry["lfs"] else entry["blob_oid"]
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        status, start = 200, 0
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes=") and range_header[6:].split("-")[0].isdigit():
            start = int(range_header[6:].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        headers["Content-Length"] = str(len(payload))
        self._send(status, payload, headers, content_type="application/octet-stream")

    # ------------------------------------------------------------------ git-LFS

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        payload = self._json_body(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            sha, size = obj["oid"], int(obj["size"])
            if sha in self.hub.lfs_objects:
                objects.append({"oid": sha, "size": size})  # already stored: no actions
                continue
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            objects.append(
                {
                    "oid": sha,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self._base()}/__lfs_upload/{sha}"},
                        "verify": {"href": f"{self._base()}/{prefix}{quote(repo_id)}.git/info/lfs/objects/verify"},
                    },
                }
            )
        body_out = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body_out, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, sha: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != sha:
            raise HubError(400, "uploaded content does not match its sha256")
        self.hub.blobs[sha] = body
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        payload = self._json_body(body)
        sha, size = payload.get("oid"), payload.get("size")
        data = self.hub.blobs.get(sha)
        if data is None or len(data) != size:
            raise HubError(404, f"LFS object {sha} not found or wrong size")
        self.hub.lfs_objects.add(sha)
        self._send_json(200, {"message": "verified"})


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def silent_server_url() -> Iterator[str]:
    """An http URL on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Point huggingface_hub (env and import-time constants) at `endpoint` with a private HF_HOME and no token."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    for name in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_DISABLE_XET",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)
    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(hf_home / "xet"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    if hasattr(constants, "AGENT_HARNESSES_PATH"):
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(hf_home / "agent_harnesses.json"))
    # the client fetches an agent registry from the real Hub once per process: answer it locally
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})


def enable_lfs(hub: LocalHub, monkeypatch: pytest.MonkeyPatch, threshold: int = 1024) -> None:
    """Make files of `threshold` bytes or more go through git-LFS (client Xet disabled, as on a plain LFS server)."""
    from huggingface_hub import constants

    hub.lfs_threshold = threshold
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running LocalHub with the client pointed at it and a fresh HF_HOME under tmp_path."""
    hub = LocalHub().start()
    point_client_at(monkeypatch, hub.url, tmp_path / "hf_home")
    try:
        yield hub
    finally:
        hub.stop()
