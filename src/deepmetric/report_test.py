"""Tests of deepmetric.report: the page's content, and that a real browser renders it.

The browser test runs Chromium headless (Debian's `chromium` package; `make test`
installs it where it is missing). It is skipped where Chromium is absent, unless
the environment variable CI is set (`.ci/run` sets it), where it fails instead;
DEEPMETRIC_SKIP_BROWSER=1 skips it anyway.
"""

import base64
import html.parser
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from deepmetric import export, report
from deepmetric.datasets import load_digits
from deepmetric.index import exact_search


class _Page(html.parser.HTMLParser):
    """The images (src, alt, the classes around them) and element ids of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.ids, self.stack, self.text = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append((attrs["src"], attrs.get("alt"), [c for _, c in self.stack]))
        elif tag not in ("meta", "br"):
            self.stack.append((tag, attrs.get("class", "")))

    def handle_endtag(self, tag):
        if tag not in ("img", "meta", "br") and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _run(tmp_path, **kwargs):
    data = load_digits()
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(data.y))
    queries, references = rows[:30], rows[30:400]
    x = data.x.reshape(len(data.x), -1)
    distances, nn = exact_search(x[queries], x[references], 4)
    history = {"loss": [1.0, 0.6, 0.4], "val_map_at_r": [0.5, 0.6, 0.7]}
    curves = export.plot_history(tmp_path / "curves.png", history)
    same = rng.random(200) < 0.5
    pair_d = rng.normal(1.0, 0.3, 200) - 0.5 * same
    args = dict(
        title="digits <run>",
        metrics={
            "before": {"precision_at_1": 0.5, "map_at_r": 0.25},
            "after": {"precision_at_1": 0.9, "map_at_r": 0.75, "tar_at_far": {0.01: 0.5}},
        },
        figures={"training curves": curves, "missing map": tmp_path / "absent.png"},
        pairs={"after": (pair_d, same)},
        query_images=data.x[queries],
        query_labels=data.y[queries],
        neighbor_indices=nn,
        neighbor_labels=data.y[references][nn],
        neighbor_distances=distances,
        reference_images=data.x[references],
        class_names=[f"digit {c}" for c in range(10)],
    )
    args.update(kwargs)
    return report.write_report(tmp_path / "run", **args), args


def test_report_content(tmp_path):
    path, args = _run(tmp_path)
    assert path.name == "report.html" and (path.parent / "roc.png").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html", "roc.png"]
    text = path.read_text()
    page = _Page()
    page.feed(text)
    assert {"metrics", "verification", "figures", "gallery"} <= page.ids
    assert "digits &lt;run&gt;" in text and "<run>" not in text
    assert "tar_at_far@0.01" in text and "missing map" not in text
    assert not re.search(r"(src|href)=\"(?!data:)", text)  # self-contained
    for src, _, _ in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and min(image.size) > 0
    # The gallery: 30 queries, 4 neighbours each, marked by their labels, worst first.
    thumbs = [i for i in page.images if any("query" in c for c in i[2])]
    assert len(thumbs) == 30 * 5
    labels, nn_labels = args["query_labels"], args["neighbor_labels"]
    correct = nn_labels == labels[:, None]
    order = [int(q) for q in re.findall(r'data-query="(\d+)"', text)]
    assert order == report.gallery_order(correct).tolist()
    key = [(correct[q, 0], correct[q].sum()) for q in order]
    assert key == sorted(key)
    marks = [c[-1] for _, alt, c in thumbs if alt.startswith("neighbour")]
    expected = ["correct" if correct[q, r] else "wrong" for q in order for r in range(4)]
    assert marks == expected


def test_report_parts_are_optional_and_checked(tmp_path):
    path = report.write_report(tmp_path, metrics={"precision_at_1": 0.5})
    text = path.read_text()
    assert 'id="metrics"' in text and "gallery" not in text and "<img" not in text
    assert "<th>value</th></tr><tr><td>precision_at_1</td><td>0.5000</td>" in text
    text = report.write_report(tmp_path, metrics={"after": {"mrr": 1.0}, "epochs": 3}).read_text()
    assert "<th>after</th><th>value</th>" in text and "<td>epochs</td><td></td><td>3</td>" in text
    with pytest.raises(ValueError, match="together"):
        report.write_report(tmp_path, query_images=np.zeros((2, 8, 8)))
    _, args = _run(tmp_path)
    quick = dict(pairs=None, figures=None)
    with pytest.raises(ValueError, match="index `reference_images`"):
        _run(tmp_path, neighbor_indices=args["neighbor_indices"] + 1000, **quick)
    with pytest.raises(ValueError, match="one label and one row"):
        _run(tmp_path, query_labels=args["query_labels"][:3], **quick)
    with pytest.raises(ValueError, match="images of shape"):
        _run(tmp_path, query_images=np.zeros((30, 64)), **quick)
    report_path = tmp_path / "run" / "report.html"
    before = report_path.read_bytes()
    with pytest.raises(ValueError):
        _run(tmp_path, neighbor_distances=np.zeros((30, 2)), **quick)
    assert report_path.read_bytes() == before  # a failed write leaves the old report
    assert not [p for p in report_path.parent.iterdir() if p.name.startswith(".")]


def _chromium():
    if os.environ.get("DEEPMETRIC_SKIP_BROWSER"):
        pytest.skip("DEEPMETRIC_SKIP_BROWSER is set")
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing; `make browser` (run by `make test`) installs it")
    pytest.skip("Chromium is not installed (apt-get install chromium, or `make browser`)")


# Put first into the page's <head>: records errors and console.error calls, and
# after loading writes the state of every image and of the gallery into the DOM.
_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
const origError = console.error;
console.error = (...a) => { window.__errors.push(a.join(" ")); origError(...a); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    queries: document.querySelectorAll("#gallery .query").length,
    wrong: document.querySelectorAll("#gallery .wrong img").length,
    errors: window.__errors,
  });
  document.body.appendChild(probe);
});
</script>"""


