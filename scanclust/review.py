"""``scanclust review RUN``: a local page to name, merge, move and exclude a folder run's clusters.

Every edit is saved at once to ``RUN/labels.json`` (``labels.py``), atomically, then the label
column of ``assignments.csv`` and the names in ``clusters.json`` are rewritten from it (a few
milliseconds for thousands of images), so a killed server loses nothing and every file agrees.

The server listens on 127.0.0.1 only and answers nothing without the random token that starts
every path (``http://127.0.0.1:PORT/<token>/``): 403. Under the token, fixed routes only:

    GET  /                 the page (review_static/review.html, .js, .css under static/)
    GET  /api/state        the images (path, confidence, model and current cluster), the
                           excluded rows, the clusters with names and sizes, the merges, the
                           number of edits and the last one
    POST /api/edit         one edit as JSON, images by their row in assignments.csv:
                           {"op": "rename", "cluster": 2, "name": "sevens"},
                           {"op": "merge", "cluster": 1, "into": 0},
                           {"op": "move", "rows": [4, 9], "to": 0 | "new"},
                           {"op": "exclude" | "include", "rows": [4]}; answers the new state,
                           or 400 {"error": "..."} for an edit naming what does not exist
    POST /api/undo         drops the last edit; the new state
    GET  /thumb/<row>      the centre square the model saw, 128 px JPEG (cached in memory)
    GET  /image/<row>      the whole image, at most 1024 px, JPEG
    GET  /run/<name>       report.html, assignments.csv, clusters.json, labels.json, skipped.txt

No file is served by a path taken from the request: an image is its row, a run file one of
five names, so ``../``, absolute or encoded paths match no route (404); images leave only as
JPEGs re-encoded by Pillow, and a run file that is a link out of RUN is not served. The run
directory's lock is held while the server runs, so no other scanclust process rewrites it.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import secrets
import sys
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from scanclust.data.images import (ImageReadError, decode_square, escape_name, open_image,
                                   unescape_name)
from scanclust.errors import UserError
from scanclust.labels import (FILE_NAME, LabelsError, load_labels, read_assignments,
                              write_outputs)
from scanclust.files import write_json
from scanclust.rundir import RunDir

THUMBNAIL, LARGE = 128, 1024  # pixels
THUMBNAIL_CACHE, LARGE_CACHE = 4096, 16  # images kept encoded: about 20 MB and 4 MB at most
MAX_BODY = 1 << 20
STATIC = {"": ("review.html", "text/html"), "static/review.js": ("review.js", "text/javascript"),
          "static/review.css": ("review.css", "text/css")}
RUN_FILES = {"report.html": "text/html", "assignments.csv": "text/csv",
             "clusters.json": "application/json", "labels.json": "application/json",
             "skipped.txt": "text/plain"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class ReviewError(UserError, RuntimeError):
    """The review server cannot start (port, address)."""


class Review:
    """What the request threads share; one lock orders the edits and the reads of the state."""

    def __init__(self, run: Path) -> None:
        self.assignments = read_assignments(run)
        self.labels = load_labels(self.assignments)
        self.lock = threading.Lock()
        self.thumbnail = functools.lru_cache(THUMBNAIL_CACHE)(self._thumbnail)
        self.large = functools.lru_cache(LARGE_CACHE)(self._large)

    def state(self) -> dict[str, Any]:
        a, labels = self.assignments, self.labels
        return {"run": escape_name(a.run), "folder": escape_name(a.folder), "stage": a.stage,
                "paths": a.paths, "confidence": a.confidence, "model": a.clusters,
                "cluster": labels.cluster, "excluded": sorted(labels.excluded),
                "clusters": labels.clusters(), "next": labels.next_id,
                "merged": {c: labels.resolve(c) for c in labels.merged},
                "edits": len(labels.edits), "last": labels.edits[-1] if labels.edits else None}

    def change(self, body: Any) -> dict[str, Any]:
        """Apply one API edit (None: undo the last), save it, and give the new state. A
        refused edit, or one labels.json could not take (disk full), changes nothing."""
        with self.lock:
            before = list(self.labels.edits)
            if body is None:
                if not before:
                    raise LabelsError("nothing to undo")
                self.labels = self.labels.replayed(before[:-1])
            else:
                self.labels.apply(self._stored(body))
            try:
                write_json(self.assignments.run / FILE_NAME, self.labels.to_json())
            except UserError:
                self.labels = self.labels.replayed(before)
                raise
            write_outputs(self.labels)  # derived from labels.json, which holds the edit now
            return self.state()

    def _stored(self, body: Any) -> dict[str, Any]:
        """The API names images by row and a new cluster ``"new"``; labels.json by path and id."""
        if not isinstance(body, dict):
            raise LabelsError("an edit is a JSON object with an op")
        edit = dict(body)
        if "rows" in edit:
            rows, count = edit.pop("rows"), len(self.assignments.paths)
            rows = rows if isinstance(rows, list) else [rows]
            bad = [r for r in rows if type(r) is not int or not 0 <= r < count]
            if bad:
                raise LabelsError(f"image row {bad[0]!r} does not exist (rows 0..{count - 1})")
            edit["images"] = [self.assignments.paths[r] for r in rows]
        if edit.get("to") == "new":
            edit["to"] = self.labels.next_id
        return edit

    def _path(self, row: int) -> Path:
        return self.assignments.folder / unescape_name(self.assignments.paths[row])

    def _thumbnail(self, row: int) -> bytes:
        return _jpeg(Image.fromarray(decode_square(self._path(row), THUMBNAIL)))

    def _large(self, row: int) -> bytes:
        image = open_image(self._path(row), LARGE)
        image.thumbnail((LARGE, LARGE))
        return _jpeg(image)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, review: Review, port: int) -> None:
        self.review, self.token = review, secrets.token_urlsafe(24)
        folder = resources.files("scanclust") / "review_static"
        self.static = {name: (folder / name).read_bytes() for name, _ in STATIC.values()}
        super().__init__(("127.0.0.1", port), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/{self.token}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a page closed mid-answer
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: ReviewServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request line holds the token."""

    def _answer(self, handler: Any) -> None:
        parts = urlsplit(self.path).path.split("/", 2)  # "", token, route
        token = parts[1] if len(parts) > 1 else ""
        if not secrets.compare_digest(token.encode(), self.server.token.encode()):
            return self._send(403, b"forbidden: open the URL scanclust review printed\n",
                              "text/plain")
        if len(parts) == 2:  # the page's relative links need the trailing slash
            self.send_response(301)
            self.send_header("Location", f"/{token}/")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        try:
            handler(parts[2])
        except LabelsError as err:
            self._json({"error": str(err)}, 400)
        except UserError as err:  # labels.json could not be written: disk full, read-only
            self._json({"error": str(err)}, 500)

    def _get(self, route: str) -> None:
        review = self.server.review
        image = re.fullmatch(r"(thumb|image)/(\d{1,9})", route)
        if route in STATIC:
            name, kind = STATIC[route]
            self._send(200, self.server.static[name], kind, PAGE_POLICY)
        elif route == "api/state":
            with review.lock:
                self._json(review.state())
        elif image and int(image[2]) < len(review.assignments.paths):
            try:
                data = (review.thumbnail if image[1] == "thumb" else review.large)(int(image[2]))
            except ImageReadError as err:
                return self._send(404, f"cannot read this image: {err}\n".encode(), "text/plain")
            self._send(200, data, "image/jpeg", cache="private, max-age=3600")
        elif route.startswith("run/") and route[4:] in RUN_FILES:
            root = review.assignments.run.resolve()
            path = root / route[4:]
            if not path.is_file() or path.resolve().parent != root:
                return self._send(404, b"not found\n", "text/plain")
            self._send(200, path.read_bytes(), RUN_FILES[route[4:]], REPORT_POLICY)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _post(self, route: str) -> None:
        if route not in ("api/edit", "api/undo"):
            return self._send(404, b"not found\n", "text/plain")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return self._json({"error": f"a request body has 0..{MAX_BODY} bytes"}, 413)
        body = self.rfile.read(length)
        if route == "api/undo":
            return self._json(self.server.review.change(None))
        try:
            edit = json.loads(body)
        except ValueError:
            raise LabelsError("the request body is not JSON") from None
        self._json(self.server.review.change(edit))

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data, allow_nan=False).encode(), "application/json")

    def _send(self, status: int, data: bytes, kind: str, policy: str | None = None,
              cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind + ("; charset=utf-8" if kind.startswith("text")
                                                 or kind.endswith("json") else ""))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if policy:
            self.send_header("Content-Security-Policy", policy)
        self.end_headers()
        self.wfile.write(data)


