"""The HTML report (``sslbench report --format html``): structure, self-containment, escaping, cluster
statistics, and the page's behaviour in a real headless Chromium (sorting, console, rendering)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslbench.interfaces import ReportContext, Reporter
from sslbench.predictions import save_predictions
from sslbench.results import MetricSummary, Published, Results, RunProtocol, SummaryRow, environment

from conftest import run_cli

HOSTILE = "<img src=x onerror=alert(1)>"
SPEC_NAME = "table 1 <script>alert(1)</script> & co"

# ---------------------------------------------------------------------------------------------------
# A small DOM from Python's html.parser, strict about nesting


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, {k: v or "" for k, v in attrs}, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self, tag: str | None = None, cls: str | None = None):
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes):
                    yield child
                yield from child.iter(tag, cls)

    def find(self, tag: str | None = None, cls: str | None = None) -> Node:
        return next(self.iter(tag, cls))

    def by_id(self, ident: str) -> Node:
        return next(n for n in self.iter() if n.attrs.get("id") == ident)


class Tree(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", [], None)
        self.errors: list[str] = []
        self.start_tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.start_tags.append(tag)
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.start_tags.append(tag)
        self.current.children.append(Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if self.current.tag != tag:
            self.errors.append(f"</{tag}> closes <{self.current.tag}>")
            return
        self.current = self.current.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html: str) -> Tree:
    tree = Tree()
    tree.feed(html)
    tree.close()
    assert not tree.errors, tree.errors[:5]
    assert tree.current is tree.root, f"<{tree.current.tag}> left open"
    return tree


def table_labels(table: Node) -> list[str]:
    """Method labels of a results table, in the order shown."""
    return [group.find("tr", "measured").find("th").attrs["data-value"] for group in table.iter("tbody")]


# ---------------------------------------------------------------------------------------------------
# Results


def _protocol(dims: int = 2048, n_classes: int = 1000) -> RunProtocol:
    return RunProtocol(
        fit_split="train", eval_split="val", n_classes=n_classes, k=n_classes, overcluster=1.0,
        n_clusters=n_classes, pca_dims=dims, whiten=False, epochs=60, batch_size=2048, backend="torch",
    )  # fmt: skip


def _row(model, dataset, acc, ari, std, dims=2048, n_classes=1000, published=None) -> SummaryRow:
    values = {"acc": acc, "ari": ari, "ami": acc - 0.05, "nmi": acc + 0.05}
    return SummaryRow(
        model=model, dataset=dataset, protocol=_protocol(dims, n_classes), n_seeds=3, seeds=[0, 1, 2],
        metrics={m: MetricSummary(mean=v, std=std) for m, v in values.items()}, published=published,
    )  # fmt: skip


MOCO_PUBLISHED = Published(
    source="paper Table 1 <b>MoCo v2</b>",
    metrics={m: MetricSummary(mean=0.2309, std=0.0016) for m in ("acc", "ari", "ami", "nmi")},
)


@pytest.fixture(scope="module")
def results() -> Results:
    from sslbench.plugins import load_plugins

    rows = [
        _row("MoCo v2", "ImageNet", 0.2300, 0.0900, 0.002, published=MOCO_PUBLISHED),
        _row("InfoMin", "ImageNet", 0.3317, 0.1200, 0.0032),  # best ACC
        _row("SwAV", "ImageNet", 0.3290, 0.1500, 0.001),  # ACC within one std of InfoMin's
        _row(HOSTILE, "ImageNet", 0.1000, 0.2000, 0.005),  # best ARI
        _row("InfoMin", "ImageNet", 0.3000, 0.1100, 0.004, dims=256),  # a sweep over dims: Figure 2a
        _row("MoCo v2", "CIFAR-10", 0.6000, 0.4000, 0.010, n_classes=10),
        _row("SwAV", "CIFAR-10", 0.7000, 0.5000, 0.010, n_classes=10),
    ]
    return Results(
        sslbench_version="0.1.0",
        created="2024-05-01T12:00:00+00:00",
        spec={"name": SPEC_NAME, "models": [{"id": "x", "name": HOSTILE}], "protocol": {"seeds": 3}},
        environment=environment("cpu", load_plugins()),
        wall_s=4321.0,
        runs=[],
        summary=rows,
    )


@pytest.fixture(scope="module")
def html_reporter() -> Reporter:
    from sslbench.plugins import load_plugins

    return load_plugins().reporters.get("html").reporter


@pytest.fixture(scope="module")
def page(results, html_reporter) -> str:
    return html_reporter.render(results)


# ---------------------------------------------------------------------------------------------------
# Structure


def test_one_sortable_table_per_dataset_with_marks_and_published_rows(page, results):
    tree = parse(page)
    tables = list(tree.root.iter("table", "results"))
    assert [t.attrs["data-dataset"] for t in tables] == ["ImageNet", "CIFAR-10"]
    assert all("sortable" in t.classes for t in tables)
    imagenet = tables[0]
    headers = list(imagenet.find("thead").iter("th"))
    assert [h.attrs["data-key"] for h in headers] == ["method", "acc", "ari", "ami", "nmi"]
    assert [h.text() for h in headers] == ["Method", "ACC", "ARI", "AMI", "NMI"]
    assert all(h.find("button").attrs["type"] == "button" for h in headers)
    assert "ImageNet: fitted on train, scored on val (1000 classes)" in imagenet.find("caption").text()

    rows = {}
    for group in imagenet.iter("tbody"):
        measured = group.find("tr", "measured")
        cells = list(measured.iter("td"))
        rows[measured.find("th").text()] = (group, dict(zip(["acc", "ari", "ami", "nmi"], cells, strict=True)))
    assert len(rows) == 5
    infomin = rows["InfoMin (PCA 2048)"][1]
    assert "best" in infomin["acc"].classes and infomin["acc"].find("strong").text() == "33.17 ± 0.32"
    assert float(infomin["acc"].attrs["data-value"]) == pytest.approx(0.3317)
    swav = rows["SwAV (PCA 2048)"][1]
    assert "within-std" in swav["acc"].classes and swav["acc"].text() == "32.90 ± 0.10"
    assert "best" in rows[f"{HOSTILE} (PCA 2048)"][1]["ari"].classes and "best" not in infomin["ari"].classes
    moco_group, moco = rows["MoCo v2 (PCA 2048)"]
    assert not (moco["acc"].classes & {"best", "within-std"})
    bests = [c for _, cells in rows.values() for c in cells.values() if "best" in c.classes]
    assert len(bests) == 4  # one per column
    assert all(list(c.iter("strong")) == [] for _, cells in rows.values() for c in cells.values() if c not in bests)

    published = list(moco_group.iter("tr", "published"))
    assert len(published) == 1  # under its row, in the same group
    assert "paper Table 1 <b>MoCo v2</b>" in published[0].find("th").text()  # the source, as text
    assert next(td.text() for td in published[0].iter("td")) == "23.09 ± 0.16 (-0.09, within std)"
    assert sum(1 for t in tables for _ in t.iter("tr", "published")) == 1
    assert list(tables[1].iter("tr", "published")) == []


def test_figures_are_well_formed_inline_svg_with_unique_ids(page):
    tree = parse(page)
    figures = list(tree.root.by_id("figures").iter("figure"))
    assert [f.attrs["id"] for f in figures] == ["fig1_ari_vs_acc", "fig2_dims"]
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(svgs) == len(figures) == len(list(tree.root.iter("svg")))
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert re.fullmatch(r"[\d.]+pt", root.attrib["width"]) and re.fullmatch(r"[\d.]+pt", root.attrib["height"])
        assert root.attrib["aria-label"].startswith("Figure ")
        # every reference points at an element of the same figure
        ids = {e.attrib["id"] for e in root.iter() if "id" in e.attrib}
        refs = [v[1:] for e in root.iter() for k, v in e.attrib.items() if k == "href"]
        refs += re.findall(r"url\(#([^)]+)\)", svg)
        assert refs and set(refs) <= ids
    ids = [n.attrs["id"] for n in tree.root.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), "duplicate ids on the page"
    assert "fig1_acc_vs_linear: 0 model(s) with a linear top-1" in tree.root.find("ul", "skipped-figures").text()


def test_page_is_self_contained(page):
    tree = parse(page)
    outside = re.sub(r'\sxmlns(?::\w+)?="http://www\.w3\.org/[^"]*"', "", page)
    assert not re.search(r"https?://", outside), re.findall(r".{40}https?://.{40}", outside)[:3]
    assert "link" not in tree.start_tags and "iframe" not in tree.start_tags and "object" not in tree.start_tags
    scripts = list(tree.root.iter("script"))
    assert len(scripts) == 1 and "src" not in scripts[0].attrs
    assert all(u.startswith("#") for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", page))  # in-page references only
    assert "@import" not in page
    for node in tree.root.iter():
        assert "src" not in node.attrs and "srcset" not in node.attrs and "action" not in node.attrs, node.tag
        assert node.attrs.get("href", "#").startswith("#"), node.attrs["href"]
    csp = next(m for m in tree.root.iter("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp.attrs["content"]


def test_user_text_is_escaped(page, results):
    tree = parse(page)
    assert "img" not in tree.start_tags  # the hostile model name is text, not an element
    assert sum(1 for tag in tree.start_tags if tag == "script") == 1
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert tree.root.find("title").text() == f"{SPEC_NAME} — sslbench results"
    assert tree.root.find("h1").text() == f"{SPEC_NAME} — sslbench results"
    labels = table_labels(tree.root.find("table", "results"))
    assert f"{HOSTILE} (PCA 2048)" in labels
    assert f"name: {HOSTILE}" in tree.root.find("pre", "spec").text()


def test_environment_spec_version_and_times(page, results):
    tree = parse(page)
    meta = tree.root.find("p", "meta").text()
    assert "sslbench 0.1.0" in meta and "created 2024-05-01T12:00:00+00:00" in meta
    assert "wall time 1 h 12 min" in meta and "0 runs" in meta and "2 datasets" in meta
    env = {row.find("th").text(): row.find("td").text() for row in tree.root.find("table", "environment").iter("tr")}
    assert env["python"] == results.environment.python and env["device"] == "cpu"
    assert env["numpy"] == results.environment.numpy
    plugins = [row.find("td").text() for row in tree.root.find("table", "plugins").find("tbody").iter("tr")]
    assert "reporters" in plugins
    spec = tree.root.find("pre", "spec").text()
    assert f"name: {SPEC_NAME}" in spec and "seeds: 3" in spec
    assert "Rendered without a run directory" in tree.root.by_id("clusters").text()


def test_without_matplotlib_the_page_says_so(results, html_reporter, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    html = html_reporter.render(results)
    tree = parse(html)
    assert "<svg" not in html
    assert "The figures need matplotlib, which is not installed" in tree.root.by_id("figures").text()
    assert len(list(tree.root.iter("table", "results"))) == 2


def test_context_default_and_from_arguments(results, html_reporter, plugins, tmp_path):
    md = plugins.reporters.get("md").reporter
    assert md.render_with_context(results, ReportContext((tmp_path,), plugins)) == md.render(results)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    (tmp_path / "other.json").write_text("{}")
    context = ReportContext.from_arguments(
        [tmp_path / "run", tmp_path / "run" / "results.json", tmp_path / "other.json"], plugins
    )
    assert context.run_dirs == (tmp_path / "run",) and context.plugins is plugins
    html = html_reporter.render_with_context(results, context)
    assert "No saved predictions in" in parse(html).root.by_id("clusters").text()


def test_cluster_statistics_of_saved_predictions(results, html_reporter, tmp_path):
    # cluster 0: 20 samples of class 3; cluster 1: 12 of class 1 and 8 of class 2; cluster 2: 5 samples
    pred = np.array([0] * 20 + [1] * 20 + [2] * 5)
    labels = np.array([3] * 20 + [1] * 12 + [2] * 8 + [0] * 5)
    save_predictions(tmp_path / "predictions" / "SwAV__ImageNet__seed0.npz", pred, labels, pred, labels)
    (tmp_path / "predictions" / "broken__ImageNet__seed1.npz").write_bytes(b"not a zip file")
    html = html_reporter.render_with_context(results, ReportContext.from_arguments([tmp_path]))
    section = parse(html).root.by_id("clusters")
    files = {s.attrs["data-file"]: s for s in section.iter("section") if "data-file" in s.attrs}
    assert sorted(files) == ["SwAV__ImageNet__seed0.npz"]
    body = files["SwAV__ImageNet__seed0.npz"].find("tbody")
    rows = [[c.text() for c in tr.children if not isinstance(c, str)] for tr in body.iter("tr")]
    assert rows == [
        ["purest"], ["0", "20", "3", "100.0 %"], ["1", "20", "1", "60.0 %"],
        ["least pure"], ["1", "20", "1", "60.0 %"], ["0", "20", "3", "100.0 %"],
    ]  # fmt: skip
    assert "3 non-empty clusters, 45 samples" in files["SwAV__ImageNet__seed0.npz"].text()
    assert "broken__ImageNet__seed1.npz" in section.text() and "unreadable" in section.text()


# ---------------------------------------------------------------------------------------------------
# A real browser: Debian's Chromium, headless, no driver


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("SSLBENCH_REQUIRE_CHROMIUM") == "1":
            pytest.fail("SSLBENCH_REQUIRE_CHROMIUM=1 but chromium is not on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI sets SSLBENCH_REQUIRE_CHROMIUM=1")
    return path


def browse(chromium: str, url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Load ``url`` in a fresh headless Chromium that reaches nothing outside this machine."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *flags, url,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def console_messages(stderr: str) -> list[str]:
    """What the page's scripts wrote to the console or threw (Chromium logs both as CONSOLE lines)."""
    return re.findall(r':CONSOLE[^\]]*\] "(.*)", source: file://', stderr)


