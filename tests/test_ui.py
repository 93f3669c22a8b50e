"""The Prefect UI's custom-run form, in a real browser: Debian's headless Chromium driven by
Playwright for Python, against ``tuneline serve-local`` (server + deployments, no worker).

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``:
the test uses /usr/bin/chromium). The screenshot is kept under test-output/ui/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.prefect_stack import REPO, ServeLocal

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-output" / "ui"

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found: the UI test needs Debian's chromium (apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the UI test needs Playwright for Python (pip install playwright)"
)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    stack = ServeLocal(tmp_path_factory.mktemp("ui-service"), REPO / "flows" / "presets" / "demo.yaml", workers=[])
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _field(page, *labels: str):
    """The innermost form property under the given (nested) labels, e.g. ("Sft", "Max Steps")."""
    scope = page
    for label in labels:
        title = page.locator(
            "span.schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}( \(Optional\))?$")
        )
        scope = scope.locator("div.schema-form-property").filter(has=title).last
    return scope


def test_custom_run_form_submits_a_run_with_the_changed_parameter(service, page):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    SHOTS.mkdir(parents=True, exist_ok=True)
    with SyncPrefectClient(service.api_url) as client:
        manual = client.read_deployment_by_name("retrain/manual")

    # The operator's path: the deployment page → Run → Custom run.
    page.goto(f"{service.ui_url}/deployments/deployment/{manual.id}")
    page.get_by_role("button", name=re.compile(r"^\s*Run\s*$")).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(re.compile(rf"/deployments/deployment/{manual.id}/run"))

    # The form is RetrainParams, prefilled with the preset: change SFT max steps and the model name.
    max_steps = _field(page, "Sft", "Max Steps").locator("input[type=number]")
    assert max_steps.input_value() == str(manual.parameters["params"]["sft"]["max_steps"])
    max_steps.fill("7")
    _field(page, "Release", "Model Name").locator("textarea").fill("quokka-from-the-ui")
    max_steps.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "custom-run-form.png"), full_page=False)
    page.get_by_role("button", name="Submit").click()

    # The UI goes back to the deployment's Runs tab, where the new run is listed.
    page.wait_for_url(re.compile(rf"/deployments/deployment/{manual.id}(\?tab=Runs)?$"))
    with SyncPrefectClient(service.api_url) as client:
        (run,) = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[manual.id])))
    # The UI confirms with the run's name; the deployment's Runs tab lists it and leads to its page.
    page.get_by_text(f"{run.name} scheduled to start").first.wait_for()
    page.goto(f"{service.ui_url}/deployments/deployment/{manual.id}?tab=Runs")
    page.get_by_role("link", name=run.name).first.click()
    page.wait_for_url(re.compile(rf"/runs/flow-run/{run.id}"))
    page.get_by_text(run.name).first.wait_for()
    page.get_by_text("Scheduled").first.wait_for()  # no worker in this test: it waits for one
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(SHOTS / "submitted-run.png"), full_page=False)

    assert run.deployment_id == manual.id
    params = run.parameters["params"]
    assert params["sft"]["max_steps"] == 7
    assert params["release"]["model_name"] == "quokka-from-the-ui"
    # everything not touched is the deployment's value
    for section in ("model", "data", "eval"):
        assert params[section] == manual.parameters["params"][section]
    assert (SHOTS / "submitted-run.png").stat().st_size > 10_000


def test_the_run_form_lists_what_an_operator_changes_first(service, page):
    """The form as drawn (flows/form.py): the sections model, data, sft, release lead, each with its
    operator fields first; every other field and section follows, its label ending in "(advanced)"."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(service.api_url) as client:
        manual = client.read_deployment_by_name("retrain/manual")
    page.goto(f"{service.ui_url}/deployments/deployment/{manual.id}/run")
    page.locator("span.schema-form-property__label").first.wait_for()
    labels = [
        re.sub(r" \(Optional\)$", "", text.strip())
        for text in page.locator("span.schema-form-property__label").all_inner_texts()
    ]
    at = {label: i for i, label in reversed(list(enumerate(labels)))}  # the first place each label is drawn
    sections = ["Model", "Data", "Sft", "Release", "Grpo (advanced)", "Merge (advanced)", "Eval (advanced)"]
    assert [at[s] for s in sections] == sorted(at[s] for s in sections), labels[:40]
    assert at["Base"] < at["Revision (advanced)"] < at["Data"] < at["Datasets"] < at["Hub (advanced)"]
    assert at["Sft"] < at["Max Steps"] < at["Lora Rank (advanced)"] < at["Release"]
    assert at["Artifact Root (advanced)"] > at["Release"]
