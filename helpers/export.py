"""Export a trained run: the adapter merged into its base (plain transformers), and GGUF for llama.cpp.

    python -m helpers.export --run runs/offline --merged runs/offline/merged
    python -m helpers.export --run runs/offline --gguf runs/offline/gguf          # merges first
    python -m helpers.export --model runs/offline/merged --gguf runs/offline/gguf  # from a merged folder

``helpers.exports.merge`` writes the merged folder (and checks it against the adapter on held-out rows);
``helpers.exports.llama_cpp`` converts it with llama.cpp's own converter, unpatched. Taught in notebook 06.
An export writes into a new or empty folder, or over an earlier export of its kind, and removes no file it did not
write; ``--overwrite`` lets it write into another folder (files of the same names replaced, the others kept).
A run that cannot be exported (no adapter, a damaged one) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from helpers.exports.llama_cpp import LlamaCppError, export_gguf
from helpers.exports.merge import DEFAULT_CHECK_SIZE, ExportError, check_target, export_merged
from helpers.exports.predictor import LOAD_ERRORS, how_to_replace, read_saved
from helpers.run.folder import EXPORT_RECORD, MERGED, RunFolderError


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
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder that no earlier export of the same kind wrote (files of "
                             "the same names are replaced, the others kept)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    saved = None
    try:
        if bool(args.run) == bool(args.model):
            raise ExportError("give --run RUN_DIR (merge its adapter) or --model MERGED_DIR (convert it), not both")
        if args.model and not args.gguf:
            raise ExportError("--model MERGED_DIR only converts: add --gguf DIR")
        saved = read_saved(args.run, args.model)
        merged = (check_target(args.merged or saved.folder / MERGED, "merged", args.overwrite) if args.run
                  else saved.folder)
        if args.gguf and Path(args.gguf).expanduser().resolve() == Path(merged).resolve():
            raise ExportError(f"--gguf {args.gguf} is the merged folder: give the GGUF export a folder of its own")
        if args.gguf:
            check_target(args.gguf, "gguf", args.overwrite)
        if args.run:
            print("merged:", export_merged(saved, merged, args.check_size, args.overwrite))
            print(json.dumps(json.loads((merged / EXPORT_RECORD).read_text())["check"]))
        if args.gguf:
            print("gguf:", export_gguf(merged, args.gguf, args.llama_cpp, args.overwrite))
    except (ExportError, RunFolderError, LlamaCppError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LOAD_ERRORS as err:  # a file damaged in a way read_saved's check does not see
        if saved is None:
            raise
        print(f"error: {saved.adapter or saved.folder} cannot be loaded ({type(err).__name__}: "
              f"{' '.join(str(err).split())}): {how_to_replace(saved)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
