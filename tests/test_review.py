"""``scanclust review``: the token and the paths it refuses, the API's edits, undo and errors,
a port in use, a killed server, and the page in a real headless Chromium."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from scanclust.cli import main
from scanclust.review import THUMBNAIL, close_review, open_review
from scanclust.rundir import RunDirError
from tests.conftest import XSS_NAME, chromium_driver
from tests.test_labels import copy_run

@contextlib.contextmanager
def serving(run: Path, port: int = 0) -> Iterator[Any]:
    server = open_review(run, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        close_review(server)


def fetch(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, bytes, Any]:
    """Status, body and headers; a POST when ``body`` (JSON) or ``raw`` is given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def test_every_request_needs_the_token_and_no_path_leads_out(review_run: Path,
                                                             tmp_path: Path) -> None:
    run = copy_run(review_run, tmp_path, folder=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT")
    (run / "skipped.txt").unlink()
    (run / "skipped.txt").symlink_to(secret)  # a run file that leads out of RUN
    photo = tmp_path / "photos" / "d1" / "1_02.png"
    photo.unlink()
    photo.symlink_to(secret)  # an image that became a link to another file
    with serving(run) as server:
        base = f"http://127.0.0.1:{server.server_port}"
        token = server.token
        assert len(token) == 32 and server.url == f"{base}/{token}/"
        for path in ("/", "/api/state", "/thumb/0", "/image/0", "/run/labels.json",
                     f"/{token[:-1]}/api/state", f"/{token}x/api/state", f"/?token={token}",
                     f"/api/state?token={token}", f"/x/{token}/api/state", f"/%2e%2e/{token}/",
                     f"/{token.upper()}/api/state", f"/{token}%2F/api/state"):
            status, body, _ = fetch(base + path)
            assert status == 403, path
            assert body == b"forbidden: open the URL scanclust review printed\n"
        assert fetch(f"{base}/api/edit", {"op": "undo"})[0] == 403
        for path in ("../../etc/passwd", "../config.yaml", "run/../config.yaml",
                     "run/%2e%2e/config.yaml", "run/..%2fconfig.yaml", "run/%2e%2e%2fconfig.yaml",
                     "run/%252e%252e%252fconfig.yaml", "run/%2Fetc%2Fpasswd", "run//etc/passwd",
                     "/etc/passwd", "run/config.yaml", "run/scan/summary.json", "run/skipped.txt",
                     "thumb/..%2f..%2fconfig.yaml", "thumb/0/../../config.yaml", "thumb/60",
                     "thumb/-1", "thumb/%31", "thumb/1e1", "thumb/%201", "image/999999999",
                     "thumb/d0%2f0_02.png", "static/../review.py", "static/review.py",
                     "api/../run/config.yaml", f"{tmp_path}/secret.txt"):
            status, body, _ = fetch(f"{server.url}{path}")
            assert status == 404, path
            assert b"SECRET" not in body and b"name:" not in body  # nor config.yaml
        assert fetch(f"{base}/{token}")[0] == 200  # redirected to /<token>/
        status, page, headers = fetch(server.url)
        assert status == 200 and b'<script src="static/review.js"' in page
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["Referrer-Policy"] == "no-referrer"
        status, report, headers = fetch(f"{server.url}run/report.html")
        assert status == 200 and report == (run / "report.html").read_bytes()
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        row = json.loads(fetch(f"{server.url}api/state")[1])["paths"].index("d1/1_02.png")
        status, body, _ = fetch(f"{server.url}thumb/{row}")  # now a link to a text file
        assert status == 404 and b"SECRET" not in body
        assert body.startswith(b"cannot read this image: not an image Pillow can identify")


def test_thumbnails_are_small_cached_and_lazy(review_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    run = copy_run(review_run, tmp_path, folder=True)
    big = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    big.save(tmp_path / "photos" / "d0" / "0_02.png")  # row 0: a 12-megapixel image
    with serving(run) as server:
        status, body, headers = fetch(f"{server.url}thumb/0")
        assert fetch(f"{server.url}thumb/0")[1] == body
        with Image.open(io.BytesIO(body)) as thumb:
            assert thumb.format == "JPEG" and thumb.size == (THUMBNAIL, THUMBNAIL)
        with Image.open(io.BytesIO(fetch(f"{server.url}image/0")[1])) as large:
            assert large.size == (1024, 768)
        cache = server.review.thumbnail.cache_info()
        assert (cache.hits, cache.misses, cache.maxsize) == (1, 1, 4096)
        assert headers["Cache-Control"] == "private, max-age=3600"
        page = fetch(server.url)[1].decode()
        js = fetch(f"{server.url}static/review.js")[1].decode()
        assert 'href="static/review.css"' in page and 'loading: "lazy"' in js


def test_edits_undo_and_errors_through_the_api(review_run: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    run = copy_run(review_run, tmp_path)
    with serving(run) as server:
        api = server.url + "api/"
        for body, message in (
                ({"op": "rename", "cluster": 99, "name": "x"}, "cluster 99 does not exist"),
                ({"op": "move", "rows": [999], "to": 0},
                 "image row 999 does not exist (rows 0..59)"),
                ({"op": "move", "rows": [0], "to": 7}, "cluster 7 does not exist"),
                ({"op": "exclude", "rows": []}, "images must be a non-empty list of paths"),
                ([1, 2], "an edit is a JSON object with an op")):
            status, answer, headers = fetch(api + "edit", body)
            assert (status, json.loads(answer)) == (400, {"error": message})
            assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert fetch(api + "edit", raw=b"{oops")[:2] == (400, b'{"error": "the request body is '
                                                          b'not JSON"}')
        assert fetch(api + "undo", raw=b"")[:2] == (400, b'{"error": "nothing to undo"}')
        assert not (run / "labels.json").exists()  # nothing refused was saved

        for body in ({"op": "rename", "cluster": 0, "name": "zeros"},
                     {"op": "exclude", "rows": [0, 1, 2]},
                     {"op": "move", "rows": [20, 21], "to": "new"},
                     {"op": "include", "rows": [1]}):
            status, answer, _ = fetch(api + "edit", body)
            assert status == 200
        state = json.loads(answer)
        assert state["excluded"] == [0, 2] and state["next"] == 4 and state["edits"] == 4
        assert [(c["cluster"], c["name"], c["size"]) for c in state["clusters"]] == \
            [(0, "zeros", 20), (1, "cluster_01", 18), (2, "cluster_02", 20), (3, "cluster_03", 2)]
        saved = json.loads((run / "labels.json").read_text())
        paths = state["paths"]
        assert saved["edits"][2] == {"op": "move", "to": 3, "images": [paths[20], paths[21]]}
        labels = Counter(r["label"] for r in csv.DictReader(open(run / "assignments.csv")))
        assert labels == {"zeros": 18, "": 2, "cluster_01": 18, "cluster_02": 20, "cluster_03": 2}

        state = json.loads(fetch(api + "undo", raw=b"")[1])  # include 1 undone
        state = json.loads(fetch(api + "undo", raw=b"")[1])  # the move undone
        assert state["excluded"] == [0, 1, 2] and state["next"] == 3 and state["edits"] == 2
        saved = json.loads((run / "labels.json").read_text())
        assert [e["op"] for e in saved["edits"]] == ["rename", "exclude"]
        assert list(saved["labels"].values()).count(None) == 3
        assert json.loads(fetch(api + "state")[1]) == state

        def full(path, data):  # the disk is full when labels.json is written
            raise RunDirError(f"cannot write {path}: No space left on device")

        saved = (run / "labels.json").read_bytes()
        monkeypatch.setattr("scanclust.review.write_json", full)
        status, answer, _ = fetch(api + "edit", {"op": "merge", "cluster": 1, "into": 0})
        assert (status, json.loads(answer)) == (500, {"error": f"cannot write {run / 'labels.json'}"
                                                               f": No space left on device"})
        assert json.loads(fetch(api + "state")[1]) == state  # the merge is not made
        assert (run / "labels.json").read_bytes() == saved


def test_port_in_use_and_a_second_server(review_run: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(review_run, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["review", str(run), "--port", str(port), "--no-browser"]) == 2
        assert capsys.readouterr().err == (f"scanclust: error: --port {port} is in use; choose "
                                           f"another, or leave --port out to take a free one\n")
    assert main(["review", str(run), "--port", "70000", "--no-browser"]) == 2
    assert "--port 70000 is not a port number" in capsys.readouterr().err
    with serving(run, port) as server:  # the refusals left the run's lock free
        assert server.server_port == port
        second = subprocess.run([sys.executable, "-m", "scanclust", "review", str(run),
                                 "--no-browser"], capture_output=True, text=True, env=_env())
        assert second.returncode == 2 and second.stderr == (
            f"scanclust: error: {run} is in use by process {os.getpid()}; wait for it to end "
            f"or stop it (a lock left by a killed process is taken over automatically)\n")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_a_killed_server_loses_no_edit(review_run: Path, tmp_path: Path) -> None:
    run = copy_run(review_run, tmp_path)
    server = subprocess.Popen([sys.executable, "-m", "scanclust", "review", str(run),
                               "--no-browser"], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        line = server.stdout.readline()
        assert line.startswith("review: http://127.0.0.1:")
        url = line.split()[1]
        assert fetch(url + "api/edit", {"op": "rename", "cluster": 2, "name": "sevens"})[0] == 200
        assert fetch(url + "api/edit", {"op": "merge", "cluster": 1, "into": 0})[0] == 200
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=20)
        server.stdout.close()
    saved = json.loads((run / "labels.json").read_text())
    assert saved["edits"] == [{"op": "rename", "cluster": 2, "name": "sevens"},
                              {"op": "merge", "cluster": 1, "into": 0}]
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    with serving(run) as again:  # the killed process's lock is free, its edits are there
        state = json.loads(fetch(again.url + "api/state")[1])
        assert state["edits"] == 2 and [c["name"] for c in state["clusters"]] == \
            ["cluster_00", "sevens"]
    server = subprocess.Popen([sys.executable, "-m", "scanclust", "review", str(run),
                               "--no-browser"], stdout=subprocess.PIPE, text=True, env=_env())
    assert server.stdout.readline().startswith("review: http://127.0.0.1:")
    server.send_signal(signal.SIGINT)  # Ctrl-C: a plain stop
    out, _ = server.communicate(timeout=20)
    assert server.returncode == 0 and out.endswith("review: stopped\n")


def test_a_browser_if_there_is_one(monkeypatch, capsys) -> None:
    import webbrowser

    from scanclust.review import _open_browser

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    _open_browser("http://127.0.0.1:1/t/")
    assert opened == ["http://127.0.0.1:1/t/"]
    assert capsys.readouterr().out == "review: no browser found; open the URL above\n"
    monkeypatch.delenv("DISPLAY")
    _open_browser("http://127.0.0.1:1/t/")
    assert len(opened) == (1 if sys.platform.startswith("linux") else 2)


def test_review_in_headless_chromium(review_run: Path, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run = copy_run(review_run, tmp_path)
    driver = chromium_driver(tmp_path / "profile", 1400)
    css = driver.find_element, driver.find_elements
    try:
        with serving(run) as server:
            driver.get(server.url)
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "section.cluster")) == 3)
            css[0](By.CSS_SELECTOR, "#cluster-0 input.name").send_keys("zeros", Keys.ENTER)
            wait.until(lambda d: "1 edit saved" in d.find_element(By.ID, "summary").text)
            Select(css[0](By.CSS_SELECTOR, "#cluster-1 select.merge")).select_by_value("0")
            css[0](By.CSS_SELECTOR, "#cluster-1 button.merge-button").click()
            wait.until(lambda d: not d.find_elements(By.ID, "cluster-1"))
            figure = css[0](By.CSS_SELECTOR, "#cluster-2 figure.t")
            row = figure.get_attribute("data-row")
            figure.click()
            assert css[0](By.ID, "selected").text == "1 selected"
            Select(css[0](By.ID, "target")).select_by_value("0")
            css[0](By.ID, "move").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                                 f"#cluster-0 figure[data-row='{row}']"))
            assert css[0](By.ID, "selected").text == "0 selected"
            # a refused edit: its message is shown, nothing changes
            css[0](By.CSS_SELECTOR, "#cluster-2 input.name").send_keys("ZEROS", Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "message").is_displayed())
            assert css[0](By.ID, "message").text == \
                "cluster 0 is already named zeros; merge the two clusters instead"
            assert css[0](By.CSS_SELECTOR, "#cluster-2 input.name").get_attribute("value") == ""

            driver.refresh()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "section.cluster")) == 2)
            sections = {s.get_attribute("id"): len(s.find_elements(By.CSS_SELECTOR, "figure.t"))
                        for s in css[1](By.CSS_SELECTOR, "section.cluster")}
            assert sections == {"cluster-0": 41, "cluster-2": 19}
            assert css[0](By.CSS_SELECTOR, "#cluster-0 input.name").get_attribute("value") == \
                "zeros"
            assert css[0](By.CSS_SELECTOR, "#cluster-2 input.name").get_attribute(
                "placeholder") == "cluster_02"
            assert css[1](By.CSS_SELECTOR, f"#cluster-0 figure[data-row='{row}']")
            assert not css[0](By.ID, "message").is_displayed()
            assert css[0](By.ID, "undo").text == "Undo: move 1 image to cluster 0"
            wait.until(lambda d: d.execute_script(
                "return document.querySelector('#cluster-0 img').naturalWidth") == THUMBNAIL)
            captions = [e.get_attribute("textContent") for e in css[1](By.TAG_NAME, "figcaption")]
            assert XSS_NAME in captions and css[1](By.CSS_SELECTOR, 'img[src="x"]') == []
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert  # noqa: B018 - an onerror=alert(1) would have opened one
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                      and "status of 400" not in e["message"]]  # the refused rename
            assert errors == []
            assert driver.save_screenshot(str(tmp_path / "review.png"))
        saved = json.loads((run / "labels.json").read_text())
        path = saved["edits"][2]["images"][0]
        assert saved["edits"] == [{"op": "rename", "cluster": 0, "name": "zeros"},
                                  {"op": "merge", "cluster": 1, "into": 0},
                                  {"op": "move", "to": 0, "images": [path]}]
        assert path.startswith("d7/") and saved["labels"][path] == "zeros"
    finally:
        driver.quit()


