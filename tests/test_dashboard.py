"""`evaluate --dashboard`: the data files hold what the statistics say, and the page works in a
real headless browser (Debian's chromium driven by Selenium) from disk and from a file server."""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import write_token_dataset
from helpers import run_harvest
from shared.reader import open_dump
from shared.sae import SAEConfig, SparseAutoencoder
from train.evaluation.cli import main as evaluate_main
from train.evaluation.dashboard import CHUNK
from train.evaluation.feature_stats import feature_stats
from train.evaluation.logit_table import logit_effects, unembedding

pytestmark = pytest.mark.usefixtures("one_thread_module")

HOOK = "blocks.0.hook_mlp_out"
D_SAE = 300  # more than one page of the index (100 rows) and more than one data file (256 features)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRE_BROWSER = os.environ.get("MATS_SAE_REQUIRE_BROWSER", "") not in ("", "0")


@pytest.fixture(scope="module")
def run(tiny_model, vocab_size, tmp_path_factory) -> Path:
    """A harvested dump of the tiny model and a random SAE saved as a run, with its dashboard."""
    base = tmp_path_factory.mktemp("dash")
    ds = write_token_dataset(base / "ds", n_docs=30, doc_len=60, vocab=vocab_size)
    dump = base / "dump"
    run_harvest("--model", str(tiny_model), "--dataset", str(ds), "--out", str(dump), "--hook", HOOK,
                "--context-size", "16", "--batch-size", "8", "--tokens", "1600", "--shard-rows", "500")
    torch.manual_seed(0)
    opened = open_dump(dump)
    x_rms = float(opened.activations(0, opened.n_rows).float().pow(2).mean().sqrt())
    sae = SparseAutoencoder(SAEConfig(opened.d_in, D_SAE))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / (x_rms * opened.d_in ** 0.5))  # pre-activations about N(0, 1)
        sae.b_enc.uniform_(-2.0, -0.5)  # each feature fires on 2% to 30% of rows
        sae.b_enc[:5] = -1e4  # dead features: listed, marked, and hidden by default
    folder = base / "run"
    sae.save(folder / "final", {"shards": str(dump), "model_name": str(tiny_model), "hook_name": HOOK})
    got = CliRunner().invoke(evaluate_main, [str(folder), "--no-metrics", "--dashboard", "--quiet"])
    assert got.exit_code == 0, got.output
    assert (folder / "dashboard" / "index.html").is_file()
    return folder


def js_payload(path: Path):
    """The JSON inside a data file (`DASH.x = {...};` or `DASH.addFeatures(n, {...});`)."""
    body = path.read_text(encoding="utf-8").split("\n", 1)[1].strip()
    match = re.fullmatch(r"DASH\.\w+ = (.*);", body) or re.fullmatch(r"DASH\.addFeatures\(\d+, (.*)\);", body)
    assert match, body[:80]
    return json.loads(match.group(1))


def test_data_files_hold_the_statistics_and_the_logit_table(run, tiny_model):
    data = run / "dashboard" / "data"
    sae = SparseAutoencoder.load_from_pretrained(run / "final")
    dump = open_dump(json.loads((run / "final" / "cfg.json").read_text())["shards"])
    stats = feature_stats(sae, dump)
    index = js_payload(data / "index.js")["rows"]
    assert [r[0] for r in index] == list(range(D_SAE))
    assert [r[1] is None for r in index] == (stats.fired == 0).tolist()
    records = {}
    for c in range(0, D_SAE, CHUNK):
        records.update({int(k): v for k, v in js_payload(data / f"features_{c // CHUNK:04d}.js").items()})
    assert sorted(records) == list(range(D_SAE))
    from shared.models import load_model

    logits = logit_effects(sae.W_dec.detach(), unembedding(load_model(str(tiny_model), "cpu")), k=10)
    vocab = {int(k): v for k, v in js_payload(data / "vocab.js").items()}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    for f in (5, 17, 123, D_SAE - 1):
        rec = records[f]
        assert rec["fired"] == int(stats.fired[f]) > 0
        assert [ex[1] for ex in rec["top"]] == [r for r in stats.top.rows[f].tolist() if r >= 0]
        assert [ex[0] for ex in rec["top"]] == pytest.approx(stats.top.acts[f, : len(rec["top"])].tolist(), rel=1e-3)
        assert sum(rec["hist"]["counts"]) == rec["fired"]
        assert [t for t, _ in rec["promoted"]] == logits["top_tokens"][f].tolist()
        assert [t for t, _ in rec["suppressed"]] == logits["bottom_tokens"][f].tolist()
        for ex in rec["top"]:
            assert all(vocab[t] == tok.decode([t]) for t in ex[2] if t >= 0)
    assert records[0]["fired"] == 0 and records[0]["top"] == []


