"""The review page in a real browser: Debian's chromium, headless, driven by Playwright, against `neuron review`
serving a database that the pipeline filled from real DICOMs (RG1's pixels, small, untrained weights).

Set NEURON_SCREENSHOTS=docs to also write the README's screenshots (docs/review-worklist.png, docs/review-study.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import create_engine, text

from neuron.servers import free_port, wait_for_port
from worker.embedded import run_folder

from .conftest import small_chest

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at "
                                                              "/usr/bin/chromium (apt-get install chromium; .ci/run "
                                                              "does)")

STUDIES = [("20261125", "ACC-B1", "CHEST PA"), ("20261126", "ACC-B2", "THORAX AP"),
           ("20261127", "ACC-B3", "CHEST PA/LAT")]


def _variant(path: Path, kind: str) -> None:
    """Make the three studies' pictures differ (and so their findings): as stored, mirrored, the upper part only."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if kind == "mirrored":
        arr = arr[:, ::-1]
    elif kind == "upper":
        arr = arr[: arr.shape[0] * 3 // 4]
    arr = np.ascontiguousarray(arr)
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def screened(tmp_path_factory, rg1, untrained_settings, models) -> Path:
    """An output folder with three screened studies (one image each, heatmaps of the top finding)."""
    from worker.pipeline import Pipeline

    root = tmp_path_factory.mktemp("review")
    for (date, accession, description), kind in zip(STUDIES, ("plain", "mirrored", "upper"), strict=True):
        path = small_chest(rg1, root / "in" / f"{accession}.dcm", step=8, StudyDate=date, AccessionNumber=accession,
                           StudyDescription=description)
        _variant(path, kind)
    settings = untrained_settings.with_(out_dir=root / "out")
    report = run_folder(root / "in", settings, pipeline=Pipeline(models, settings))
    assert report.screened == 3
    return root / "out"


@pytest.fixture(scope="module")
def server(screened):
    port = free_port()
    env = {**os.environ, "NEURON_REVIEW_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    env.pop("NEURON_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "neuron", "review", "--port", str(port), "--out", str(screened)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"neuron review did not start: {proc.communicate()[0]}") from None
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _db(out: Path):
    return create_engine(f"sqlite:///{out / 'neuron.db'}")


def _save(shot: Path) -> None:
    """Copy a screenshot into NEURON_SCREENSHOTS (e.g. docs/) when asked to."""
    target = os.environ.get("NEURON_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


def test_a_reviewer_filters_opens_a_study_sees_the_heatmap_and_records_a_verdict(screened, server, browser,
                                                                                tmp_path):
    db = _db(screened)
    with db.connect() as conn:
        # a label whose threshold keeps some studies and drops others: its highest per-study probability
        per_study = conn.execute(text(
            "SELECT p.label, s.accession_number, MAX(p.probability) FROM predictions p "
            "JOIN instances i ON i.sop_instance_uid = p.sop_instance_uid "
            "JOIN studies s ON s.study_instance_uid = i.study_instance_uid "
            "GROUP BY p.label, s.accession_number")).all()
    by_label: dict[str, dict[str, float]] = {}
    for label, accession, p in per_study:
        by_label.setdefault(label, {})[accession] = p
    label, scores = max(by_label.items(), key=lambda kv: max(kv[1].values()) - min(kv[1].values()))
    threshold = round(sorted(scores.values())[-1] - 1e-4, 4)
    expected = {a for a, p in scores.items() if p >= threshold}
    assert 0 < len(expected) < 3, f"the three pictures should score {label} differently: {scores}"

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(server + "/")
    rows = page.locator("table.worklist tbody tr")
    assert rows.count() == 3
    assert page.locator("table.worklist").inner_text().count("ACC-B") == 3
    shot = tmp_path / "review-worklist.png"
    page.screenshot(path=str(shot), full_page=True)
    _save(shot)

    page.select_option("select[name=label]", label)
    page.fill("input[name=min_probability]", str(threshold))
    page.click("form.filters button[type=submit]")
    page.wait_for_url(lambda url: "label=" in url)
    shown = {t.strip() for t in page.locator("table.worklist tbody tr td:nth-child(3)").all_inner_texts()}
    assert shown == expected

    page.locator("table.worklist tbody tr td:nth-child(3) a").first.click()
    page.wait_for_url("**/study/*")
    heat = page.locator("img.heat").first
    heat.wait_for()
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    assert page.evaluate("() => [...document.querySelectorAll('img.heat, img.base')].map(i => i.naturalWidth)") \
        == [224, 224]
    slider = page.locator("input[type=range]").first
    slider.fill("30")
    assert heat.evaluate("i => i.style.opacity") == "0.3"
    slider.fill("100")

    # the token, typed once, with the reviewer's name
    page.fill("#signin input[name=reviewer]", "Dr Browser")
    page.fill("#signin input[name=token]", TOKEN)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("header >> text=recording verdicts as")
    assert "recording verdicts as Dr Browser" in page.inner_text("header")
    first = page.locator("table.findings tbody tr").first
    finding_label = first.locator("td").first.inner_text().split(" needs review")[0].strip()
    first.locator("input[name=note]").fill("agree with the top finding")
    first.locator("button[value=agree]").click()
    page.wait_for_url(lambda url: "#finding-" in url)
    assert "Dr Browser" in page.locator("table.findings tbody tr").first.inner_text()
    shot = tmp_path / "review-study.png"
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    _save(shot)
    with db.connect() as conn:
        reviews = conn.execute(text("SELECT label, verdict, note, reviewer, latest FROM reviews")).all()
    assert [tuple(r) for r in reviews] == [(finding_label, "agree", "agree with the top finding", "Dr Browser", 1)]

    # without the token (cookies gone) the same form is refused and nothing is written
    page.context.clear_cookies()
    page.reload()
    row = page.locator("table.findings tbody tr").first
    row.locator("input[name=reviewer]").fill("Someone Else")
    row.locator("button[value=disagree]").click()
    page.wait_for_selector(".error .message")
    assert "needs the review token" in page.inner_text("main")
    with db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM verdicts")).scalar_one() == 1
    page.close()
