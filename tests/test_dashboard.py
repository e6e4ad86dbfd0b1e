"""The web dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright against
the real api and Celery worker (PostgreSQL + Redis) with an API key configured.

Every page is watched: a console error, a failed request, an HTTP error the test did not provoke, or any
request to a host other than 127.0.0.1 (all are blocked: the dashboard and /docs must work offline) fails the
test. Screenshots go to the test's tmp dir; the assertion messages name them.
"""

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import fresh_postgres_url, fresh_redis_url
from tests.live import WORKER_COMMAND, Service, base_env, migrated, start_service, stop_service, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "dashboard-test-key"
TINY_FORM = {"dataset": "ptbxl-500", "epochs": "2", "record_limit": "32", "batch_size": "8"}
PTB_RECORD = "ptb-diagnostic/s0010_re"
FINISHED = ("succeeded", "failed", "cancelled")

pytestmark = pytest.mark.e2e


def browser_missing() -> str | None:
    """Why no browser can be driven here (None: Chromium and Playwright are both installed)."""
    if not CHROMIUM.is_file():
        return (
            f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium; .ci/run does it)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if reason := browser_missing():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Service]:
    """api (uvicorn) + a Celery worker on PostgreSQL and Redis, with an API key and the shipped model."""
    tmp = tmp_path_factory.mktemp("dashboard")
    env = base_env(tmp, fresh_postgres_url(), fresh_redis_url())
    env.update(ECGSSL_API_KEY=API_KEY, ECGSSL_SHIP_DEFAULT_MODEL="true")
    py = sys.executable
    service = start_service(
        migrated(env),
        [
            [py, "-m", "api", "--host", "127.0.0.1", "--port", "{port}", "--no-migrate"],
            WORKER_COMMAND,
        ],
        tmp,
    )
    yield service
    stop_service(service)


@dataclass
class Watch:
    """What went wrong on a page: console errors, failed requests, HTTP errors, requests that left 127.0.0.1.
    ``expect(status)`` admits one HTTP error of that status (and the console line Chromium writes for it)."""

    shots: Path
    console: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    expected: list[int] = field(default_factory=list)

    def expect(self, status: int) -> None:
        self.expected.append(status)

    def screenshot(self, page, name: str) -> Path:  # noqa: ANN001
        path = self.shots / f"{name}.png"
        page.screenshot(path=path, full_page=True)
        return path

    def check(self, page, name: str) -> Path:  # noqa: ANN001
        """Screenshot the page and fail on anything unexpected that happened on it so far."""
        shot = self.screenshot(page, name)
        refused = list(self.refused)
        console = list(self.console)
        for status in self.expected:
            match = next((r for r in refused if r[0] == status), None)
            assert match is not None, f"the page got no expected {status} (screenshot {shot}); got {refused}"
            refused.remove(match)
            line = next((c for c in console if f"status of {status}" in c), None)
            if line is not None:
                console.remove(line)
        self.expected.clear()
        self.refused.clear()
        self.console.clear()
        problems = {"console errors": console, "failed requests": self.failed, "HTTP errors": refused}
        problems["requests off 127.0.0.1"] = self.external
        assert not any(problems.values()), f"{name}: {problems} (screenshot {shot})"
        return shot