def dump_dom(chromium: str, path: Path, tmp_path: Path, fragment: str = "") -> tuple[Tree, list[str]]:
    proc = browse(chromium, path.as_uri() + fragment, tmp_path / "profile", "--dump-dom")
    return parse(proc.stdout), console_messages(proc.stderr)


def _order(results: Results, dataset: str, metric: str | None, descending: bool) -> list[str]:
    from sslbench.table import summary_tables

    table = next(t for t in summary_tables(results) if t.dataset == dataset)
    if metric is None:
        return sorted((row.label for row in table.rows), key=str.casefold, reverse=descending)
    return [r.label for r in sorted(table.rows, key=lambda r: r.cells[metric].mean, reverse=descending)]


def test_browser_detects_a_broken_page(chromium, page, results, tmp_path):
    """The console check can fail: a throwing script and a console.error are both caught."""
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace('"use strict";', '"use strict"; console.error("deliberate"); noSuchFn();', 1))
    tree, messages = dump_dom(chromium, broken, tmp_path, "#sort=acc")
    assert "deliberate" in messages
    assert any(m.startswith("Uncaught ReferenceError: noSuchFn") for m in messages), messages
    imagenet = tree.root.find("table", "results")
    assert imagenet.attrs.get("data-sorted") is None  # the script died: nothing sorted
    assert table_labels(imagenet) == [r.label for r in _unsorted(results, "ImageNet")]


