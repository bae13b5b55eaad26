"""The demo build's report.html in headless chromium: no console errors, no network, the counts of
manifest.json, every thumbnail loaded, every reason in the funnel with its examples."""
import json
import os

import pytest

from tests.browser import browser, demo_build, open_page, watch  # noqa: F401  (browser is a fixture)


@pytest.fixture(scope="module")
def demo(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_report")
    demo_build(corpus[0], out)
    with open(os.path.join(out, "manifest.json")) as fh:
        return str(out), json.load(fh)


def test_report_renders_in_chromium(browser, demo, tmp_path):  # noqa: F811
    out, manifest = demo
    page = open_page(browser, viewport={"width": 1280, "height": 900})
    problems = watch(page)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto("file://" + os.path.join(out, "report.html"))
    page.wait_for_load_state("load")
    shown = {el.get_attribute("data-count"): int(el.inner_text()) for el in page.query_selector_all("[data-count]")}
    assert shown == {"records": manifest["records"], **manifest["counts"]}
    images = page.evaluate("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt])")
    assert len(images) >= 10 and all(ok for ok, _ in images), [alt for ok, alt in images if not ok]
    reasons = {b.inner_text() for b in page.query_selector_all("button.reason")}
    expected = {r for status in ("filtered", "failed") for r in manifest["reasons"][status]}
    assert expected and reasons == expected
    for r in sorted(expected):  # a click shows the examples of the samples the reason removed
        button = page.locator(f'button.reason:text-is("{r}")')
        examples = page.locator("#" + button.get_attribute("data-target"))
        assert not examples.is_visible()
        button.click()
        assert examples.is_visible() and examples.locator(".card").count() >= 1
    assert page.locator("svg").count() >= 4  # plots and the embedding map
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert not problems, problems
    assert all(u.startswith(("file:", "data:")) for u in requests), [u[:80] for u in requests]
    page.close()
