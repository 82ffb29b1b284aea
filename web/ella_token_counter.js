// ELLA token counter: under each ELLA Text Encode prompt, the T5 token count and the mode, updated as you type.
// Counts come from the pack's POST /ella/tokens route; no model weights are loaded for counting.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ENCODE = "EllaNodes_TextEncode";
const LOAD_T5 = "EllaNodes_LoadT5Encoder";
const COUNTER = "ella_token_count"; // widget name and type; never saved in widgets_values
const ROUTE = "/ella/tokens";
const DEBOUNCE_MS = 300;
const BUSY_RETRY_MS = 1500; // the route answers 503 while its pool is full: ask again after this
const HEIGHT = 40; // widget height in canvas units; the frontends keep a 10-unit margin above and below
const counters = new Set();

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);

/** The t5_name chosen on the Load T5 Encoder (ELLA) node feeding `node`'s t5 input (through reroutes), or null. */
function selectedT5(node) {
  let current = node;
  let slot = node.inputs?.findIndex((input) => input.name === "t5") ?? -1;
  for (let hops = 0; hops < 16 && slot >= 0; hops++) {
    const source = current.getInputNode?.(slot);
    if (!source) return null;
    if (source.type === LOAD_T5) return widgetOf(source, "t5_name")?.value ?? null;
    if (source.type !== "Reroute") return null;
    current = source;
    slot = 0;
  }
  return null;
}

/** What the counter says for a reply of the route: {text, state, title}. */
function describe(reply, t5Name) {
  if (reply.error) return { text: `Token count unavailable: ${reply.error}`, state: "error", title: reply.error };
  if (reply.tokens == null) {
    return { text: "No T5 tokenizer available to count tokens", state: "none", title: reply.message ?? "" };
  }
  const source = reply.tokenizer === "t5" ? `tokenizer of ${t5Name}` : "T5 tokenizer shipped with ComfyUI";
  const title = `${reply.tokens} T5 tokens (end token included), counted with the ${source}`;
  if (reply.cut > 0) {
    return { text: `${reply.tokens} / ${reply.limit} tokens · ${reply.cut} cut`, state: "cut",
      title: `${title}; the last ${reply.cut} are cut (${reply.mode} mode reads ${reply.limit})` };
  }
  if (reply.mode === "fixed") return { text: `${reply.tokens} / ${reply.limit} tokens · fixed`, state: "ok", title };
  return { text: `${reply.tokens} ${reply.tokens === 1 ? "token" : "tokens"} · flexible`, state: "ok", title };
}

async function fetchCount(body) {
  const response = await api.fetchApi(ROUTE, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const reply = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  return { status: response.status, ...reply };
}

/** The counter of one ELLA Text Encode node: a DOM line under its widgets, refreshed with a debounce. */
class Counter {
  constructor(node) {
    this.node = node;
    this.sequence = 0;
    this.timer = null;
    this.element = document.createElement("div");
    this.element.className = "ella-token-count";
    Object.assign(this.element.style, {
      font: "12px sans-serif", lineHeight: "18px", padding: "0 6px", borderRadius: "4px", whiteSpace: "nowrap",
      overflow: "hidden", textOverflow: "ellipsis", color: "var(--input-text, #ddd)", boxSizing: "border-box",
    });
    this.element.textContent = "counting T5 tokens…";
    const options = { getMinHeight: () => HEIGHT, getMaxHeight: () => HEIGHT, getHeight: () => HEIGHT,
      hideOnZoom: true, serialize: false };
    this.widget = node.addDOMWidget(COUNTER, COUNTER, this.element, options);
    this.widget.serialize = false; // the frontend leaves it out of widgets_values and the prompt
  }

  schedule() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), DEBOUNCE_MS);
  }

  async refresh() {
    const sequence = ++this.sequence;
    const fixed = widgetOf(this.node, "token_length")?.value === "fixed";
    const t5Name = selectedT5(this.node);
    const body = { text: String(widgetOf(this.node, "text")?.value ?? ""), t5_name: t5Name,
      max_length: fixed ? Number(widgetOf(this.node, "fixed_tokens")?.value) : null };
    let reply;
    let note = "";
    try {
      reply = await fetchCount(body);
      if (reply.status === 404 && reply.field === "t5_name") { // a workflow naming a T5 this machine lacks
        note = ` (T5 ${t5Name} not found here)`;
        reply = await fetchCount({ ...body, t5_name: null });
      }
    } catch (error) {
      reply = { error: String(error) };
    }
    if (sequence !== this.sequence) return; // a newer request is under way
    if (reply.status === 503) { // the server is busy counting: keep the last count and ask again shortly
      this.element.title = `${reply.error ?? "busy"}; asking again`;
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.refresh(), BUSY_RETRY_MS);
      return;
    }
    this.show(describe(reply, t5Name), note);
  }

  show({ text, state, title }, note) {
    const cut = state === "cut";
    this.element.textContent = text;
    this.element.title = title + note;
    this.element.dataset.state = state;
    this.element.classList.toggle("ella-token-count--cut", cut);
    Object.assign(this.element.style, {
      color: cut || state === "error" ? "#ffb347" : "var(--input-text, #ddd)",
      fontWeight: cut ? "bold" : "normal",
      background: cut ? "rgba(255, 140, 0, 0.18)" : "transparent",
      opacity: state === "ok" || cut ? "1" : "0.7",
    });
  }
}

const chain = (object, key, extra) => {
  const original = object[key];
  object[key] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
};

function attach(node) {
  if (node.ellaCounter) return;
  const counter = new Counter(node);
  node.ellaCounter = counter;
  counters.add(counter);
  // every frontend's prompt textarea (canvas or Vue node) reports typing through the widget's callback
  for (const name of ["text", "token_length", "fixed_tokens"]) {
    const widget = widgetOf(node, name);
    if (widget) chain(widget, "callback", () => counter.schedule());
  }
  chain(node, "onRemoved", () => counters.delete(counter));
  counter.schedule();
}

app.registerExtension({
  name: "EllaNodes.TokenCounter",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === ENCODE) {
      chain(nodeType.prototype, "onConnectionsChange", function () { this.ellaCounter?.schedule(); });
      chain(nodeType.prototype, "onConfigure", function () { this.ellaCounter?.schedule(); });
    }
    if (nodeData.name === LOAD_T5) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        const widget = widgetOf(this, "t5_name");
        if (widget) chain(widget, "callback", () => counters.forEach((c) => c.schedule()));
      });
    }
  },
  nodeCreated(node) {
    if (node.comfyClass === ENCODE || node.type === ENCODE) attach(node);
  },
});