def test_a_failed_rewrite_keeps_the_previous_dashboard(run, monkeypatch):
    import train.evaluation.dashboard as dashboard

    before = (run / "dashboard" / "data" / "index.js").read_bytes()
    real = dashboard._write_js

    def failing(path, *args, **kwargs):
        if path.name.startswith("features_"):
            raise OSError(28, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dashboard, "_write_js", failing)
    got = CliRunner().invoke(evaluate_main, [str(run), "--no-metrics", "--no-model", "--dashboard", "--quiet"])
    assert got.exit_code == 1 and "disk is full" in got.output and "Traceback" not in got.output
    assert (run / "dashboard" / "data" / "index.js").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".dashboard")] == []


# ----------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if REQUIRE_BROWSER:
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 20).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _no_js_errors(driver) -> None:
    assert driver.execute_script("return window.__errors") == []
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def _listed_features(driver) -> list[int]:
    """Every feature the index lists, page by page."""
    from selenium.webdriver.common.by import By

    seen: list[int] = []
    while True:
        seen += [int(tr.get_attribute("data-feature")) for tr in driver.find_elements(By.CSS_SELECTOR, "#index tbody tr")]
        page, pages = map(int, re.findall(r"\d+", driver.find_element(By.ID, "page").text))
        if page == pages:
            return seen
        driver.find_element(By.ID, "next").click()


@pytest.mark.slow  # chromium
def test_the_dashboard_works_in_a_headless_browser(run, browser, tmp_path):
    from selenium.webdriver.common.by import By

    records = js_payload(run / "dashboard" / "data" / "features_0000.js")
    browser.get((run / "dashboard" / "index.html").as_uri())
    _wait(browser, "#index tbody tr")
    n_dead = sum(1 for r in js_payload(run / "dashboard" / "data" / "index.js")["rows"] if r[1] is None)
    assert n_dead >= 5
    assert browser.find_element(By.ID, "count").text == f"{D_SAE - n_dead} of {D_SAE} features"
    browser.find_element(By.ID, "hide-dead").click()  # show every feature
    assert sorted(_listed_features(browser)) == list(range(D_SAE))
    browser.save_screenshot(str(tmp_path / "index.png"))

    # Sorting by max activation puts the largest first.
    browser.get((run / "dashboard" / "index.html").as_uri())
    _wait(browser, "#index tbody tr")
    browser.find_element(By.CSS_SELECTOR, "th[data-key=max]").click()
    first = int(browser.find_element(By.CSS_SELECTOR, "#index tbody tr").get_attribute("data-feature"))
    index = js_payload(run / "dashboard" / "data" / "index.js")["rows"]
    assert index[first][2] == max(r[2] for r in index)

    # Opening a feature shows its top contexts with the firing token marked and shaded fullest.
    feature = next(f for f in range(5, D_SAE) if records[str(f)]["fired"] > 0)
    browser.find_element(By.ID, "search").send_keys(str(feature))
    browser.find_element(By.CSS_SELECTOR, f"#index tbody tr[data-feature='{feature}'] a").click()
    _wait(browser, "#top-examples .example")
    marked = browser.find_elements(By.CSS_SELECTOR, "#top-examples .example .tok.max")
    top = records[str(feature)]["top"]
    assert len(marked) == len(top)
    vocab = {int(k): v for k, v in js_payload(run / "dashboard" / "data" / "vocab.js").items()}
    centre = len(top[0][2]) - 1 - 4  # window_before = 15, window_after = 4
    assert marked[0].get_attribute("textContent") == vocab[top[0][2][centre]]
    assert float(marked[0].get_attribute("data-act")) == pytest.approx(top[0][0])
    # The strongest example's token is the feature's maximum: fully shaded (alpha 1 is written rgb).
    assert marked[0].value_of_css_property("background-color") in ("rgba(255, 120, 0, 1)", "rgb(255, 120, 0)")
    assert browser.find_elements(By.CSS_SELECTOR, "#feature svg rect.bar")
    assert "direct path" in browser.find_element(By.ID, "feature").text
    _no_js_errors(browser)
    shot = Path(os.environ.get("MATS_SAE_SCREENSHOT_DIR", tmp_path)) / "dashboard_feature.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


