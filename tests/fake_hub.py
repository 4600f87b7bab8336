"""A tiny stand-in for the Hugging Face Hub API on loopback, for ``llmopt push`` tests.

It implements what ``create_repo``, ``create_branch`` and ``create_commit`` (huggingface_hub 0.36) call:
``POST /api/repos/create``, ``POST /api/validate-yaml`` (README.md metadata), ``POST
/api/models/{repo}/preupload/{rev}`` (every file answered ``regular``, so contents arrive base64 in the
commit), ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header line, then one line per file) and ``POST
/api/models/{repo}/branch/{name}``; anything else is 404. Requests without ``Authorization: Bearer
<token>`` get 401; ``fail={"commit": 500}`` answers that endpoint with that status. Binds 127.0.0.1 on a
free port; the request loop stops by itself after ``max_requests`` requests or ``deadline_s`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import yaml

_REPO_OP = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/?]+)$")


class FakeHub:
    def __init__(self, token: str = "hf_fake_token_0123456789", fail: dict | None = None, deadline_s: float = 120):
        self.token = token
        self.fail = dict(fail or {})
        self.deadline_s = deadline_s
        self.max_requests = 500
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": set}
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.validated: list[str] = []  # README.md contents sent to validate-yaml
        self._stop = threading.Event()

    # -- server lifecycle
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._reply(*hub._route("GET", self.path, self.headers, b""))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._reply(*hub._route("POST", self.path, self.headers, body))

            def _reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._server.timeout = 0.2
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        end = time.monotonic() + self.deadline_s
        while not self._stop.is_set() and time.monotonic() < end and len(self.requests) < self.max_requests:
            self._server.handle_request()
        self._server.server_close()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- API
    def _route(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        path = path.split("?", 1)[0]
        status, payload = self._answer(method, path, headers, body)
        self.requests.append((method, path, status))
        return status, payload

    def _answer(self, method, path, headers, body) -> tuple[int, dict]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        m = _REPO_OP.match(path)
        kind = m["op"] if m and method == "POST" else None
        if method == "POST" and path == "/api/repos/create":
            kind = "create"
        elif method == "POST" and path == "/api/validate-yaml":
            kind = "validate"
        if kind is None:
            return 404, {"error": f"not found: {method} {path}"}
        if kind in self.fail:
            return self.fail[kind], {"error": f"fake hub: {kind} answered {self.fail[kind]} on request"}
        req = json.loads(body) if kind != "commit" else None
        if kind == "create":
            repo = f"{req['organization'] or 'me'}/{req['name']}" if "/" not in req["name"] else req["name"]
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = {"private": bool(req.get("private")), "branches": {"main"}}
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if kind == "validate":
            self.validated.append(req["content"])
            text = req["content"]
            if text.startswith("---"):
                try:
                    yaml.safe_load(text.split("---", 2)[1])
                except yaml.YAMLError as e:
                    return 400, {"errors": [{"message": str(e).splitlines()[0]}], "warnings": []}
            return 200, {"errors": [], "warnings": []}
        repo, rev = m["repo"], m["rev"]
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if kind == "branch":
            self.repos[repo]["branches"].add(rev)
            return 200, {}
        if rev not in self.repos[repo]["branches"]:
            return 404, {"error": f"Invalid rev id: {rev}"}
        if kind == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in req["files"]]
            return 200, {"files": files}
        return self._commit(repo, rev, body)

    def _commit(self, repo: str, rev: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = lines[0]
        assert header["key"] == "header", header
        files = {}
        for item in lines[1:]:
            if item["key"] != "file" or item["value"].get("encoding") != "base64":
                return 422, {"error": f"fake hub supports only base64 regular files, got {item['key']}"}
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo, "revision": rev, "summary": header["value"]["summary"], "files": files})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
