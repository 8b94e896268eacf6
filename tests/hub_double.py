"""An in-process stand-in for the Hugging Face Hub, served at huggingface_hub's HTTP transport.

It answers exactly the requests that ``lic-push`` and ``snapshot_download`` make with
huggingface_hub 2.4 (repo creation, branches, YAML validation, preupload, classic LFS batch upload,
NDJSON commits, repo info, tree listing, file HEAD/GET), keeps repositories as lists of commits in
memory, and logs every request.  ``fail_on`` injects an HTTP status or a transport exception into
matching requests; a request it has no route for gets a 404 (the only one seen is the client's
best-effort ``GET /api/agent-harnesses`` lookup, which tolerates that).  It opens no socket:
install it with :func:`installed`.  Written against huggingface_hub 2.4.0: the endpoint contract
can drift with other versions.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator
from urllib.parse import unquote

import httpx2
import huggingface_hub
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

ENDPOINT = "https://hub.test"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
LFS_THRESHOLD = 10 * 1024 * 1024
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # names stored as LFS pointers


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, list[Commit]]


@dataclass
class Fault:
    method: str
    pattern: str
    status: int | None = None
    exception: type[Exception] | None = None
    hits: int = 0


class FakeHub:
    """The Hub's state plus the request handler; ``tokens`` are the credentials it accepts."""

    def __init__(self, tokens: set[str]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.commit_log: list[Commit] = []  # every commit accepted by the commit endpoint, in order
        self._counter = 0
        self._routes: list[tuple[str, re.Pattern, Callable]] = [
            ("POST", re.compile(r"/api/repos/create"), self._create_repo),
            ("POST", re.compile(r"/api/validate-yaml"), self._validate_yaml),
            ("POST", re.compile(rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)"), self._create_branch),
            ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"), self._preupload),
            ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"), self._commit),
            ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch"), self._lfs_batch),
            ("PUT", re.compile(r"/lfs-storage/(?P<oid>[0-9a-f]{64})"), self._lfs_put),
            ("POST", re.compile(r"/lfs-verify"), self._lfs_verify),
            ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"), self._repo_info),
            ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/.*)?"), self._tree),
            ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), self._resolve),
            ("GET", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), self._resolve),
        ]

    # ---- what tests look at -------------------------------------------------------------------
    def fail_on(self, method: str, pattern: str, *, status: int | None = None,
                exception: type[Exception] | None = None) -> Fault:
        fault = Fault(method, pattern, status, exception)
        self.faults.append(fault)
        return fault

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return self.repos[repo_id].branches[branch]

    def pushed_commits(self) -> list[Commit]:
        """Every commit made through the commit endpoint (not the repos' initial commits)."""
        return list(self.commit_log)

    def calls(self, method: str, fragment: str) -> int:
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    # ---- plumbing -----------------------------------------------------------------------------
    def _new_oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.requests.append((request.method, path))
        for fault in self.faults:
            if fault.method == request.method and re.search(fault.pattern, path):
                fault.hits += 1
                if fault.exception is not None:
                    raise fault.exception("injected by the Hub double", request=request)
                return _error(fault.status, "injected by the Hub double")
        for method, pattern, route in self._routes:
            match = pattern.fullmatch(path)
            if method == request.method and match:
                storage = path.startswith(("/lfs-storage/", "/lfs-verify"))  # pre-signed, like S3
                denied = None if storage else self._check_auth(request, write=method not in ("GET", "HEAD"))
                if denied is not None:
                    return denied
                return route(request, **{k: v for k, v in match.groupdict().items() if v is not None})
        return _error(404, f"the double has no route for {request.method} {path}")

    def _check_auth(self, request: httpx2.Request, write: bool) -> httpx2.Response | None:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        if token is not None and token not in self.tokens:
            return _error(401, "Invalid credentials in Authorization header",
                          {"X-Error-Message": "Invalid credentials in Authorization header"})
        if token is None and write:
            return _error(401, "Authorization header is missing",
                          {"X-Error-Message": "Invalid credentials in Authorization header"})
        return None

    def _repo(self, repo: str) -> Repo | httpx2.Response:
        if repo not in self.repos:
            return _error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return self.repos[repo]

    def _head(self, repo: Repo, rev: str) -> Commit | httpx2.Response:
        if rev in repo.branches:
            return repo.branches[rev][-1]
        for history in repo.branches.values():
            for commit in history:
                if commit.oid == rev:
                    return commit
        return _error(404, "Invalid rev id", {"X-Error-Code": "RevisionNotFound"})

    # ---- routes -------------------------------------------------------------------------------
    def _create_repo(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        url = f"{ENDPOINT}/{repo_id}"
        if repo_id in self.repos:
            return _error(409, "You already created this model repo", {}, {"url": url})
        initial = Commit(self._new_oid(repo_id), "initial commit", {".gitattributes": GITATTRIBUTES})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.repos[repo_id] = Repo(repo_id, private, {"main": [initial]})
        return httpx2.Response(200, json={"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _create_branch(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        found = self._repo(repo)
        if isinstance(found, httpx2.Response):
            return found
        if rev in found.branches:
            return _error(409, "Branch already exists")
        found.branches[rev] = [found.branches["main"][-1]]
        return httpx2.Response(200, json={})

    def _preupload(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        found = self._repo(repo)
        if isinstance(found, httpx2.Response):
            return found
        files = []
        for item in json.loads(request.content)["files"]:
            lfs = item["path"].endswith(".safetensors") or item["size"] >= LFS_THRESHOLD
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return httpx2.Response(200, json={"files": files})

    def _lfs_batch(self, request: httpx2.Request, repo: str) -> httpx2.Response:
        body = json.loads(request.content)
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{ENDPOINT}/lfs-storage/{obj['oid']}"},
                                    "verify": {"href": f"{ENDPOINT}/lfs-verify"}}
            objects.append(entry)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

    def _lfs_put(self, request: httpx2.Request, oid: str) -> httpx2.Response:
        data = request.read()
        if hashlib.sha256(data).hexdigest() != oid:
            return _error(400, "the uploaded bytes do not match the announced sha256")
        self.lfs_objects[oid] = data
        return httpx2.Response(200)

    def _lfs_verify(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        stored = self.lfs_objects.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            return _error(404, "object not stored")
        return httpx2.Response(200, json={})

    def _commit(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        found = self._repo(repo)
        if isinstance(found, httpx2.Response):
            return found
        if rev not in found.branches:
            return _error(404, "Invalid rev id", {"X-Error-Code": "RevisionNotFound"})
        parent = found.branches[rev][-1]
        files, lfs, message = dict(parent.files), set(parent.lfs), ""
        for line in request.content.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return _error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            else:
                return _error(400, f"the double does not handle commit operation {key!r}")
        commit = Commit(self._new_oid(repo + rev), message, files, lfs)
        found.branches[rev].append(commit)
        self.commit_log.append(commit)
        return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo}/commit/{commit.oid}",
                                          "commitOid": commit.oid, "success": True})

    def _repo_info(self, request: httpx2.Request, repo: str, rev: str = "main") -> httpx2.Response:
        found = self._repo(repo)
        if isinstance(found, httpx2.Response):
            return found
        head = self._head(found, rev)
        if isinstance(head, httpx2.Response):
            return head
        return httpx2.Response(200, json={"id": repo, "sha": head.oid, "private": found.private,
                                          "siblings": [{"rfilename": name} for name in sorted(head.files)]})

    def _tree(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        found = self._repo(repo)
        if isinstance(found, httpx2.Response):
            return found
        head = self._head(found, rev)
        if isinstance(head, httpx2.Response):
            return head
        entries = []
        for name, data in sorted(head.files.items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
            if name in head.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return httpx2.Response(200, json=entries)

    def _resolve(self, request: httpx2.Request, repo: str, rev: str, path: str) -> httpx2.Response:
        found = self._repo(repo)
        if isinstance(found, httpx2.Response):
            return found
        head = self._head(found, rev)
        if isinstance(head, httpx2.Response):
            return head
        if path not in head.files:
            return _error(404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
        data = head.files[path]
        etag = hashlib.sha256(data).hexdigest() if path in head.lfs else git_blob_id(data)
        headers = {"X-Repo-Commit": head.oid, "ETag": f'"{etag}"', "Content-Length": str(len(data))}
        if path in head.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           extra: dict | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers or {}, json={"error": message, **(extra or {})})


@contextlib.contextmanager
def installed(hub: FakeHub) -> Iterator[FakeHub]:
    """Route every huggingface_hub request to ``hub`` for the duration of the block."""
    def factory() -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(hub.handle), follow_redirects=True,
                             event_hooks={"request": [hf_request_event_hook]})

    huggingface_hub.set_client_factory(factory)
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
