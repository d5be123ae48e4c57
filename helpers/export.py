"""Export a trained run: the adapter merged into its base (plain transformers), and GGUF for llama.cpp.

    python -m helpers.export --run runs/offline --merged runs/offline/merged
    python -m helpers.export --run runs/offline --gguf runs/offline/gguf          # merges first
    python -m helpers.export --model runs/offline/merged --gguf runs/offline/gguf  # from a merged folder

``helpers.exports.merge`` writes the merged folder (and checks it against the adapter on held-out rows);
``helpers.exports.llama_cpp`` converts it with llama.cpp's own converter, unpatched. Taught in notebook 06.
"""

from __future__ import annotations

import argparse
import json
import sys

from helpers.exports.llama_cpp import LlamaCppError, export_gguf
from helpers.exports.merge import DEFAULT_CHECK_SIZE, ExportError, check_target, export_merged
from helpers.run.folder import EXPORT_RECORD, MERGED, RunFolderError, read_merged, read_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="the run folder (helpers.runner --output-dir) whose adapter is exported")
    parser.add_argument("--model", help="an existing merged folder (for --gguf without merging again)")
    parser.add_argument("--merged", help=f"write the merged model here (default with --run: RUN_DIR/{MERGED})")
    parser.add_argument("--gguf", help="also convert to GGUF for llama.cpp / Ollama into this folder")
    parser.add_argument("--llama-cpp", help="a llama.cpp checkout or the extracted llama-cpp-python sdist "
                                            "(default: the copy under artifacts/llama-cpp, fetched with pip)")
    parser.add_argument("--check-size", type=int, default=DEFAULT_CHECK_SIZE,
                        help="held-out rows on which the merged model is compared with the adapter (0: none)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if bool(args.run) == bool(args.model):
            raise ExportError("give --run RUN_DIR (merge its adapter) or --model MERGED_DIR (convert it), not both")
        if args.model and not args.gguf:
            raise ExportError("--model MERGED_DIR only converts: add --gguf DIR")
        if args.run:
            saved = read_run(args.run)
            merged = check_target(args.merged or saved.folder / MERGED)
            if args.gguf:
                check_target(args.gguf)
            print("merged:", export_merged(saved, merged, args.check_size))
            print(json.dumps(json.loads((merged / EXPORT_RECORD).read_text())["check"]))
        else:
            merged = read_merged(args.model).folder
        if args.gguf:
            print("gguf:", export_gguf(merged, args.gguf, args.llama_cpp))
    except (ExportError, RunFolderError, LlamaCppError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
