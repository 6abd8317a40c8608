"""A small in-memory server speaking the Hugging Face Hub HTTP protocol, on 127.0.0.1.

It implements what huggingface_hub's ``create_repo``, ``upload_folder`` (validate-yaml, preupload,
NDJSON commit with base64 "regular" files), ``create_tag``, ``repo_info``/``dataset_info``
(``/api/datasets/{id}/revision/{rev}``), ``list_repo_tree``, ``list_repo_refs`` and file downloads
(``/datasets/{id}/resolve/{rev}/{path}``, and a model repo's ``/{id}/resolve/{rev}/{path}``: HEAD,
GET and ``Range``) need, so tests run the real client.
The server answers every upload with ``uploadMode: regular``, which keeps the client off the LFS and
Xet transfer paths. Private repos, tokens and the Hub's ``X-Error-Code`` headers are honoured.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's ``oid``/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev)
        if sha is None and re.fullmatch(r"[0-9a-f]{40}", rev):
            sha = rev
        return self.commits.get(sha) if sha else None


class HubState:
    """Repos and accepted tokens; every HTTP request is recorded in ``requests``."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user name
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.down = False

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> str:
        h = hashlib.sha1((parent or "").encode() + message.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_oid(files[path]).encode())
        sha = h.hexdigest()
        repo.commits[sha] = Commit(sha, files, message)
        return sha


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


_ANSWERED = -1  # a _Reply status meaning "the handler already sent the response"


