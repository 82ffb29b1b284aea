"""The README's screenshot, docs/workflow.png: what a newcomer sees on the embedded host.

    python tests/screenshot.py [OUT.png]

A real server with the tiny test models, started as the browser tests start it; headless Chromium (1920x1200)
opens the page on a first visit, closes the template browser and the Nodes 2.0 banner as a person would, drops
workflows/ella_text_to_image.json onto the canvas, closes the first visit's empty tab, clicks Fit View and waits
for the token counter to read the route's count. The raw capture goes to test-artifacts/, the palette PNG to OUT
(docs/workflow.png by default). Not collected by the suite (the name has no test_ prefix)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # as conftest.py does, for `python tests/screenshot.py`

DOCS = TESTS.parent / "docs" / "workflow.png"

if __name__ == "__main__":  # run this file as pytest's only test (before the imports below, which pytest makes)
    out = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else DOCS
    if out == DOCS and (os.environ.get("ELLA_COMFYUI") or os.environ.get("ELLA_FRONTEND_ROOT")):
        sys.exit("docs/workflow.png shows the embedded host: unset ELLA_COMFYUI and ELLA_FRONTEND_ROOT")
    os.environ["ELLA_SCREENSHOT_OUT"] = str(out)
    os.chdir(TESTS.parent)
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))

from comfy_host import ROOT  # noqa: E402
from test_server import server  # noqa: E402, F401  (the browser tests' real server)

WORKFLOW = ROOT / "workflows" / "ella_text_to_image.json"
OUT = Path(os.environ.get("ELLA_SCREENSHOT_OUT", DOCS))
WINDOW = (1920, 1200)
DROP = """
const [name, text] = arguments;
const data = new DataTransfer();
data.items.add(new File([text], name, {type: "application/json"}));
const canvas = document.querySelector("#graph-canvas");
for (const type of ["dragenter", "dragover", "drop"]) {
  canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
}
"""
BANNER_CLOSE = """
return [...document.querySelectorAll("button")].find((b) => b.getClientRects().length
  && b.querySelector("i[class*='lucide--x']") && b.parentElement.innerText.includes("Introducing Nodes 2.0")) ?? null;
"""
BLANK_TAB = """
return [...document.querySelectorAll(".workflow-tabs .workflow-tab")].find(
  (e) => e.querySelector(".workflow-label")?.innerText.trim() === "Unsaved Workflow") ?? null;
"""
OUT_OF_VIEW = """
const ds = app.canvas.ds, el = app.canvas.canvas;
return app.graph._nodes.filter((n) => {
  const [x, y, w, h] = n.boundingRect;
  const [left, top] = ds.convertOffsetToCanvas([x, y]), [right, bottom] = ds.convertOffsetToCanvas([x + w, y + h]);
  return left < 0 || top < 0 || right > el.clientWidth || bottom > el.clientHeight;
}).map((n) => n.type);
"""
TABS = """
return [...document.querySelectorAll(".workflow-tabs .workflow-label")]
  .filter((e) => e.getClientRects().length).map((e) => e.innerText.trim());
"""


def test_screenshot(server, tmp_path_factory):  # noqa: F811
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from test_browser import (ARTIFACTS, close_dialogs, counter, encode_nodes, expected_label, open_page,
                              route_count, wait, wait_for_label)

    workflow = json.loads(WORKFLOW.read_text())
    with open_page(server.url, tmp_path_factory.mktemp("chromium-profile")) as page:  # template browser closed
        page.set_window_size(*WINDOW)
        banner = page.execute_script(BANNER_CLOSE)
        if banner:
            banner.click()
        page.execute_script(DROP, WORKFLOW.name, WORKFLOW.read_text())
        wait(lambda: page.execute_script("return app.graph._nodes.length") == len(workflow["nodes"]), 20,
             "the dropped workflow never loaded")
        close_dialogs(page)
        # the dropped file opens in a tab of its own, next to the first visit's empty "Unsaved Workflow": close that
        blank = page.execute_script(BLANK_TAB)
        ActionChains(page).move_to_element(blank).pause(0.5).perform()  # the tab's X shows on hover
        page.execute_script("arguments[0].click()", blank.find_element("css selector", ".close-button"))
        wait(lambda: page.execute_script(TABS) == ["ella_text_to_image"], 10, "not one workflow tab")
        close_dialogs(page)
        page.find_element("css selector", "button[aria-label^='Fit View']").click()
        wait(lambda: not page.execute_script(OUT_OF_VIEW), 10, "the graph does not fit in view")
        first = encode_nodes(workflow)[0]
        wait_for_label(page, first["id"], expected_label(route_count(server, *first["widgets_values"])))
        wait(lambda: counter(page, first["id"])["shown"], 10, "the counter is not drawn at the fitted zoom")
        time.sleep(1)  # the canvas settles
        ARTIFACTS.mkdir(exist_ok=True)
        raw = ARTIFACTS / "workflow-screenshot.png"
        page.save_screenshot(str(raw))
    image = Image.open(raw).convert("RGB").quantize(colors=256)
    image.save(OUT, optimize=True)
    print(f"{OUT}: {image.size[0]}x{image.size[1]}, {OUT.stat().st_size // 1024} KB")
