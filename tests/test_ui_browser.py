"""The MLflow UI of a real tiny study, checked in headless Chromium: trials, metric charts, sample images.

One server (start_ui on a free port) for the module; the study `tests/studies/_test_ui.yaml` logs THROUGH its
HTTP URI (params, metrics and artifacts over REST), with mgbench's own evaluation at 2 sample seeds (so the
objective has an SE) and a CFG sweep (so sample grids come as npz + PNG); Selenium then reads the React pages.
Screenshots land in the test's tmp dir and in reports/ui/ for the record (runs_page.png: the printed link).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, TEST_STUDIES

from mgbench.tracking import TAG_PARENT
from mgbench.ui import UiError, check_port_free, free_port, group_members, runs_page_link, start_ui, study_link_lines

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPORTS = ROOT / "reports" / "ui"
TRIALS = ["w=1.00 lambda=0.10", "w=1.50 lambda=0.10"]  # the run names of the two trials of _test_ui.yaml
WAIT_S = 90  # explicit waits: the SPA fetches after load, and the machine's 2 cores are shared
OBJECTIVE = {"metric": "in_class", "direction": "maximize"}  # mgbench's grid2d evaluation: it reports an SE
SETS = {"eval.sample_seeds": 2, "eval.cfg_sweep": [1.5]}     # SE of the objective; CFG-swept sample grids
METRIC, METRIC_SE = "eval/in_class", "eval/in_class_se"
SAMPLES = ["samples/step_00000040.png", "samples/step_00000040_cfg_1.50.png"]  # train.steps = 40 in _test_ui.yaml

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver "
                "(apt-get install -y --no-install-recommends chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An MLflow server on a free loopback port, with the tiny study logged through it (`server.spec`)."""
    import torch

    from mgbench.study.runner import run_study
    from mgbench.study.spec import load_spec

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ui")
    t0 = time.monotonic()
    srv = start_ui(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts", port=free_port(), log_path=tmp / "server.log")
    print(f"\nserver up in {time.monotonic() - t0:.1f} s at {srv.url}")
    overrides = {"out_dir": str(tmp / "study"), "tracking_uri": srv.url, "optimize": OBJECTIVE,
                 "eval_hook": "mgbench.evaluation:make_eval_hook"}
    srv.spec = load_spec(TEST_STUDIES / "_test_ui.yaml", overrides, sets=SETS)
    summary = run_study(srv.spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (2, 0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def runs(server):
    """{run name: (experiment id, run id)} of the study, read back through the server."""
    from mgbench.tracking import mlflow_client

    client = mlflow_client(server.url)
    exp = client.get_experiment_by_name("_test_ui")
    return {r.info.run_name: (exp.experiment_id, r.info.run_id) for r in client.search_runs([exp.experiment_id])}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1600,1000",
                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, cond, what: str):
    """WebDriverWait with a message that says what never appeared."""
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(cond, message=f"timed out waiting for {what}")


def body_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save a screenshot to the test's tmp dir and copy it to reports/ui/."""
    close_assistant(driver)
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    REPORTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, REPORTS / path.name)
    return path


def test_study_logged_through_the_server(server, runs):
    from mgbench.tracking import mlflow_client

    client = mlflow_client(server.url)
    assert set(runs) == {"_test_ui", *TRIALS}
    for name in TRIALS:
        run = client.get_run(runs[name][1])
        assert run.data.tags[TAG_PARENT] == runs["_test_ui"][1]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: uploaded over HTTP
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [10, 20, 30, 40]  # train.steps = 40, log_every = 10
        assert float(run.data.params["objective.w"]) == float(name.split()[0][2:])
        assert run.data.metrics[METRIC_SE] > 0  # 2 sample seeds: the objective has a standard error
        folder = Path(server.artifacts_destination) / runs[name][0] / run.info.run_id / "artifacts"
        for png in SAMPLES:
            assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # landed in the artifacts destination
        assert {p.name for p in (folder / "samples").glob("*.npz")} == {"samples.npz", "samples_cfg_1.50.npz"}


def close_assistant(driver) -> None:
    """Close MLflow's assistant side panel if it is open (it only narrows the screenshots)."""
    for b in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):
        if "Assistant" in (b.find_element(By.XPATH, "ancestor::*[4]").text or ""):
            b.click()
            return