def _error(status: int, code: str | None, message: str) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    # ------------------------------------------------------------------ dispatch
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
        state.requests.append((method, url.path, headers))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            if state.down:
                raise _Reply(503, {"error": "down for maintenance"})
            segs = [unquote(s) for s in url.path.split("/")[1:]]
            self._route(method, segs, parse_qs(url.query), body)
        except _Reply as r:
            if r.status != _ANSWERED:
                self._send(r.status, r.body, r.headers, head=method == "HEAD")

    def _route(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if method == "POST" and segs[:3] == ["api", "repos", "create"]:
            self._create_repo(json.loads(body))
        if method == "POST" and segs[:2] == ["api", "validate-yaml"]:
            self._validate_yaml(json.loads(body))
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("datasets", "models", "spaces"):
            repo_type = segs[1][:-1]
            repo_id = "/".join(segs[2:4])
            rest = segs[4:]
            repo = self._repo(repo_type, repo_id, write=method == "POST")
            if method == "GET" and (not rest or rest[0] == "revision"):
                self._info(repo, rest[1] if len(rest) > 1 else "main")
            if method == "GET" and rest and rest[0] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                self._tree(repo, rest[1], "/".join(rest[2:]), recursive)
            if method == "GET" and rest == ["refs"]:
                raise _Reply(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                                for b, s in repo.branches.items()],
                                   "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s}
                                            for t, s in repo.tags.items()], "converts": []})
            if method == "POST" and rest and rest[0] == "preupload":
                self._preupload(repo, rest[1], json.loads(body))
            if method == "POST" and rest and rest[0] == "commit":
                self._commit(repo, rest[1], body)
            if method == "POST" and rest and rest[0] == "tag":
                self._tag(repo, rest[1], json.loads(body))
        if method in ("GET", "HEAD") and len(segs) >= 6 and segs[0] == "datasets" and segs[3] == "resolve":
            repo = self._repo("dataset", "/".join(segs[1:3]), write=False)
            self._resolve(repo, segs[4], "/".join(segs[5:]), head=method == "HEAD")
        if method in ("GET", "HEAD") and len(segs) >= 5 and segs[0] not in ("api", "datasets", "spaces") \
                and segs[2] == "resolve":  # a model repo's file
            repo = self._repo("model", "/".join(segs[0:2]), write=False)
            self._resolve(repo, segs[3], "/".join(segs[4:]), head=method == "HEAD")
        raise _error(404, None, f"no route for {method} /{'/'.join(segs)}")

    # ------------------------------------------------------------------ helpers
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        user = self.server.state.tokens.get(auth[len("Bearer "):])
        if user is None:
            raise _error(401, None, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_type: str, repo_id: str, *, write: bool) -> Repo:
        user = self._user()
        repo = self.server.state.repos.get((repo_type, repo_id))
        if write and user is None:
            raise _error(401, None, "You must be authenticated to write")
        if repo is None or (repo.private and user is None):
            raise _error(401 if user is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _send(self, status: int, body: Any, headers: dict[str, str], *, head: bool = False,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, payload: dict[str, Any]) -> None:
        user = self._user()
        if user is None:
            raise _error(401, None, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        state = self.server.state
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.server.base_url}/{prefix}{repo_id}"
        with state.lock:
            if (repo_type, repo_id) in state.repos:  # the Hub's 409 names the existing repo's url
                raise _Reply(409, {"error": "You already created this repo", "url": url},
                             {"X-Error-Message": "You already created this repo"})
            repo = Repo(repo_id, repo_type, private=payload.get("visibility") == "private"
                        or bool(payload.get("private")))
            sha = state.new_commit(repo, None, {".gitattributes": b"*.tar filter=lfs\n"}, "initial commit")
            repo.branches["main"] = sha
            state.repos[(repo_type, repo_id)] = repo
        raise _Reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content", "")
        errors = []
        if content.startswith("---\n"):
            end = content.find("\n---", 4)
            try:
                meta = yaml.safe_load(content[4:end]) if end > 0 else None
            except yaml.YAMLError as exc:
                meta, errors = None, [{"message": f"YAML does not parse: {exc}"}]
            if not errors and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
            elif not errors:
                if not isinstance(meta.get("license", ""), str):
                    errors.append({"message": '"license" must be a string'})
                for key in ("tags", "task_categories", "size_categories", "source_datasets"):
                    if key in meta and not isinstance(meta[key], list):
                        errors.append({"message": f'"{key}" must be an array'})
        if errors:
            raise _Reply(400, {"errors": errors, "warnings": []})
        raise _Reply(200, {"errors": [], "warnings": []})

    def _info(self, repo: Repo, rev: str) -> None:
        commit = self._commit_of(repo, rev)
        raise _Reply(200, {"id": repo.repo_id, "_id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                           "sha": commit.sha, "private": repo.private, "disabled": False, "gated": False,
                           "lastModified": "2025-01-01T00:00:00.000Z", "tags": [], "downloads": 0,
                           "likes": 0, "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _tree(self, repo: Repo, rev: str, prefix: str, recursive: bool) -> None:
        commit = self._commit_of(repo, rev)
        entries, folders = [], set()
        base = f"{prefix}/" if prefix else ""
        for path in sorted(commit.files):
            if not path.startswith(base):
                continue
            rel = path[len(base):]
            if "/" in rel and not recursive:
                folders.add(base + rel.split("/")[0])
                continue
            for i in range(1, rel.count("/") + 1):
                folders.add(base + "/".join(rel.split("/")[:i]))
            data = commit.files[path]
            entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path})
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        if not entries and prefix:
            raise _error(404, "EntryNotFound", f"{prefix} does not exist")
        raise _Reply(200, entries)

    def _preupload(self, repo: Repo, rev: str, payload: dict[str, Any]) -> None:
        commit = repo.resolve(rev)
        files = []
        for f in payload["files"]:
            old = commit.files.get(f["path"]) if commit else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(old) if old is not None else None})
        raise _Reply(200, {"files": files, "commitOid": commit.sha if commit else None})

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _error(400, None, "commit payload must start with a header line")
        header = lines[0]["value"]
        state = self.server.state
        with state.lock:
            parent = repo.branches.get(branch)
            if parent is None:
                raise _error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise _error(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[parent].files)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    if value.get("encoding") != "base64":
                        raise _error(400, None, "only base64 file content is supported")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif line["key"] == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:
                    raise _error(400, None, f"unsupported commit operation {line['key']!r} (LFS is off)")
            sha = state.new_commit(repo, parent, files, header.get("summary", ""))
            repo.branches[branch] = sha
        url = f"{self.server.base_url}/{repo.repo_type}s/{repo.repo_id}/commit/{sha}"
        raise _Reply(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _tag(self, repo: Repo, rev: str, payload: dict[str, Any]) -> None:
        commit = self._commit_of(repo, rev)
        tag = payload["tag"]
        with self.server.state.lock:
            if tag in repo.tags:
                raise _error(409, None, f"Tag {tag} already exists")
            repo.tags[tag] = commit.sha
        raise _Reply(200, {})

    def _resolve(self, repo: Repo, rev: str, path: str, *, head: bool) -> None:
        commit = self._commit_of(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise _error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, chunk = 200, data
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            stop = int(rng.group(2)) + 1 if rng.group(2) else len(data)
            if start >= len(data):
                raise _Reply(416, None, {"Content-Range": f"bytes */{len(data)}"})
            chunk, status = data[start:stop], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
        self._send(status, None, headers, head=head, raw=chunk)
        raise _Reply(_ANSWERED)


class HubServer(ThreadingHTTPServer):
    """The server; ``base_url`` is the endpoint to give huggingface_hub."""

    daemon_threads = True

    def __init__(self, tokens: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState(tokens)
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}"
        self._connections: set[socket.socket] = set()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self._connections.discard(request)
        super().shutdown_request(request)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut kept-alive connections: clients now see a dead network."""
        self.shutdown()
        self.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
