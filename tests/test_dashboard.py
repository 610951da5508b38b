"""The dashboard (docs/dashboard.md): served by the gateway from its own files (offline: no asset names another
host), refused politely when admin features are off, and driven end to end in a real headless Chromium against a
real gateway: sign in, create a key with a small budget, send traffic with it through a cascade route, read the
figures back in the Overview, Funnel, Judge, What-if and Traces views, spend the budget to a 429 and see the key
exhausted.

The browser is the system's chromium (`make services` installs it with apt), driven by Playwright; Playwright's
own browser downloads are never used. Without chromium the browser test skips, and fails under CI=true.
Screenshots go to the test's tmp folder, and to $FRUGAL_SCREENSHOTS too when set (docs/img for the docs)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.admin import AdminGuard
from gateway.dashboard import CONTENT_TYPES, dashboard_routes, load_assets
from scorer.fit.dataset import Grid
from tests.cascade_data import MODELS
from tests.harness import REPO, Gateway, Service, missing_data, model_entry, wait_until

ADMIN_KEY = "sk-admin-dashboard-test"
ROUTE = "frugal/auto"
STATIC = REPO / "gateway" / "dashboard" / "static"
CHROMIUM = Path(os.environ.get("FRUGAL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Names in the assets that look like addresses but are never fetched.
NOT_FETCHED = {"http://www.w3.org/2000/svg"}  # the SVG namespace


# -- serving ------------------------------------------------------------------------------------------------------
def client(secret: str) -> TestClient:
    app = FastAPI()
    app.include_router(dashboard_routes(AdminGuard(secret)))
    return TestClient(app)


def test_the_page_and_its_assets_are_served_with_their_types_and_cache_headers() -> None:
    web = client(ADMIN_KEY)
    for path in ("/admin", "/admin/"):
        page = web.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache" and page.headers["etag"]
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert 'type="password"' in page.text  # the page asks for the admin key; loading it needs none
    referenced = re.findall(r'(?:src|href)="(/admin/static/[^"]+)"', web.get("/admin").text)
    assert sorted(referenced) == ["/admin/static/app.js", "/admin/static/style.css"]
    for path, kind in (("/admin/static/app.js", "text/javascript"), ("/admin/static/style.css", "text/css")):
        asset = web.get(path)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert asset.content == (STATIC / path.rsplit("/", 1)[1]).read_bytes()
        again = web.get(path, headers={"if-none-match": asset.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    # every file of the folder is served (and is a type the server knows)
    assert set(load_assets()) == {p.name for p in STATIC.iterdir() if p.is_file()}
    assert {p.suffix for p in STATIC.iterdir()} <= set(CONTENT_TYPES)


@pytest.mark.parametrize("path", ["/admin/static/../__init__.py", "/admin/static/%2e%2e/__init__.py",
                                  "/admin/static/..%2f__init__.py", "/admin/static/%2e%2e%2f%2e%2e%2fadmin.py",
                                  "/admin/static/..%5c__init__.py", "/admin/static/static", "/admin/static/",
                                  "/admin/static/index.html", "/admin/static/APP.JS", "/admin/static/nope.js",
                                  "/admin/static/%2fetc%2fpasswd", "/admin/static/%2e%2e"])
def test_only_the_files_of_the_static_folder_are_served(path: str) -> None:
    response = client(ADMIN_KEY).get(path)
    assert response.status_code == 404, (path, response.text[:200])
    assert "import" not in response.text and "root:" not in response.text


def test_with_admin_features_off_the_page_says_how_to_turn_them_on() -> None:
    web = client("")  # no admin key: AdminGuard is disabled
    for path in ("/admin", "/admin/"):
        page = web.get(path)
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        assert "Admin features are off" in page.text and "FRUGAL_ADMIN_KEY" in page.text
    assert web.get("/admin/static/app.js").status_code == 404


def test_no_asset_names_another_host() -> None:
    """The offline rule: the page, its script and its stylesheet load nothing from anywhere but the gateway."""
    for path in sorted(STATIC.iterdir()):
        text = path.read_text()
        addresses = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"'`<>)]*", text, flags=re.IGNORECASE))
        assert addresses - NOT_FETCHED == set(), path.name
        assert "@import" not in text and "url(" not in text.replace("new URL(", ""), path.name
        assert not re.search(r"<(?:script|link|img|iframe)[^>]+(?:src|href)=\"(?!/admin/static/)", text), path.name


def test_the_openapi_document_leaves_the_pages_out() -> None:
    app = FastAPI()
    app.include_router(dashboard_routes(AdminGuard(ADMIN_KEY)))
    assert not [p for p in app.openapi()["paths"] if p.startswith("/admin")]


# -- the browser ------------------------------------------------------------------------------------------------------
def _models(url: str) -> list[dict[str, Any]]:
    return [model_entry(name, name, url, transport="http", max_retries=0, input_cost_per_token=price / 40,
                        output_cost_per_token=price / 40) for name, _, price in MODELS]


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415
    except ImportError:
        missing_data("playwright is not installed: run `make install-test`")
    if not CHROMIUM.is_file():
        missing_data(f"no browser at {CHROMIUM}: run `make services` (apt-get install -y chromium), "
                     "or point FRUGAL_CHROMIUM at a Chromium binary")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Shots:
    """Screenshots to the test's tmp folder, and to $FRUGAL_SCREENSHOTS (relative: to the repository) too."""

    def __init__(self, tmp: Path) -> None:
        self.folder = tmp / "screenshots"
        self.folder.mkdir()
        extra = os.environ.get("FRUGAL_SCREENSHOTS")
        self.extra = (REPO / extra if not Path(extra).is_absolute() else Path(extra)) if extra else None
        if self.extra:
            self.extra.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, name: str, full_page: bool = True) -> Path:
        path = self.folder / f"dashboard-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        if self.extra:
            shutil.copy(path, self.extra / path.name)
        return path