def open_review(run: str | Path, port: int = 0) -> ReviewServer:
    """Check the run and its labels.json, take the run's lock and listen; ``serve_forever``
    (then ``close_review``) is the caller's. The label columns are rewritten from labels.json
    first, in case a kill came between the two writes of an edit."""
    run = Path(run)
    if not 0 <= port <= 65535:
        raise ReviewError(f"--port {port} is not a port number (1..65535, or 0 for a free one)")
    read_assignments(run)  # a run that is not ready is refused before the lock is taken
    RunDir(run).lock()
    try:
        review = Review(run)
        if (run / FILE_NAME).exists():
            write_outputs(review.labels)
        try:
            return ReviewServer(review, port)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ReviewError(f"--port {port} is in use; choose another, or leave --port out "
                                  f"to take a free one") from None
            raise ReviewError(f"cannot listen on 127.0.0.1:{port}: {err.strerror}") from None
    except BaseException:
        RunDir(run).release()
        raise


def close_review(server: ReviewServer) -> None:
    server.server_close()
    RunDir(server.review.assignments.run).release()


def review_command(run: str, port: int | None = None, browser: bool = True) -> int:
    server = open_review(run, port or 0)
    try:
        print(f"review: {server.url}\nevery edit is saved at once to "
              f"{escape_name(Path(run) / FILE_NAME)}; Ctrl-C stops the server", flush=True)
        if browser:
            _open_browser(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        print("review: stopped", flush=True)
    finally:
        close_review(server)
    return 0


def _open_browser(url: str) -> None:
    """A browser if there is one. On Linux without a display, webbrowser would pick a text
    browser that takes over this terminal, so the URL alone is left."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        print("review: no display; open the URL above in a browser", flush=True)
        return
    try:
        opened = webbrowser.open(url)
    except (webbrowser.Error, OSError):
        opened = False
    if not opened:
        print("review: no browser found; open the URL above", flush=True)