@pytest.mark.slow  # chromium
def test_the_dashboard_works_from_a_static_file_server(run, browser):
    from selenium.webdriver.common.by import By

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(run / "dashboard"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html#f={D_SAE - 1}")
        _wait(browser, "#top-examples .example .tok.max")
        assert browser.find_element(By.CSS_SELECTOR, "#feature h2").text == f"Feature {D_SAE - 1}"
        _no_js_errors(browser)
    finally:
        server.shutdown()


def test_range_shares_are_exact_and_agree_with_the_histogram(run):
    data = run / "dashboard" / "data"
    records = {}
    for c in range(0, D_SAE, CHUNK):
        records.update({int(k): v for k, v in js_payload(data / f"features_{c // CHUNK:04d}.js").items()})
    checked = 0
    for rec in records.values():
        if rec["fired"] == 0:
            assert rec["ranges"] == []
            continue
        counts, width = rec["hist"]["counts"], rec["hist"]["width"]
        assert sum(r["share"] for r in rec["ranges"]) == pytest.approx(1.0)
        edges = [0.0] + [r["hi"] for r in rec["ranges"]]
        assert [r["lo"] for r in rec["ranges"]] == pytest.approx(edges[:-1], rel=1e-3)
        assert edges[-1] == pytest.approx(width * len(counts), rel=1e-3)
        for r in rec["ranges"]:
            a, b = round(r["lo"] / width), round(r["hi"] / width)  # ranges are runs of whole bins
            assert r["share"] == pytest.approx(sum(counts[a:b]) / rec["fired"])
            assert all(r["lo"] * (1 - 1e-3) <= ex[0] for ex in r["examples"])
            if r is not rec["ranges"][-1]:
                assert all(ex[0] <= r["hi"] * (1 + 1e-3) for ex in r["examples"])
        checked += 1
    assert checked > 100


@pytest.mark.slow
def test_an_unknown_feature_says_so_and_the_histogram_has_a_y_axis(run, browser):
    from selenium.webdriver.common.by import By

    browser.get((run / "dashboard" / "index.html").as_uri() + "#f=999999")
    note = _wait(browser, "#unknown-feature")
    assert "no feature 999999" in note.text and f"0 to {D_SAE - 1}" in note.text
    _no_js_errors(browser)  # no request for a data file that does not exist

    records = js_payload(run / "dashboard" / "data" / "features_0000.js")
    feature = next(f for f in range(5, D_SAE) if records[str(f)]["fired"] > 0)
    browser.get((run / "dashboard" / "index.html").as_uri() + f"#f={feature}")
    _wait(browser, "#feature svg.histogram rect.bar")
    ticks = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "svg.histogram .y-tick")]
    assert ticks[-1] == str(max(records[str(feature)]["hist"]["counts"]))
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.histogram rect.bar title")
    assert bars[0].get_attribute("textContent").startswith(f"{records[str(feature)]['hist']['counts'][0]} rows in [")
    _no_js_errors(browser)


@pytest.mark.slow
def test_the_index_shows_how_many_features_fire_how_often(run, browser):
    """The index's density histogram: every feature that fires in one bar of log10 density
    (fixed bins -10..0 by 0.5, as eval.json's), those that never fire counted apart."""
    import math

    from selenium.webdriver.common.by import By

    browser.get((run / "dashboard" / "index.html").as_uri())
    _wait(browser, "svg.density-histogram rect.bar")
    rows = js_payload(run / "dashboard" / "data" / "index.js")["rows"]
    densities = [r[1] for r in rows]
    never = sum(d is None for d in densities)
    want = [0] * 20
    for d in densities:
        if d is not None:
            want[min(19, max(0, math.floor((d + 10) / 0.5)))] += 1
    titles = [t.get_attribute("textContent")
              for t in browser.find_elements(By.CSS_SELECTOR, "svg.density-histogram rect.bar title")]
    assert [int(t.split(" ")[0]) for t in titles] == want
    note = browser.find_element(By.ID, "density-note").text
    assert f"{len(rows) - never} features fire" in note and (never == 0 or f"{never} never fire" in note)
    _no_js_errors(browser)


# ----------------------------------------------------------------------------- absorption (eval.json's)

PER_LETTER = {  # as evaluate --absorption writes it, with keys the dashboard does not show
    "s": {"rate": 0.25, "f1": 0.8, "main_feature": 17, "n_true_positives": 40, "n_misses": 12, "n_absorbed": 10,
          "absorbing_features": [{"feature": 123, "n_absorbed": 7}, {"feature": 260, "n_absorbed": 3}]},
    "c": {"rate": 0.0, "f1": 0.9, "main_feature": 123, "n_true_positives": 30, "n_misses": 2, "n_absorbed": 0,
          "absorbing_features": []},
    "a": {"rate": 0.1, "f1": 0.5, "main_feature": 42, "n_true_positives": 20, "n_misses": 4, "n_absorbed": 2,
          "absorbing_features": [{"feature": 17, "n_absorbed": 2}]},
}