def test_experiment_page_lists_the_nested_trial_runs(server, runs, browser, tmp_path):
    exp_id, parent_id = runs["_test_ui"]
    assert set(TRIALS) <= set(runs)
    browser.get(f"{server.url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    parent_link = wait_for(browser, lambda d: d.find_element(
        By.XPATH, "//div[@role='gridcell']//a[normalize-space()='_test_ui']"), "the study's parent run in the runs table")
    assert parent_link.get_attribute("href").endswith(f"#/experiments/{exp_id}/runs/{parent_id}")
    assert "3 matching runs" in body_text(browser)
    # Trials are nested under the study run: expand it as a user would.
    cell = parent_link.find_element(By.XPATH, "ancestor::div[@role='gridcell']")
    cell.find_element(By.XPATH, ".//button[contains(@data-component-id,'runnamecellrenderer')]").click()
    links = wait_for(browser, lambda d: [a for a in d.find_elements(By.XPATH, "//div[@role='gridcell']//a[@href]")
                                         if a.text.strip() in TRIALS] if all(t in body_text(d) for t in TRIALS)
                     else False, "the trial runs under the expanded study run")
    assert {a.text.strip(): a.get_attribute("href").rsplit("/", 1)[-1] for a in links} == \
        {t: runs[t][1] for t in TRIALS}
    screenshot(browser, tmp_path, "experiment_runs")