def _ask(gateway: Gateway, secret: str, grid: Grid, q: int) -> httpx.Response:
    body = {"model": ROUTE, "messages": [{"role": "user", "content": grid.queries[q % len(grid.queries)]}],
            "max_tokens": 4}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {secret}"})


def _text(page: Any, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def _until_shown(page: Any, selector: str, check: Callable[[str], bool], what: str, timeout_s: float = 30) -> str:
    """Refresh the view (the button does what the 10 s timer does) until `selector`'s text passes `check`."""
    seen = {"text": ""}

    def shown() -> bool:
        page.click("#refresh")
        page.wait_for_timeout(300)
        locator = page.locator(selector)
        seen["text"] = locator.first.inner_text() if locator.count() else ""
        return check(seen["text"])

    try:
        wait_until(shown, timeout_s, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last text: {seen['text']!r}") from exc
    return seen["text"]


def test_the_dashboard_tells_the_story_of_real_traffic_in_a_real_browser(
        browser: Any, make_gateway: Callable[..., Gateway], synthetic, synthetic_standin: Service,
        tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway({"models": _models(synthetic_standin.url),
                            # shadow audits label accepted answers: the judge view's learning estimate
                            "routes": [{"name": ROUTE, "kind": "cascade", "cascade": str(cascade),
                                        "learning": {"audit_rate": 1.0, "audit_budget_usd": 100.0}}],
                            "ledger": {"store_content": True},
                            "artifacts": {"dir": str(tmp_path / "artifacts"), "watch_interval_s": 0.2}},
                           {"FRUGAL_ADMIN_KEY": ADMIN_KEY})
    tiers = [t["model"] for t in yaml.safe_load(cascade.read_text())["chosen"]["tiers"]]
    shots = Shots(tmp_path)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    elsewhere: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(gateway.url) else elsewhere.append(r.url))
    page.on("console", lambda m: problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))

    # -- sign in: a client's key is refused with the API's own message, the admin key lets in
    page.goto(gateway.url + "/admin")
    page.fill("#login-key", "sk-test-frugal")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:not([hidden])")
    assert _text(page, "#login-error") == "This key may not use the admin API."
    shots.take(page, "sign-in")
    page.fill("#login-key", ADMIN_KEY)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("[data-kpi=requests]")
    assert page.evaluate("sessionStorage.getItem('frugal.adminKey')") == ADMIN_KEY
    assert _text(page, "[data-kpi=requests] .value") == "0"
    assert "No requests in the last 24 hours" in _text(page, "#view")  # a fresh gateway: nothing, said plainly
    shots.take(page, "empty")

    # -- create a key with a small budget in the Keys view; its secret is shown once
    page.click("#tabs a[data-view=keys]")
    page.wait_for_selector("#create-key")
    page.fill("#k-name", "e2e-budgeted")
    page.select_option("#k-period", "total")
    page.fill("#k-limit", "0.004")
    page.click("#create-key-button")
    page.wait_for_selector("#new-key-secret")
    secret = page.input_value("#new-key-secret")
    assert secret.startswith("sk-frugal-")
    assert "shown this once" in _text(page, "#new-key")
    row = page.locator("#key-list tr[data-key]")
    assert row.count() == 1 and "e2e-budgeted" in row.first.inner_text()
    key_id = row.first.get_attribute("data-key")
    assert "$0 of $0.004" in _text(page, "#key-list [data-period=total]")
    shots.take(page, "key-created")

    # -- traffic through the cascade with that key
    sent = 8
    answered = [_ask(gateway, secret, grid, q) for q in range(sent)]
    assert [r.status_code for r in answered] == [200] * sent, answered[-1].text
    request_ids = [r.headers["x-request-id"] for r in answered]
    for request_id in request_ids:
        gateway.ledger_row(request_id)

    # -- Overview: the requests, their spend and what the cascade saved against always asking the top model
    page.click("#tabs a[data-view=overview]")
    _until_shown(page, "[data-kpi=requests] .value", lambda t: t == str(sent), f"{sent} requests in the overview")
    spend = _text(page, "[data-kpi=spend] .value")
    assert spend.startswith("$") and spend != "$0"
    assert _text(page, "[data-kpi=saved] .value").startswith("$")
    assert page.locator("#view svg.chart").count() >= 3
    shots.take(page, "overview")
    page.click("#window button[data-window='30d']")  # by day: the same totals
    _until_shown(page, "#view h1 + span", lambda t: "by day" in t, "the 30-day window")
    assert _text(page, "[data-kpi=requests] .value") == str(sent)
    shots.take(page, "overview-30d")
    page.click("#window button[data-window='24h']")

    # -- Funnel: every request enters tier 1, and what tier 1 accepted plus what later tiers accepted adds up
    page.click("#tabs a[data-view=funnel]")
    _until_shown(page, "[data-step=requests] .figures", lambda t: t == f"{sent} requests", "the funnel")
    tier1 = _text(page, "[data-step=tier-1] .figures")
    assert f"reached {sent}" in tier1, tier1
    assert tiers[0] in _text(page, "[data-step=tier-1] .name")
    story = _text(page, ".story")
    assert story.startswith(f"Of {sent} requests, 0 were answered from the cache"), story
    shots.take(page, "funnel")

    # -- Judge: a histogram per judged tier, with its threshold line
    page.click("#tabs a[data-view=judge]")
    page.wait_for_selector("#judge [data-tier='1'] svg.chart")
    assert page.locator("#judge [data-tier='1'] line.threshold").count() == 1
    estimate = _until_shown(page, "#judge [data-tier='1'] dl.facts", lambda t: "(95%:" in t, "the learning estimate")
    assert "Label coverage" in estimate and "Audited answers\t0 " not in estimate
    shots.take(page, "judge")

    # -- Traces: the key's requests, and one request's tiers on a timeline
    page.click("#tabs a[data-view=traces]")
    page.fill("#q-key", key_id)
    page.click("#trace-search button[type=submit]")
    wait_until(lambda: page.locator("#trace-list tr[data-id]").count() == sent, 20, "the key's traces")
    listed = page.locator("#trace-list tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert sorted(listed) == sorted(request_ids)
    # the most telling request: one the top tier answered (every tier on the timeline), if any did
    deepest = next((r.headers["x-request-id"] for r in answered if r.headers.get("x-frugal-model") == tiers[-1]),
                   request_ids[0])
    page.locator(f"#trace-list tr[data-id='{deepest}']").click()
    page.wait_for_selector("#timeline")
    assert deepest in _text(page, "#trace-detail h2")
    timeline = page.locator("#timeline").text_content()
    assert f"T1 {tiers[0]}" in timeline and "score" in timeline
    shots.take(page, "trace")

    # -- spend the budget: the gateway refuses with 429 budget_exceeded, and the key's page says exhausted
    refused = None
    for q in range(sent, sent + 400):
        reply = _ask(gateway, secret, grid, q)
        if reply.status_code == 429:
            refused = reply
            break
        assert reply.status_code == 200, reply.text
    assert refused is not None, "the budget never ran out"
    assert refused.json()["error"]["code"] == "budget_exceeded"
    page.goto(f"{gateway.url}/admin#keys/{key_id}")
    page.wait_for_selector("#key-detail:not([hidden]) #key-budgets")
    _until_shown(page, "#key-budgets [data-period=total]", lambda t: "EXHAUSTED" in t.upper(), "the exhausted budget")
    assert page.locator("#key-budgets [data-exhausted=true] .badge.exhausted").count() == 1
    assert _text(page, "#key-detail h2 .badge").lower() == "budget exhausted"
    assert "refusing requests" in _text(page, "#key-budgets")
    # the list says so too: the API marks a budget that refused the last request as exhausted
    assert "budget exhausted" in _text(page, f"#key-list tr[data-key='{key_id}']").lower()
    shots.take(page, "key-exhausted")

    # A key refused by its team's budget: its page shows the team's budgets, exhausted.
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    team = httpx.post(gateway.url + "/admin/teams", headers=admin,
                      json={"name": "tight team", "budgets": [{"period": "month", "limit_usd": 0.000001}]}).json()
    member = httpx.post(gateway.url + "/admin/keys", headers=admin, json={"name": "member", "team_id": team["id"]})
    assert _ask(gateway, member.json()["key"], grid, 0).status_code == 429
    page.goto(f"{gateway.url}/admin#keys/{member.json()['id']}")
    detail = _until_shown(page, "#key-detail", lambda t: "Its team's budgets" in t, "the team's budgets")
    assert "Refusing requests for its team's budget" in detail and "EXHAUSTED" in detail.upper()
    assert _text(page, "#key-detail h2 .badge").lower() == "budget exhausted"
    shots.take(page, "key-team")

    # -- What-if: the frontier with the live point; a budget proposes thresholds, applied after a confirm step
    page.click("#tabs a[data-view=whatif]")
    page.wait_for_selector("#frontier-chart #current-point")
    slider = page.locator("#budget-slider")
    slider.evaluate("s => { s.value = 350; s.dispatchEvent(new Event('input')); }")
    page.wait_for_selector("#frontier-chart #proposal-point")
    shots.take(page, "whatif")
    if page.locator("#apply").count():
        page.click("#apply")
        page.wait_for_selector("#confirm")
        page.click("#confirm-apply")
        page.wait_for_selector("#apply-result")
        assert _text(page, "#apply-result").startswith(f"Applied: {ROUTE} now serves version v0"), \
            _text(page, "#apply-result")
        shots.take(page, "whatif-applied")

    # -- the audit log names the dashboard as the actor of its changes
    page.click("#tabs a[data-view=audit]")
    page.wait_for_selector("#audit-list table")
    audit = _text(page, "#audit-list")
    assert "key.create" in audit and "admin (dashboard)" in audit
    shots.take(page, "audit")

    # -- readable on a 1366x768 laptop screen: no view overflows sideways
    page.set_viewport_size({"width": 1366, "height": 768})
    for view, ready in (("overview", "[data-kpi=requests]"), ("funnel", "[data-step=requests]"),
                        ("judge", "#judge svg.chart"), ("whatif", "#frontier-chart"),
                        ("traces", "#trace-list table"), ("keys", "#key-list table"), ("audit", "#audit-list table")):
        page.click(f"#tabs a[data-view={view}]")
        page.wait_for_selector(ready)
        time.sleep(0.2)
        assert page.evaluate("document.documentElement.scrollWidth") <= 1366, view
        shots.take(page, f"{view}-1366", full_page=False)

    # -- the view refreshes itself (here every second: ?refresh=1), and not while the tab is hidden
    overview_calls: list[str] = []
    page.on("request", lambda r: overview_calls.append(r.url) if "/admin/analytics/overview" in r.url else None)
    page.goto(f"{gateway.url}/admin?refresh=1#overview")
    page.wait_for_selector("[data-kpi=requests]")
    page.wait_for_timeout(3500)
    assert len(overview_calls) >= 3, overview_calls  # signed in still (sessionStorage), refreshing
    page.evaluate("Object.defineProperty(document, 'hidden', {get: () => true, configurable: true})")
    page.wait_for_timeout(1200)
    hidden_from = len(overview_calls)
    page.wait_for_timeout(3000)
    assert len(overview_calls) == hidden_from  # paused while hidden

    # -- signing out forgets the key
    page.click("#sign-out")
    assert page.evaluate("sessionStorage.getItem('frugal.adminKey')") is None
    assert page.locator("#login").is_visible()
    assert elsewhere == [], elsewhere  # offline: the page asked nothing of any other host
    assert problems == [], problems
    context.close()
