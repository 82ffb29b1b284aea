// Workflows made with the official ComfyUI-ELLA pack: when one is loaded and that pack is not installed, offer to
// convert it to ELLA Nodes. The conversion is the pack's POST /ella/convert_official route: the same converter and
// mapping table (official_ella_nodes.json, read here for the node types) as scripts/convert_official_workflow.py.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TABLE = new URL("./official_ella_nodes.json", import.meta.url);
const ROUTE = "/ella/convert_official";
const KEPT_MARK = "ella_conversion"; // property of an official node kept by an earlier conversion
let officialTypes = null; // node types of the official pack, from the mapping table
let pending = null; // a copy of the workflow being loaded, while it holds official nodes this page lacks

async function loadOfficialTypes() {
  try {
    const response = await fetch(TABLE);
    return Object.keys((await response.json()).official ?? {});
  } catch (error) {
    console.warn("EllaNodes.OfficialWorkflows: the mapping table could not be read", error);
    return [];
  }
}

/** The official nodes in `graphData` that no installed pack provides (and no earlier conversion kept). */
function unconverted(graphData) {
  const nodes = Array.isArray(graphData?.nodes) ? graphData.nodes : [];
  return nodes.filter((node) => officialTypes?.includes(node?.type) && !LiteGraph.registered_node_types[node.type]
    && !node.properties?.[KEPT_MARK]);
}

async function ask(message) {
  const answer = await app.extensionManager.dialog.confirm({ title: "Convert to ELLA Nodes?", message, type: "default" });
  return answer === true;
}

function tell(title, message) {
  app.extensionManager.toast.add({ severity: "warn", summary: title, detail: message, life: 15000 });
}

async function offer(workflow, count) {
  const ok = await ask(`This workflow uses ${count} node(s) of the official ComfyUI-ELLA pack, which is not `
    + "installed. Convert it to ELLA Nodes? Set ELLA Timesteps and ELLA Encode go (the sampler's own settings "
    + "rule), the other nodes are replaced with their settings, and everything else stays as it is.");
  if (!ok) return;
  let reply;
  try {
    const response = await api.fetchApi(ROUTE, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(workflow),
    });
    reply = await response.json();
    if (!response.ok) throw new Error(reply.error ?? `HTTP ${response.status}`);
  } catch (error) {
    tell("ELLA: the workflow was not converted", String(error.message ?? error));
    return;
  }
  await app.loadGraphData(reply.workflow);
  if (reply.kept?.length) {
    tell("ELLA: some nodes were kept as they were",
      `${reply.kept.join("\n")}\nEach has a Note beside it in the graph.`);
  }
}

app.registerExtension({
  name: "EllaNodes.OfficialWorkflows",
  async setup() {
    officialTypes = await loadOfficialTypes();
  },
  async beforeConfigureGraph(graphData) {
    pending = null;
    const found = unconverted(graphData);
    if (found.length) pending = { workflow: JSON.parse(JSON.stringify(graphData)), count: found.length };
  },
  async afterConfigureGraph() {
    if (!pending) return;
    const { workflow, count } = pending;
    pending = null;
    setTimeout(() => offer(workflow, count), 0); // once the load that called us is over
  },
});
