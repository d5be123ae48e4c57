"""The repository holds together: every file it cites exists, helpers import without cycles, the run folder's
names live in one module, and each shared constant is defined once."""

import ast
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
# The repository's own top-level folders and files (tracked ones: not artifacts/ or runs/, built on first use).
TOP_LEVEL = {line.split("/")[0] for line in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                                                            text=True, check=True).stdout.splitlines()}
# A backticked path, one to three backticks around it: helpers/NAME.py, benchmarks/README.md, a folder ending in /.
CITED = re.compile(r"`+((?:\.\./)*[\w.-]+(?:/[\w.-]+)*/?)`+")
HELPERS = sorted((REPO / "helpers").glob("*.py"))


def docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


def citing_texts():
    """(file, text) for every docstring, README and notebook cell, plus comments in the Python files."""
    for path in [*HELPERS, *sorted((REPO / "benchmarks").glob("*.py"))]:
        comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        yield path, docstrings(path) + "\n" + comments
    for path in [REPO / "README.md", *REPO.glob("*/README.md"), *REPO.glob("*/*.md"), REPO / "requirements.txt",
                 REPO / "pyproject.toml"]:
        yield path, path.read_text()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        yield path, "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)


def cited_paths(text: str):
    for match in CITED.finditer(text):
        cited = match.group(1)
        if cited.startswith("../") or "FACTS.md" in cited:
            yield cited  # outside the repository: never resolvable from a clone
        elif "/" in cited and cited.split("/")[0] in TOP_LEVEL:
            yield cited


@pytest.mark.parametrize("path,text", list(citing_texts()), ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else "")
def test_every_cited_file_exists(path, text):
    missing = sorted({cited for cited in cited_paths(text) if cited.startswith("../") or "FACTS.md" in cited
                      or not (REPO / cited).exists()})
    assert not missing, f"{path.relative_to(REPO)} cites files the repository does not have: {missing}"


def test_nothing_cites_the_workspace_facts_file():
    for path in REPO.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".md", ".ipynb", ".txt", ".toml", ".sh") and ".venv" not in path.parts:
            if path.name == Path(__file__).name:
                continue
            assert "FACTS.md" not in path.read_text(errors="ignore"), f"{path.relative_to(REPO)} cites FACTS.md"


def helper_imports(path: Path) -> set[str]:
    """Every ``helpers.X`` module that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
    return found - {path.stem}


def test_helpers_import_each_other_without_cycles():
    graph = {path.stem: helper_imports(path) for path in HELPERS}
    cycles = []

    def visit(module, trail):
        for imported in sorted(graph.get(module, ())):
            if imported in trail:
                cycles.append(trail[trail.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, trail + [imported])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


RUN_FOLDER_NAMES = ("metrics.json", "train_result.json", "class_names.json", "skipped.json", "shard_metrics.json",
                    "manifest.json", "chat_prompt.json", "loss.png", "accuracy.png", "confusion_matrix.png",
                    "samples.png", '"adapter"', '"checkpoints"', '"COMPLETE"', '".staging"')


def test_only_run_folder_names_the_run_folders_files():
    sources = {path: path.read_text() for path in HELPERS if path.name != "run_folder.py"}
    for path in sorted((REPO / "notebooks").glob("0[45]_*.ipynb")):
        sources[path] = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    literal = {path.name: [name for name in RUN_FOLDER_NAMES
                           if re.search(r"""["']""" + re.escape(name.strip('"')) + r"""["']""", text)]
               for path, text in sources.items()}
    assert not {name: found for name, found in literal.items() if found}


def test_each_shared_constant_is_defined_once():
    from transformers.models.gemma4.image_processing_gemma4 import _SUPPORTED_SOFT_TOKENS

    from helpers import config, presets

    assert tuple(config.SOFT_TOKEN_BUDGETS) == tuple(_SUPPORTED_SOFT_TOKENS)
    assert presets.SOFT_TOKEN_BUDGETS is config.SOFT_TOKEN_BUDGETS
    for name in ("SOFT_TOKEN_BUDGETS", "IGNORE_INDEX", "QUANTIZATIONS", "COMPLETE_MARKER", "SYSTEMS"):
        defined = [path.name for path in HELPERS
                   if re.search(rf"^{name}\s*=", path.read_text(), flags=re.MULTILINE)]
        assert len(defined) == 1, f"{name} is defined in {defined}"


def test_dead_names_are_gone():
    from helpers import data, presets

    for module, name in ((presets, "HUB_IDS"), (presets, "PRESETS"), (data, "OXFORD_PET")):
        assert not hasattr(module, name)


def test_pyproject_declares_the_runtime_requirements():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name: version.split()[0] for name, version in pins.items()}
    assert declared, "pyproject.toml declares no dependencies"
    for requirement in declared:
        name, version = requirement.split("==")
        assert pins.get(name) == version, f"{requirement} differs from requirements.txt ({pins.get(name)})"
    for needed in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "pillow"):
        assert any(r.startswith(needed + "==") for r in declared), needed
