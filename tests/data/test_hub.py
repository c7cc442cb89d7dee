"""data.source=wikipedia's download, by the real `huggingface_hub` client against a local stand-in of
the Hub's HTTP API on 127.0.0.1 (nothing reaches the network). The client reads HF_ENDPOINT when it is
imported, so each download runs in a fresh process with HF_ENDPOINT pointing at the stand-in.

The stand-in answers what huggingface_hub's HfApi.dataset_info, HfApi.list_repo_tree and
hf_hub_download ask: GET /api/datasets/{repo}/revision/{rev} (the commit a revision names),
GET /api/datasets/{repo}/tree/{commit}/{folder} (files with size and LFS sha256), and HEAD/GET
/datasets/{repo}/resolve/{commit}/{file}, answered as the Hub answers an LFS file: a 302 to a CDN on
another origin carrying X-Repo-Commit, X-Linked-Etag and X-Linked-Size; the CDN serves the bytes and
Range requests."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from helpers import ROOT, subprocess_env

from data.synthetic import write_wikipedia_parquet
from data.wikipedia import DOWNLOAD_RECORD, REPO

SUBSET = "20231101.en"
pytestmark = pytest.mark.processes  # each download runs in a fresh process (see _fetch)


class Hub:
    """One dataset repo: commits (file name -> bytes), the branch main, and the request log. Faults:
    `cut[sha256]` = bytes the CDN sends of that blob before dropping the connection (once);
    `serve[sha256]` = other bytes the CDN sends for that blob than the Hub announced."""

    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.main = None
        self.log: list[tuple[str, str, str, str | None]] = []  # (server, method, path, Range header)
        self.cut: dict[str, int] = {}
        self.serve: dict[str, bytes] = {}
        self.api = self._start("hub")
        self.cdn = self._start("cdn")

    def _start(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub, Handler.role = hub, role
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown()
        return server

    def url(self, server: ThreadingHTTPServer) -> str:
        return f"http://127.0.0.1:{server.server_address[1]}"

    def commit(self, files: dict[str, bytes]) -> str:
        """A new commit holding `files`; main moves to it."""
        sha = hashlib.sha1(json.dumps([self.main, sorted((n, hashlib.sha256(b).hexdigest())
                                                          for n, b in files.items())]).encode()).hexdigest()
        self.commits[sha], self.main = dict(files), sha
        return sha

    def requests(self, server: str, method: str = "GET") -> list[tuple[str, str | None]]:
        return [(path, rng) for role, m, path, rng in self.log if role == server and m == method]

    def close(self):
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()


def _git_sha(blob: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub
    role: str

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.hub.log.append((self.role, method, path, self.headers.get("Range")))
        if self.role == "cdn":
            return self._blob(path.removeprefix("/blobs/"))
        for prefix, handler in ((f"/api/datasets/{REPO}/revision/", self._revision),
                                (f"/api/datasets/{REPO}/tree/", self._tree),
                                (f"/datasets/{REPO}/resolve/", self._resolve)):
            if path.startswith(prefix):
                return handler(method, unquote(path[len(prefix):]))
        self._send(404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "not found"}')

    def _send(self, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _commit(self, revision: str) -> str | None:
        return self.hub.main if revision == "main" else revision if revision in self.hub.commits else None

    def _revision(self, method: str, revision: str) -> None:
        commit = self._commit(revision)
        if commit is None:
            return self._send(404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}')
        body = json.dumps({"id": REPO, "sha": commit, "private": False, "siblings": []}).encode()
        self._send(200, {"Content-Type": "application/json"}, body)

    def _tree(self, method: str, rest: str) -> None:
        revision, _, folder = rest.partition("/")
        commit = self._commit(revision)
        if commit is None:
            return self._send(404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}')
        entries = [{"type": "file", "oid": _git_sha(blob), "size": len(blob), "path": name,
                    "lfs": {"oid": hashlib.sha256(blob).hexdigest(), "size": len(blob), "pointerSize": 134}}
                   for name, blob in sorted(self.hub.commits[commit].items()) if name.startswith(folder + "/")]
        self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode())

    def _resolve(self, method: str, rest: str) -> None:
        revision, _, name = rest.partition("/")
        commit = self._commit(revision)
        blob = self.hub.commits.get(commit, {}).get(name)
        if blob is None:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit or ""}, b"{}")
        sha256 = hashlib.sha256(blob).hexdigest()
        self._send(302, {"Location": f"{self.hub.url(self.hub.cdn)}/blobs/{sha256}", "X-Repo-Commit": commit,
                         "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(blob)),
                         "ETag": f'"{_git_sha(blob)}"'}, head=method == "HEAD")

    def _blob(self, sha256: str) -> None:
        blobs = {hashlib.sha256(b).hexdigest(): b for files in self.hub.commits.values() for b in files.values()}
        if sha256 not in blobs:
            return self._send(404, {}, b"")
        data = self.hub.serve.get(sha256, blobs[sha256])
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
        cut = self.hub.cut.pop(sha256, None)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if cut is None:
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[start:cut])  # then the connection drops, as a network failure would
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def hub():
    hub = Hub()
    yield hub
    hub.close()


def _parquet_files(folder: Path, subset: str, **kw) -> dict[str, bytes]:
    return {f"{subset}/{p.name}": p.read_bytes() for p in write_wikipedia_parquet(folder, **kw)}


def _fetch(hub: Hub, tmp_path: Path, local: Path, revision: str, max_documents: int | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """WikipediaSource(local, ...) in a fresh process whose huggingface_hub talks to the stand-in."""
    script = ("import json, sys\n"
              "from data.wikipedia import WikipediaSource\n"
              "path, revision, n = sys.argv[1:]\n"
              f"source = WikipediaSource(path, {SUBSET!r}, None if n == '-' else int(n), revision)\n"
              "print(json.dumps({'count': source.count, 'ids': [d.name for d in source.documents()]}))\n")
    env = dict(subprocess_env(), HF_ENDPOINT=hub.url(hub.api), HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", script, str(local), revision, "-" if max_documents is None
                           else str(max_documents)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _result(done: subprocess.CompletedProcess) -> dict:
    """What the process printed last: the source's article count and ids."""
    return json.loads(done.stdout.strip().splitlines()[-1])