@pytest.fixture
def page(browser, keyed_service: Service, tmp_path: Path) -> Iterator[tuple]:  # noqa: ANN001
    """A fresh page on the service, watched (``Watch``), with every other host blocked."""
    watch = Watch(tmp_path)
    context = browser.new_context(base_url=keyed_service.url, viewport={"width": 1400, "height": 900})

    def route(route) -> None:  # noqa: ANN001
        if urlparse(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith("data:"):
            route.continue_()
        else:
            watch.external.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and watch.console.append(m.text))
    page.on("pageerror", lambda e: watch.console.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: watch.failed.append(f"{r.method} {r.url}: {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and watch.refused.append((r.status, r.url)))
    yield page, watch
    context.close()


def set_api_key(page, key: str) -> None:  # noqa: ANN001
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")


def test_docs_and_redoc_render_offline(page: tuple) -> None:
    page, watch = page
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .opblock-tag", timeout=30_000)
    assert page.locator(".opblock-summary-path", has_text="/jobs/pretrain").count() >= 1
    assert page.locator(".opblock-summary-path", has_text="/predict").count() >= 1
    watch.check(page, "docs")
    page.goto("/redoc")
    page.wait_for_selector("h1:has-text('ECG self-supervised learning service')", timeout=60_000)
    assert page.locator("text=Queue a self-supervised pretraining job").count() >= 1
    watch.check(page, "redoc")


def test_pretrain_from_the_form_watch_it_succeed_and_promote_it(page: tuple, keyed_service: Service) -> None:
    page, watch = page
    page.goto("/#/submit/pretrain")
    page.wait_for_selector("#pretrain-form")
    # the form is the schema's: defaults filled in, descriptions shown
    assert page.input_value("#field-method") == "st_mem"
    assert page.input_value("#field-mask_ratio") == "0.75"
    assert "registered dataset" in page.inner_text("#pretrain-form")
    for name, value in TINY_FORM.items():
        page.fill(f"#field-{name}", value)

    # without the key the API refuses, and the page says why
    page.click("#pretrain-form button[type=submit]")
    watch.expect(401)
    page.wait_for_selector("#form-error:has-text('API key')")
    watch.check(page, "submit-without-key")

    set_api_key(page, API_KEY)
    page.fill("#field-epochs", "0")  # the API's 422 is shown next to the field
    page.click("#pretrain-form button[type=submit]")
    watch.expect(422)
    error = page.wait_for_selector(".field-error[data-field=epochs]:has-text('greater than or equal to 1')")
    assert "422" in error.inner_text()
    watch.check(page, "submit-422")

    page.fill("#field-epochs", TINY_FORM["epochs"])
    page.click("#pretrain-form button[type=submit]")
    page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f-]{36}$"), timeout=30_000)
    job_id = page.url.rsplit("/", 1)[1]
    with keyed_service.client() as client:  # the browser shows the job live; the API says when it ends
        job = wait_for(client, job_id, lambda j: j["status"] in FINISHED, 300)
    page.wait_for_selector("#job-status:has-text('succeeded')", timeout=15_000)
    shot = watch.check(page, "job-succeeded")
    assert job["status"] == "succeeded", f"{job['error']} (screenshot {shot})"
    # the loss curve: one point per epoch for train_loss and val_loss
    points = page.locator("#curves svg.chart g.series[data-name=train_loss] circle.point")
    assert points.count() == 2, f"the train_loss curve has {points.count()} points (screenshot {shot})"
    assert page.inner_text("#progress [data-field=epoch] .value") == "2 / 2"

    # the jobs list, filtered by kind
    page.goto("/#/jobs")
    page.select_option("select[name=kind]", "pretrain")
    row = page.wait_for_selector(f"tr[data-job='{job_id}']")
    assert "succeeded" in row.inner_text() and "ptbxl-500" in row.inner_text()
    page.select_option("select[name=kind]", "evaluate")
    page.wait_for_selector(f"tr[data-job='{job_id}']", state="detached")
    watch.check(page, "jobs")

    # promote the version the job registered
    ref = job["model_version"]
    name, version = ref.split("@")
    page.goto("/#/models")
    page.click(f"table[data-model='{name}'] a:has-text('{ref}')")
    page.wait_for_selector("#promote")
    page.fill("#alias-name", "production")
    page.click("#promote")
    page.wait_for_selector(f"#alias-message:has-text('{name}@production → version {version}')")
    shot = watch.check(page, "promoted")
    assert httpx.get(f"{keyed_service.url}/models/{name}/aliases/production").json()["version"] == int(
        version
    ), shot

    # evaluate it from the evaluation form (kNN only): its PNG artifacts show inline
    page.goto("/#/submit/evaluate")
    page.fill("#field-model", ref)
    page.fill("#field-dataset", "ptbxl-500")
    page.check("#field-protocols input[value=knn]")
    page.click("#evaluate-form button[type=submit]")
    page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f-]{36}$"), timeout=30_000)
    evaluation_id = page.url.rsplit("/", 1)[1]
    with keyed_service.client() as client:
        evaluation = wait_for(client, evaluation_id, lambda j: j["status"] in FINISHED, 300)
    page.wait_for_selector("#job-status:has-text('succeeded')", timeout=15_000)
    page.wait_for_function(
        "() => { const images = [...document.querySelectorAll('.artifacts img')];"
        " return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0); }",
        timeout=15_000,
    )
    shot = watch.check(page, "evaluation")
    assert evaluation["params"]["protocols"] == ["knn"], shot
    assert page.locator(".artifacts img").count() == len(evaluation["artifacts"]) > 0, shot

    # the comparison table: both models' versions, the evaluation's figures, sortable
    page.goto("/#/compare")
    page.wait_for_selector("#compare tbody tr")
    assert page.locator("#compare tbody tr").count() == 2
    row = page.locator(f"#compare tr[data-ref='{ref}']")
    knn = evaluation["result"]["knn"]
    assert row.locator("td").nth(5).inner_text() == f"{knn['macro_auroc']:.3f}"
    assert row.locator("td").nth(7).inner_text() == f"{knn['auroc_per_class']['MI']:.3f}"  # NORM, MI, ...
    for key in ("knn", "ref"):
        page.click(f"#compare th[data-key={key}]")  # descending first
        cells = [c.inner_text() for c in page.locator("#compare tbody tr td:first-child").all()]
        values = {"ref": sorted([ref, "ecg-diagnosis@1"], reverse=True)}
        if key == "knn":
            shipped = httpx.get(f"{keyed_service.url}/models/ecg-diagnosis/versions/1").json()
            best = knn["macro_auroc"] > shipped["knn_reference"]["test_macro_auroc"]
            values["knn"] = [ref, "ecg-diagnosis@1"] if best else ["ecg-diagnosis@1", ref]
        assert cells == values[key], f"sorted by {key}: {cells}"
    watch.check(page, "compare")