def test_browser_sorts_from_the_address(chromium, page, results, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page)
    tree, messages = dump_dom(chromium, path, tmp_path)
    assert messages == []
    assert table_labels(tree.root.find("table", "results")) == [r.label for r in _unsorted(results, "ImageNet")]
    for fragment, metric, descending in (
        ("#sort=acc", "acc", True),
        ("#sort=acc:asc", "acc", False),
        ("#sort=ari:desc", "ari", True),
        ("#sort=method", None, False),
    ):
        tree, messages = dump_dom(chromium, path, tmp_path, fragment)
        assert messages == [], (fragment, messages)
        imagenet, cifar = tree.root.iter("table", "results")
        assert table_labels(imagenet) == _order(results, "ImageNet", metric, descending), fragment
        assert table_labels(cifar) == _order(results, "CIFAR-10", metric, descending), fragment
        key = metric or "method"
        assert imagenet.attrs["data-sorted"] == f"{key}:{'desc' if descending else 'asc'}"
        header = next(h for h in imagenet.find("thead").iter("th") if h.attrs["data-key"] == key)
        assert header.attrs["aria-sort"] == ("descending" if descending else "ascending")
        moco = next(g for g in imagenet.iter("tbody") if g.find("th").attrs["data-value"].startswith("MoCo"))
        assert len(list(moco.iter("tr", "published"))) == 1  # the published row moved with its row


