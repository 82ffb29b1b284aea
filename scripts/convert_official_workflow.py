"""Convert a workflow made with the official ComfyUI-ELLA pack to ELLA Nodes.

    python scripts/convert_official_workflow.py IN OUT.json

IN is a UI-format workflow (.json) or a PNG with the workflow embedded. OUT is written as UI-format JSON:
drag it into ComfyUI. Official nodes that cannot be converted exactly are kept, with a Note beside them,
and listed here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

# The converter is plain JSON work: load `ella/` as a bare package, without its __init__ (which loads torch)
_package = importlib.util.module_from_spec(importlib.util.spec_from_loader("ella", loader=None, is_package=True))
_package.__path__ = [str(Path(__file__).resolve().parents[1] / "ella")]
sys.modules.setdefault("ella", _package)

from ella.official_workflow import ConversionError, NothingToConvert, convert, read_workflow  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="workflow .json or .png from ComfyUI-ELLA")
    parser.add_argument("target", type=Path, help="where to write the converted workflow (.json)")
    args = parser.parse_args(argv)
    try:
        result = convert(read_workflow(args.source), name=str(args.source))
    except NothingToConvert as e:
        print(f"{args.source}: {e} Nothing written.", file=sys.stderr)
        return 1
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.target.resolve() == args.source.resolve():
        print("error: OUT must not be IN; the original is kept as it is.", file=sys.stderr)
        return 2
    args.target.write_text(json.dumps(result.workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"converted {len(result.converted)} ComfyUI-ELLA node(s) from {args.source} into {args.target}:")
    for line in result.converted:
        print(f"  {line}")
    if result.kept:
        print(f"{len(result.kept)} node(s) could not be converted; kept as they were, each with a Note in the graph:")
        for line in result.kept:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