@pytest.fixture(scope="module")
def absorbed_run(run, tmp_path_factory) -> Path:
    """The run copied, with an eval.json holding per-letter absorption, and its dashboard rebuilt."""
    folder = Path(shutil.copytree(run, tmp_path_factory.mktemp("absorbed") / "run"))
    (folder / "eval.json").write_text(json.dumps({"l0": 12.0, "absorption_first_letter_rate": 0.12,
                                                  "absorption_first_letter_per_letter": PER_LETTER}))
    got = CliRunner().invoke(evaluate_main, [str(folder), "--no-metrics", "--no-model", "--dashboard", "--quiet"])
    assert got.exit_code == 0, got.output
    return folder


def _records(run: Path) -> dict[int, dict]:
    records = {}
    for c in range(0, D_SAE, CHUNK):
        path = run / "dashboard" / "data" / f"features_{c // CHUNK:04d}.js"
        records.update({int(k): v for k, v in js_payload(path).items()})
    return records


def test_absorption_goes_to_the_index_and_the_feature_pages(absorbed_run):
    meta = js_payload(absorbed_run / "dashboard" / "data" / "meta.js")
    assert [r["letter"] for r in meta["absorption"]] == ["a", "c", "s"]
    s = meta["absorption"][2]
    assert (s["main_feature"], s["f1"], s["rate"], s["n_absorbed"], s["n_true_positives"]) == (17, 0.8, 0.25, 10, 40)
    assert s["absorbing_features"] == PER_LETTER["s"]["absorbing_features"]
    assert meta["absorption"][1]["absorbing_features"] == []
    records = _records(absorbed_run)
    assert records[17]["absorption"] == [{"letter": "a", "role": "absorbs", "n_absorbed": 2},
                                         {"letter": "s", "role": "main", "f1": 0.8, "rate": 0.25}]
    assert records[123]["absorption"] == [{"letter": "c", "role": "main", "f1": 0.9, "rate": 0.0},
                                          {"letter": "s", "role": "absorbs", "n_absorbed": 7}]
    assert records[260]["absorption"] == [{"letter": "s", "role": "absorbs", "n_absorbed": 3}]
    assert records[42]["absorption"][0]["role"] == "main"
    assert [f for f, r in records.items() if "absorption" in r] == [17, 42, 123, 260]


def test_no_absorption_without_it_in_eval_json(run, tmp_path):
    assert js_payload(run / "dashboard" / "data" / "meta.js")["absorption"] is None  # never evaluated
    assert not [f for f, r in _records(run).items() if "absorption" in r]
    from train.evaluation.dashboard import absorption_letters, absorption_roles

    assert absorption_letters(None) is None and absorption_letters({}) is None and absorption_roles(None) == {}
    assert absorption_letters({"a": {"rate": 0.1}}) is None  # damaged: left out, the dashboard still written
    old = {c: {k: v for k, v in d.items() if k != "absorbing_features"} for c, d in PER_LETTER.items()}
    assert [r["absorbing_features"] for r in absorption_letters(old)] == [None, None, None]  # not recorded then
    assert sorted(absorption_roles(old)) == [17, 42, 123]  # main features only


@pytest.mark.slow  # chromium
def test_the_index_shows_which_features_absorb_which_letters(absorbed_run, run, browser):
    from selenium.webdriver.common.by import By

    browser.get((absorbed_run / "dashboard" / "index.html").as_uri())
    _wait(browser, "#absorption-table tbody tr")
    assert "Feature absorption (first letter)" in browser.find_element(By.ID, "absorption").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#absorption-table tbody tr")
    assert [r.get_attribute("data-letter") for r in rows] == ["a", "c", "s"]
    s = rows[2]
    links = [a.get_attribute("href").split("#")[1] for a in s.find_elements(By.TAG_NAME, "a")]
    assert links == ["f=17", "f=123", "f=260"]
    cells = [td.text for td in s.find_elements(By.TAG_NAME, "td")]
    assert cells == ["s", "feature 17", "0.800", "0.250", "10 of 40", "feature 123 (7), feature 260 (3)"]
    assert rows[1].find_elements(By.TAG_NAME, "td")[5].text == "none"
    s.find_elements(By.TAG_NAME, "a")[1].click()  # feature 123: main for 'c', absorbs 's'
    box = _wait(browser, "#feature-absorption")
    assert "main feature for letter 'c'" in box.text and "absorbs 's' on 7 tokens" in box.text
    _no_js_errors(browser)

    browser.get((run / "dashboard" / "index.html").as_uri())  # never evaluated: no section
    _wait(browser, "#index tbody tr")
    assert browser.find_elements(By.ID, "absorption") == []
    browser.get((run / "dashboard" / "index.html").as_uri() + "#f=123")
    _wait(browser, "#feature h2")
    assert browser.find_elements(By.ID, "feature-absorption") == []
    _no_js_errors(browser)