def test_thousands_of_images_in_pages(review_run: Path, tmp_path: Path) -> None:
    """3,000 images: each cluster shows 60 thumbnails, then 120 more per click."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = copy_run(review_run, tmp_path, folder=True)
    folder = tmp_path / "photos"
    source = folder / "d0" / "0_02.png"
    (folder / "many").mkdir()
    rows = [["path", "cluster", "confidence", "prototype"]]
    for i in range(3000):
        os.link(source, folder / "many" / f"{i:04d}.png")
        rows.append([f"many/{i:04d}.png", str(i % 3), f"{i / 3000:.6f}", "false"])
    with open(run / "assignments.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    driver = chromium_driver(tmp_path / "profile", 1400)
    try:
        with serving(run) as server:
            started = time.perf_counter()
            driver.get(server.url)
            count = "return document.querySelectorAll('#cluster-0 figure.t').length"
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(count) == 60)
            shown = time.perf_counter() - started
            assert len(driver.find_elements(By.CSS_SELECTOR, "figure.t")) == 180
            more = driver.find_element(By.CSS_SELECTOR, "#cluster-0 button.more")
            assert more.text == "Show 120 more (940 not shown)"
            more.click()
            assert driver.execute_script(count) == 180
            assert more.text == "Show 120 more (820 not shown)"
            first = driver.find_element(By.CSS_SELECTOR, "#cluster-0 figure.t")
            assert first.get_attribute("data-row") == "2997"  # most confident first
            assert shown < 15, shown
    finally:
        driver.quit()


def test_review_and_export_answer_without_torch(tmp_path: Path) -> None:
    from tests.test_startup import _probe

    assert _probe(["review", "--help"]) == "[] 0"
    assert _probe(["review", str(tmp_path / "missing"), "--no-browser"]) == "[] 2"
    assert _probe(["export", str(tmp_path / "missing"), str(tmp_path / "dest")]) == "[] 2"