def _local_files(local: Path) -> dict[str, bytes]:
    return {str(p.relative_to(local)): p.read_bytes() for p in sorted(local.rglob("*.parquet"))}


def test_the_download_is_pinned_to_the_revision_and_continues_at_the_recorded_commit(hub, tmp_path):
    pinned = hub.commit({**_parquet_files(tmp_path / "a", SUBSET, articles=90, files=3, mean_words=20),
                         **_parquet_files(tmp_path / "a_fr", "20231101.fr", articles=10, files=1, mean_words=20)})
    later = hub.commit(_parquet_files(tmp_path / "b", SUBSET, articles=60, files=3, mean_words=20, seed=1,
                                      first_id=1000))
    assert hub.main == later != pinned

    local = tmp_path / "local"
    first = _result(_fetch(hub, tmp_path, local, pinned, max_documents=40))  # 30 articles a file
    record = json.loads((local / DOWNLOAD_RECORD).read_text())
    ours = {n: b for n, b in hub.commits[pinned].items() if n.startswith(SUBSET + "/")}
    assert (record["revision"], record["commit"]) == (pinned, pinned)
    assert record["files"] == [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                               for n, b in sorted(ours.items())]
    assert _local_files(local) == dict(sorted(ours.items())[:2]) and first["count"] == 40
    resolved = hub.requests("hub", "HEAD")
    assert len(resolved) == 2 and all(p.startswith(f"/datasets/{REPO}/resolve/{pinned}/") for p, _ in resolved)

    hub.log.clear()
    whole = _result(_fetch(hub, tmp_path, local, pinned))  # the rest, from the record
    assert _local_files(local) == ours and whole["ids"] == [str(i) for i in range(1, 91)]
    assert [p for p, _ in hub.requests("hub", "HEAD")] == [f"/datasets/{REPO}/resolve/{pinned}/{n}"
                                                           for n in sorted(ours)[2:]]
    assert not hub.requests("hub", "GET")  # no listing: the record's files, at its commit

    other = _fetch(hub, tmp_path, local, "main", check=False)
    assert other.returncode != 0
    assert f"{local / DOWNLOAD_RECORD}: {local} holds data.subset={SUBSET} at data.revision={pinned}, not " \
           f"data.subset={SUBSET} at data.revision=main" in other.stderr

    # a branch is recorded as the commit it named then: main moving mid-download changes nothing
    on_main = tmp_path / "on_main"
    _fetch(hub, tmp_path, on_main, "main", max_documents=5)
    assert json.loads((on_main / DOWNLOAD_RECORD).read_text())["commit"] == later
    hub.commit(_parquet_files(tmp_path / "c", SUBSET, articles=30, files=3, mean_words=20, seed=2, first_id=5000))
    _fetch(hub, tmp_path, on_main, "main")
    assert _local_files(on_main) == hub.commits[later]