def _render(browser, page, tmp_path, screenshot=None):
    probed = page.parent / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    common = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
        "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    run = subprocess.run(
        [*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=60
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, f"no probe in Chromium's DOM; stderr: {run.stderr[-2000:]}"
    state = json.loads(html.unescape(found.group(1)))
    # Every console message: the report has no script, and the probe logs nothing.
    state["console"] = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        subprocess.run(
            [*common, "--window-size=1200,1600", f"--screenshot={screenshot}", page.as_uri()],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
    return state


def test_report_renders_in_chromium(tmp_path):
    browser = _chromium()
    path, args = _run(tmp_path)
    state = _render(browser, path, tmp_path, screenshot=tmp_path / "shot.png")
    assert state["images"] == 30 * 5 + 2  # thumbnails, the ROC, the training curves
    assert state["loaded"] == state["images"]
    assert state["queries"] == 30
    correct = args["neighbor_labels"] == args["query_labels"][:, None]
    assert state["wrong"] == int((~correct).sum())
    assert state["errors"] == [] and state["console"] == []
    with Image.open(tmp_path / "shot.png") as shot:
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.std() > 10  # something is drawn, not a blank page
    if os.environ.get("DEEPMETRIC_KEEP_SCREENSHOT"):
        shutil.copy(tmp_path / "shot.png", os.environ["DEEPMETRIC_KEEP_SCREENSHOT"])


def test_the_browser_check_sees_a_broken_page(tmp_path):
    """The same check on a page with a broken image and a script error fails."""
    browser = _chromium()
    path = report.write_report(tmp_path, metrics={"precision_at_1": 0.5})
    broken = path.read_text().replace(
        "</body>",
        '<img src="data:image/png;base64,AAAA"><script>undefinedFunction()</script></body>',
    )
    path.write_text(broken)
    state = _render(browser, path, tmp_path)
    assert state["images"] == 1 and state["loaded"] == 0
    assert any("undefinedFunction" in e for e in state["errors"])
    assert any("undefinedFunction" in line for line in state["console"])
