"""The repository holds together: every file it cites exists, the package's layout is the README's drawing,
helpers import one way (no cycles, nothing deferred without a reason), the run folder's names live in one module,
each shared constant is defined once, and the prose narrates no project history."""

import ast
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
TRACKED = [name for name in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                           check=True).stdout.splitlines() if (REPO / name).exists()]
# The repository's own top-level folders and files (tracked ones: not artifacts/ or runs/, built on first use).
TOP_LEVEL = {line.split("/")[0] for line in TRACKED}
# A backticked path, one to three backticks around it: helpers/NAME.py, benchmarks/README.md, a folder ending in /.
CITED = re.compile(r"`+((?:\.\./)*[\w.-]+(?:/[\w.-]+)*/?)`+")
HELPERS = sorted((REPO / "helpers").rglob("*.py"))


def module_name(path: Path) -> str:
    """``helpers/run/folder.py`` -> ``helpers.run.folder`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


def citing_texts():
    """(file, text) for every docstring, README, docs page and notebook cell, plus comments in the Python files."""
    for path in [*HELPERS, *sorted((REPO / "benchmarks").glob("*.py")), *sorted((REPO / "tests").glob("*.py"))]:
        comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        yield path, docstrings(path) + "\n" + comments
    for path in [REPO / "README.md", *REPO.glob("*/README.md"), *REPO.glob("*/*.md"), REPO / "requirements.txt",
                 REPO / "pyproject.toml", *REPO.glob("configs/*.yaml")]:
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
    for name in TRACKED:
        path = REPO / name
        if path.suffix in (".py", ".md", ".ipynb", ".txt", ".toml", ".sh") and path.name != Path(__file__).name:
            assert "FACTS.md" not in path.read_text(errors="ignore"), f"{name} cites FACTS.md"


# The project's own history belongs in git and in benchmarks/results/, not in what readers read.
HISTORY = re.compile(r"\b([Ii]ssue|issues) #?[0-9]+\b|\b[Rr]uns? [A-I]\b|\b[Rr]uns [A-I](-|–| and )[A-I]\b|"
                     r"[Tt]iny init [0-9]|\binit(ialisation)? [0-9]\b|\bround [0-9]+\b")


def test_prose_narrates_no_project_history():
    found = []
    for name in TRACKED:
        if name.endswith((".md", ".py", ".ipynb")) and not name.startswith("benchmarks/results/") \
                and name != "tests/test_repository.py":
            for number, line in enumerate((REPO / name).read_text(errors="ignore").splitlines(), 1):
                if HISTORY.search(line):
                    found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found[:20])


# -- the package -------------------------------------------------------------------------------------------------

def helper_imports(path: Path, inside_functions: bool = False) -> set[str]:
    """The ``helpers`` modules ``path`` imports (at the top, or only those inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = ([n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)]
             if inside_functions else ast.walk(tree))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .chat import ...
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("helpers"):
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("helpers")}
    return found - {module_name(path)}


MODULES = {module_name(path) for path in HELPERS}