def _large_parquet(folder: Path, mib: int) -> bytes:
    """A parquet file of the dataset's schema, `mib` MiB long: one article of uncompressed random text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    text = letters[np.random.default_rng(0).integers(0, len(letters), mib << 20)].tobytes().decode()
    folder.mkdir(parents=True)
    table = pa.table({"id": ["0"], "url": ["u"], "title": ["Big"], "text": [text]})
    pq.write_table(table, folder / "big.parquet", compression="none")
    return (folder / "big.parquet").read_bytes()


def test_a_download_cut_halfway_resumes_with_a_range_request(hub, tmp_path):
    """The client hands on what it receives in blocks of DOWNLOAD_CHUNK_SIZE (10 MiB): a file of two
    blocks and a bit, cut after its first block, goes on from there with a Range request."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    blob = _large_parquet(tmp_path / "a", mib=(2 * DOWNLOAD_CHUNK_SIZE >> 20) + 1)
    small = next(iter(_parquet_files(tmp_path / "b", SUBSET, articles=20, files=1, mean_words=20).values()))
    commit = hub.commit({f"{SUBSET}/train-00000-of-00002.parquet": blob,
                         f"{SUBSET}/train-00001-of-00002.parquet": small})
    sha256, half = hashlib.sha256(blob).hexdigest(), len(blob) // 2
    hub.cut[sha256] = half
    local = tmp_path / "local"
    done = _fetch(hub, tmp_path, local, commit)
    assert _result(done)["count"] == 21 and _local_files(local) == hub.commits[commit]
    assert hub.requests("cdn")[:2] == [(f"/blobs/{sha256}", None),
                                       (f"/blobs/{sha256}", f"bytes={DOWNLOAD_CHUNK_SIZE}-")]
    assert "Trying to resume download" in done.stderr
    assert not list(local.rglob("*.incomplete"))


@pytest.mark.parametrize("fault", ["size", "hash"])
def test_a_file_that_differs_from_what_the_hub_announced_is_refused_and_not_kept(hub, tmp_path, fault):
    commit = hub.commit(_parquet_files(tmp_path / "a", SUBSET, articles=40, files=2, mean_words=20))
    name, blob = sorted(hub.commits[commit].items())[1]
    sha256 = hashlib.sha256(blob).hexdigest()
    hub.serve[sha256] = blob + b"more" if fault == "size" else blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]
    local = tmp_path / "local"
    failed = _fetch(hub, tmp_path, local, commit, check=False)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    if fault == "size":  # the client itself compares the bytes received with X-Linked-Size
        assert f"Consistency check failed: file should be of size {len(blob)} but has size {len(blob) + 4}" \
            in failed.stderr
    else:  # same size: only the sha256 the listing announced tells
        assert last.startswith(f"ValueError: {local / name}: sha256 {hashlib.sha256(hub.serve[sha256]).hexdigest()}, "
                               f"the Hub announced {sha256}")
    assert list(_local_files(local)) == [sorted(hub.commits[commit])[0]]  # the good file only
    assert not list(local.rglob("*.incomplete"))

    del hub.serve[sha256]  # the Hub serves the right bytes again: the next run completes the download
    assert _result(_fetch(hub, tmp_path, local, commit))["count"] == 40
    assert _local_files(local) == hub.commits[commit]