def test_run_page_shows_the_training_loss_chart(server, runs, browser, tmp_path):
    exp_id, run_id = runs[TRIALS[1]]
    browser.get(f"{server.url}/#/experiments/{exp_id}/runs/{run_id}/model-metrics?workflowType=machine_learning")
    header = wait_for(browser, lambda d: d.find_element(
        By.XPATH, "//*[@data-testid='experiment-view-compare-runs-section-header'][starts-with(normalize-space(.),'train')]"),
        "the 'train' section of the run's metric charts")
    assert TRIALS[1] in body_text(browser)  # the run page is titled with the trial's name
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", header)  # charts render when visible
    grid = header.find_element(By.XPATH, "following::*[@data-testid='draggable-chart-cards-grid'][1]")
    wait_for(browser, lambda d: f"{TRIALS[1]} (train/loss)" in grid.text and grid.find_elements(
        By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg"), "a plotted train/loss chart")
    lines = grid.find_elements(By.CSS_SELECTOR, ".js-plotly-plot g.trace.scatter path.js-line")
    assert lines and any(len(p.get_attribute("d") or "") > 10 for p in lines)  # a drawn line, not an empty plot
    titles = grid.text.splitlines()
    assert {"loss", "w"} <= set(titles)  # the chart titles of train/loss and train/w
    for name in ("train/loss", "train/w"):
        assert f"{TRIALS[1]} ({name})" in grid.text  # legends name the metric and the run
    screenshot(browser, tmp_path, "run_metrics")


@pytest.mark.parametrize("artifact", SAMPLES)
def test_artifact_view_shows_the_sample_image(server, runs, browser, tmp_path, artifact):
    exp_id, run_id = runs[TRIALS[0]]
    browser.get("about:blank")  # a fresh page load, as a pasted link gets (a hash change keeps the selected file)
    browser.get(f"{server.url}/#/experiments/{exp_id}/runs/{run_id}/artifacts/{artifact}?workflowType=machine_learning")
    img = wait_for(browser, lambda d: next((i for i in d.find_elements(By.TAG_NAME, "img")
                                            if i.get_attribute("alt") == artifact and i.size["width"] > 50), False),
                   f"the image preview of {artifact}")
    loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
    assert loaded and loaded > 50  # the PNG arrived over HTTP and decoded
    text = body_text(browser)
    assert artifact.split("/")[1] in text and "samples" in text  # the artifact tree shows the file
    screenshot(browser, tmp_path, "run_artifact_sample" if artifact == SAMPLES[0] else "run_artifact_cfg_sample")


def test_printed_link_opens_the_classic_runs_table_with_w_lambda_and_objective_columns(server, runs, browser,
                                                                                       tmp_path):
    from mgbench.tracking import mlflow_client

    exp_id = runs["_test_ui"][0]
    lines = study_link_lines(server.url, server.spec)  # what `mgbench ui --study` prints
    link = lines[0].removeprefix("study _test_ui: ")
    assert link == runs_page_link(server.url, exp_id) and "workflowType=machine_learning" in link
    browser.get("about:blank")
    browser.get(link)
    columns = ["params.`objective.w`", "params.`objective.label_drop`", f"metrics.`{METRIC}`", f"metrics.`{METRIC_SE}`"]
    wait_for(browser, lambda d: all(cell_text(d, run_id, columns[-1]) for _, run_id in
                                    (runs[t] for t in TRIALS)), "the trials' objective SE cells")
    headers = {h.get_attribute("col-id"): h.text for h in browser.find_elements(By.CSS_SELECTOR, ".ag-header-cell")}
    assert [headers.get(c) for c in columns] == ["objective.w", "objective.label_drop", METRIC, METRIC_SE]
    # The classic ML runs table, not the GenAI pages (Overview / Observability / Judges ...) MLflow 3 opens by default.
    assert "/runs?" in browser.current_url and "workflowType=machine_learning" in browser.current_url
    text = body_text(browser)
    assert "2 matching runs" in text  # the view's filter: the trials, without the study's parent run
    assert not {"Observability", "Judges", "Sessions"} & set(text.splitlines())
    assert browser.find_element(By.CSS_SELECTOR, "[data-testid='saved-views-trigger']").text == "mgbench: trials"
    # Each trial's row shows its w, lambda, objective and SE; the best (highest in_class) first.
    client = mlflow_client(server.url)
    data = {t: client.get_run(runs[t][1]).data for t in TRIALS}
    best_first = sorted(TRIALS, key=lambda t: -data[t].metrics[METRIC])
    rows = browser.find_elements(By.CSS_SELECTOR, ".ag-center-cols-container .ag-row")
    assert [r.get_attribute("row-id") for r in sorted(rows, key=lambda r: int(r.get_attribute("row-index")))] == \
        [runs[t][1] for t in best_first]
    for t in TRIALS:
        run_id = runs[t][1]
        shown = [cell_text(browser, run_id, c) for c in columns]
        expected = [data[t].params["objective.w"], data[t].params["objective.label_drop"],
                    data[t].metrics[METRIC], data[t].metrics[METRIC_SE]]
        assert [float(v) for v in shown] == pytest.approx([float(v) for v in expected], rel=1e-4), t
    screenshot(browser, tmp_path, "runs_page")


def cell_text(driver, run_id: str, col_id: str) -> str:
    """The text of one runs-table cell (row = run id, column = the UI's column id); '' if not rendered."""
    cells = driver.find_elements(By.CSS_SELECTOR, f".ag-row[row-id='{run_id}'] .ag-cell[col-id='{col_id}']")
    return cells[0].text.strip() if cells else ""


def test_second_ui_on_the_same_port_is_a_clear_error(server):
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(UiError, match=f"port {port} on 127.0.0.1 is busy"):
        start_ui("sqlite:////nonexistent/mlflow.db", "/nonexistent", port=port)
    r = subprocess.run([sys.executable, "-m", "mgbench.ui", "--port", str(port)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"mgbench ui: error: port {port} on 127.0.0.1 is busy (another server is listening there); "
        f"pick another with --port"]


def test_server_stops_cleanly(server):
    """Runs last in this module: stop the shared server, then the port is free and its group gone."""
    port = int(server.url.rsplit(":", 1)[1])
    assert server.alive() and len(group_members(server.pgid)) >= 2  # mlflow CLI + uvicorn worker(s)
    t0 = time.monotonic()
    server.stop()
    print(f"\nserver stopped in {time.monotonic() - t0:.1f} s")
    assert group_members(server.pgid) == []
    assert server.process.returncode is not None
    check_port_free("127.0.0.1", port)