def test_helpers_import_each_other_without_cycles():
    graph = {module_name(path): helper_imports(path) & MODULES for path in HELPERS}
    cycles, done = [], set()

    def visit(module, trail):
        for imported in sorted(graph.get(module, ())):
            if imported in trail:
                cycles.append(trail[trail.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, trail + [imported])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


# Imports of the package deferred into a function, each for a reason: the runner's checks run before anything
# loads, and transformers (the offline model's builder, a local model's check, the length check's processor and
# meta model) takes seconds to import.
DEFERRED = {"helpers.run.config": {"helpers.tiny", "helpers.collator", "helpers.modeling"},
            "helpers.run.command_line": {"helpers.modeling"}}


def test_imports_of_the_package_are_at_the_top_unless_deferred_for_a_reason():
    deferred = {module_name(p): helper_imports(p, inside_functions=True) & MODULES for p in HELPERS}
    assert {m: found for m, found in deferred.items() if found} == DEFERRED


def test_the_two_vendored_files_import_nothing_else_of_the_package():
    assert helper_imports(REPO / "helpers" / "chat.py") == set()
    assert helper_imports(REPO / "helpers" / "collator.py") == {"helpers.chat"}


COMMANDS = {"helpers.runner", "helpers.launch", "helpers.predict", "helpers.export", "helpers.run.shards"}


def test_every_module_of_the_package_serves_the_package_or_the_lessons():
    """Nothing under helpers/ is there only for the benchmarks (their fixtures live in benchmarks/)."""
    lessons = "\n".join(cell.source for path in sorted((REPO / "notebooks").glob("*.ipynb"))
                        for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
    used = set().union(*(helper_imports(path) for path in HELPERS))
    used |= {m for m in MODULES if re.search(rf"\b(from|import) {re.escape(m)}\b", lessons)}
    used |= {f"{base}.{name}" for base, name in re.findall(r"from (helpers[\w.]*) import (\w+)", lessons)}
    unused = sorted(MODULES - used - COMMANDS - {"helpers", "helpers.run", "helpers.exports", "helpers.teaching"})
    assert not unused, f"imported by neither the package nor a notebook: {unused}"


def test_the_readme_draws_the_package_as_it_is():
    layout = (REPO / "README.md").read_text().split("## Repository layout", 1)[1].split("```")[1]
    drawn, folders = set(), []
    for line in layout.splitlines():
        name = line.split()[0] if line.strip() else ""
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            folders[depth:] = [name.rstrip("/")]
        elif name.endswith(".py"):
            drawn.add("/".join([*folders[:depth], name]))
        if name.endswith("/") and "__init__.py" in line:
            drawn.add("/".join([*folders, "__init__.py"]))
    actual = {str(path.relative_to(REPO)) for path in HELPERS}
    assert drawn == actual, f"drawn, not in the tree: {sorted(drawn - actual)}; in the tree, not drawn: {sorted(actual - drawn)}"


RUN_FOLDER_NAMES = ("metrics.json", "train_result.json", "class_names.json", "skipped.json", "shard_metrics.json",
                    "manifest.json", "chat_prompt.json", "loss.png", "accuracy.png", "confusion_matrix.png",
                    "samples.png", '"adapter"', '"adapter.tmp"', '"COMPLETE"', '"checkpoint-"')


def test_only_the_run_folder_module_names_the_run_folders_files():
    sources = {path: path.read_text() for path in HELPERS if path.name != "folder.py"}
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        sources[path] = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    literal = {path.name: [name for name in RUN_FOLDER_NAMES
                           if re.search(r"""["']""" + re.escape(name.strip('"')) + r"""["']""", text)]
               for path, text in sources.items()}
    assert not {name: found for name, found in literal.items() if found}


def test_each_shared_constant_is_defined_once():
    from transformers.models.gemma4.image_processing_gemma4 import _SUPPORTED_SOFT_TOKENS

    from helpers.run import config
    from helpers.teaching import presets

    assert tuple(config.SOFT_TOKEN_BUDGETS) == tuple(_SUPPORTED_SOFT_TOKENS)
    assert presets.SOFT_TOKEN_BUDGETS is config.SOFT_TOKEN_BUDGETS
    for name in ("SOFT_TOKEN_BUDGETS", "IGNORE_INDEX", "QUANTIZATIONS", "COMPLETE_MARKER", "SYSTEMS", "MODEL_INPUTS",
                 "CLIP_BUFFERS", "NF4_SKIP_MODULES"):
        defined = [str(path.relative_to(REPO)) for path in HELPERS
                   if re.search(rf"^{name}\s*=", path.read_text(), flags=re.MULTILINE)]
        assert len(defined) == 1, f"{name} is defined in {defined}"


def test_names_nothing_calls_are_gone():
    from helpers import data, evaluation, scoring, tiny
    from helpers.run import config, shards
    from helpers.teaching import presets

    for module, name in ((presets, "HUB_IDS"), (presets, "PRESETS"), (data, "OXFORD_PET"), (data, "hf_examples"),
                         (shards, "task_from_env"), (tiny, "count_parameters"), (scoring, "predict"),
                         (scoring, "naive_class_scores"), (evaluation, "predict")):
        assert not hasattr(module, name), f"{module.__name__}.{name}"
    assert "extra" not in config.RunConfig.field_names()


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
    for needed in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "pillow", "scikit-learn"):
        assert any(r.startswith(needed + "==") for r in declared), needed