def test_browser_opens_a_lower_is_better_column_best_first(chromium, plugins, tmp_path):
    from sslbench.results import MetricInfo

    means = {"A": 1.25, "B": 0.75, "C": 0.9, "D": 2.0}
    rows = [
        SummaryRow(
            model=model,
            dataset="ImageNet",
            protocol=_protocol(),
            n_seeds=1,
            seeds=[0],
            metrics={"dbi": MetricSummary(mean=mean, std=None)},
        )
        for model, mean in means.items()
    ]
    results = Results(
        sslbench_version="0",
        created="now",
        spec=None,
        environment=environment("cpu", plugins),
        wall_s=1.0,
        metrics={"dbi": MetricInfo(label="DB", unit="raw", better="lower")},
        runs=[],
        summary=rows,
    )
    path = tmp_path / "report.html"
    path.write_text(plugins.reporters.get("html").reporter.render(results))
    tree, messages = dump_dom(chromium, path, tmp_path, "#sort=dbi")
    assert messages == []
    table = tree.root.find("table", "results")
    assert table.attrs["data-sorted"] == "dbi:asc"  # best (lowest) first
    assert table_labels(table) == sorted(means, key=means.__getitem__)


def _unsorted(results: Results, dataset: str):
    from sslbench.table import summary_tables

    return next(t for t in summary_tables(results) if t.dataset == dataset).rows


