"""Say which ELLA model files a ComfyUI is missing and where to put them (names, sizes, links)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ELLA_FILE = "ella-sd1.5-tsc-t5xl.safetensors"
T5_FOLDER = "models--google--flan-t5-xl--text_encoder"
LINK = "https://huggingface.co/QQGYLab/ELLA/tree/main"
T5_DIRS = ("text_encoders", "clip", "ella_encoder")


def missing(models_dirs: list[Path]) -> list[str]:
    """One line of advice per missing file; empty when everything is in place."""
    def found(sub: str, pattern: str) -> bool:
        return any(any((d / sub).glob(pattern)) for d in models_dirs if (d / sub).is_dir())

    advice = []
    if not found("ella", ELLA_FILE):
        advice.append(f"models/ella/{ELLA_FILE}  (134 MB)  from {LINK}")
    if not any(found(sub, T5_FOLDER) or found(sub, "*t5*") for sub in T5_DIRS):
        advice.append(f"models/text_encoders/{T5_FOLDER}/  (folder, about 2.4 GB)  from {LINK}")
    if not found("checkpoints", "*.safetensors"):
        advice.append("models/checkpoints/<any SD1.5 checkpoint>.safetensors  (2-4 GB)")
    return advice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path, help="ComfyUI models folders to look in")
    folders = parser.parse_args().models
    advice = missing(folders)
    if advice:
        lines = ["ELLA: these model files are missing; the workflows need them:"]
        lines += ["  - " + line for line in advice]
        lines.append("Put them under one of: " + ", ".join(str(p) for p in folders))
    else:
        lines = ["ELLA: model files found."]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