def test_try_it_plots_the_leads_and_shows_probabilities(page: tuple, data_dir: Path) -> None:
    page, watch = page
    page.goto("/")
    set_api_key(page, API_KEY)
    page.goto("/#/try")
    page.select_option("#try-model", "ecg-diagnosis@production")
    record = data_dir / PTB_RECORD
    page.set_input_files("#try-files", [record.with_suffix(".hea"), record.with_suffix(".dat")])
    page.click("#try-run")
    page.wait_for_selector("#predict svg.probabilities", timeout=60_000)
    page.wait_for_selector("#plots svg.ecg >> nth=1", timeout=60_000)
    page.wait_for_selector("#neighbours-table tbody tr", timeout=60_000)
    shot = watch.check(page, "try-it")
    bars = {
        bar.get_attribute("data-class"): float(bar.get_attribute("data-p"))
        for bar in page.locator("#predict .probability-bar").all()
    }
    assert set(bars) == {"NORM", "MI", "STTC", "CD", "HYP"}, shot
    assert bars["MI"] > bars["NORM"], f"{bars} (screenshot {shot})"  # PTB patient001: acute MI
    plots = page.locator("#plots svg.ecg")
    for i in range(2):  # as read (12 leads of the 15 channels, 1000 Hz) and as preprocessed (12, 100 Hz)
        plot = plots.nth(i)
        labels = [t.text_content() for t in plot.locator("text.lead-label").all()]
        assert [label.upper() for label in labels] == [
            "I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"
        ], f"{labels} (screenshot {shot})"  # fmt: skip
        traces = plot.locator("polyline.trace")
        assert traces.count() == 12 and len(traces.first.get_attribute("points").split()) > 500, shot
        assert "time (s)" in plot.text_content() and "mV" in plot.text_content(), shot
    assert page.locator("#neighbours-table tbody tr").count() == 5, shot