PROBE = """<script>
(function () {
  var table = document.getElementById("table-0");
  var th = table.querySelector('th[data-key="ari"]');
  function labels() {
    return Array.prototype.map.call(table.tBodies, function (b) { return b.rows[0].cells[0].getAttribute("data-value"); });
  }
  var out = {initial: labels()};
  th.querySelector("button").click();
  out.first = labels(); out.firstHash = location.hash; out.firstSort = th.getAttribute("aria-sort");
  th.querySelector("button").click();
  out.second = labels(); out.secondHash = location.hash; out.secondSort = th.getAttribute("aria-sort");
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def test_browser_header_click_sorts_and_toggles(chromium, page, results, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page.replace("</body>", PROBE + "</body>"))
    tree, messages = dump_dom(chromium, path, tmp_path)
    assert messages == []
    probe = json.loads(tree.root.by_id("probe").text())
    assert probe["initial"] == [r.label for r in _unsorted(results, "ImageNet")]
    assert probe["first"] == _order(results, "ImageNet", "ari", True)
    assert probe["second"] == _order(results, "ImageNet", "ari", False)
    assert (probe["firstSort"], probe["secondSort"]) == ("descending", "ascending")
    assert (probe["firstHash"], probe["secondHash"]) == ("#sort=ari:desc", "#sort=ari:asc")


def test_browser_screenshot_shows_the_page(chromium, page, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page)
    shot = tmp_path / "shot.png"
    proc = browse(
        chromium, path.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1600",
        "--hide-scrollbars",
    )  # fmt: skip
    assert console_messages(proc.stderr) == []
    assert shot.stat().st_size > 0
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        grey = np.asarray(image.convert("L"))
    assert grey.min() < 64 and grey.max() > 192  # dark text on a light page, not a flat colour
    assert 0.01 < (grey < 200).mean() < 0.5  # ink covers some of the page, not none or all of it


# ---------------------------------------------------------------------------------------------------
# The command line, on a tiny real run with saved predictions


TINY_SPEC = """\
name: tiny <run> & co
models:
  - id: raw
    name: raw pixels
  - id: random_cnn
    options: {image_size: 16, width: 4}
datasets:
  - id: digits
protocol: {k: null, overcluster: [1.0, 1.5], pca_dims: [8, 16], epochs: 2, seeds: 2}
extraction: {batch_size: 64, workers: 0}
device: cpu
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.yaml").write_text(TINY_SPEC)
    proc = run_cli("run", "tiny.yaml", "--out", "run", "--save-predictions", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "run"


def test_cli_html_report_of_a_run_directory(tiny_run, tmp_path):
    proc = run_cli("report", str(tiny_run), "--format", "html", "-o", "out.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "out.html").read_text(encoding="utf-8")
    tree = parse(html)
    assert tree.root.find("title").text() == "tiny <run> & co — sslbench results"
    tables = list(tree.root.iter("table", "results"))
    assert [t.attrs["data-dataset"] for t in tables] == ["digits"]
    assert len(list(tables[0].iter("tbody"))) == 8  # 2 models × 2 overclusterings × 2 PCA dims
    assert [f.attrs["id"] for f in tree.root.by_id("figures").iter("figure")] == [
        "fig1_ari_vs_acc", "fig2_dims", "fig2_clusters"
    ]  # fmt: skip
    for svg in re.findall(r"<svg\b.*?</svg>", html, flags=re.S):
        ET.fromstring(svg)
    saved = sorted(p.name for p in (tiny_run / "predictions").glob("*.npz"))
    assert len(saved) == 16
    shown = [s.attrs["data-file"] for s in tree.root.by_id("clusters").iter("section") if "data-file" in s.attrs]
    assert shown == saved
    first = next(s for s in tree.root.by_id("clusters").iter("section") if s.attrs.get("data-file") == saved[0])
    purity = [tr.children[-1].text() for tr in first.find("tbody").iter("tr") if len(tr.children) == 4]
    assert purity and all(re.fullmatch(r"\d+\.\d %", p) for p in purity)
    # the results file of the run directory, on stdout
    stdout = run_cli("report", str(tiny_run / "results.json"), "--format", "html", cwd=tmp_path)
    assert stdout.returncode == 0 and stdout.stdout == html


def test_cli_html_report_in_the_browser(chromium, tiny_run, tmp_path):
    proc = run_cli("report", str(tiny_run), "--format", "html", "-o", "out.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tree, messages = dump_dom(chromium, tmp_path / "out.html", tmp_path, "#sort=acc")
    assert messages == []
    means = [float(g.find("td").attrs["data-value"]) for g in tree.root.find("table", "results").iter("tbody")]
    assert means == sorted(means, reverse=True) and len(means) == 8
