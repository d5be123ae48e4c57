"""The copy contract: notebook 04's recipe cells, and notebook 05's loading and scoring cells, run in a project of
your own where the only part of this repository is the masking collator and the chat format.

The cells tagged ``recipe`` are extracted in order into one script, after a preamble that stands for the reader's
own project (their settings, their images, their folders). It runs in a fresh process whose only copy of this
package is ``helpers/collator.py`` and ``helpers/chat.py`` in a folder of their own (``python -S``: no editable
install, no other module of ``helpers``), trains the tiny checkpoint for a few steps with transformers' own loss
on the collator's labels, saves the adapter, loads it back onto the base and scores an image.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat

from helpers.data import load_examples
from helpers.run.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
STEPS = 3


def recipe_cells(notebook: str) -> list[str]:
    cells = nbformat.read(REPO / "notebooks" / notebook, as_version=4).cells
    return [c.source for c in cells if c.cell_type == "code" and "recipe" in c.metadata.get("tags", [])]


def test_the_recipe_cells_are_plain_hugging_face_code():
    recipe = "\n".join(recipe_cells("04_training.ipynb") + recipe_cells("05_evaluation.ipynb"))
    imported = {line.split()[1] for line in recipe.splitlines() if line.startswith(("import ", "from "))}
    assert {m for m in imported if m.split(".")[0] == "helpers"} == {"helpers.collator"}
    for shown in ("BitsAndBytesConfig(", "LoraConfig(", "get_peft_model(", "TrainingArguments(", "Trainer(",
                  "trainer.train(resume_from_checkpoint=", "save_pretrained(", "PeftModel.from_pretrained("):
        assert shown in recipe, shown


def test_the_recipe_trains_and_scores_with_only_the_collator_and_the_chat_format(tmp_path, tiny_path):
    vendor = tmp_path / "project" / "helpers"
    vendor.mkdir(parents=True)
    for name in ("__init__.py", "chat.py", "collator.py"):
        shutil.copy(REPO / "helpers" / name, vendor / name)
    examples = load_examples("digits", "train", size=8, seed=1)
    for i, example in enumerate(examples.examples):
        example["image"].save(tmp_path / f"{i}.png")
    config = RunConfig(batch_size=4, max_steps=STEPS, save_steps=100, warmup_steps=0).to_dict()
    preamble = f'''
import json, sys, types
from pathlib import Path
from PIL import Image
try:
    import helpers.data  # noqa: F401  (this project has no such module: only the two copied files)
    sys.exit("helpers.data is importable: the contract is not tested in isolation")
except ModuleNotFoundError:
    pass
config = types.SimpleNamespace(**{config!r})  # the reader's own settings
model_path, run_dir = {str(tiny_path)!r}, {str(tmp_path / "run")!r}
Path(run_dir).mkdir()
class_names = {examples.class_names!r}
labels = {[e["label"] for e in examples.examples]!r}
train_examples = [{{"image": Image.open({str(tmp_path)!r} + f"/{{i}}.png").convert("RGB"), "label": label}}
                  for i, label in enumerate(labels)]
'''
    between = f'''
adapter_dir = {str(tmp_path / "adapter")!r}
'''
    evaluation = '''
nf4 = None  # the reader's BitsAndBytesConfig for a 4-bit base, as notebook 04's
examples, prompt = train_examples, collator.chat.settings()  # the images to score, the prompt trained with
'''
    report = '''
losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
print(json.dumps({"steps": trainer.state.global_step, "losses": losses, "scores": one_image,
                  "adapter": sorted(p.name for p in Path(adapter_dir).iterdir())}))
'''
    training = recipe_cells("04_training.ipynb")
    save = [c for c in training if "save_pretrained" in c]
    script = "\n\n".join([preamble, *[c for c in training if c not in save], between, *save, evaluation,
                          *recipe_cells("05_evaluation.ipynb"), report])
    (tmp_path / "recipe.py").write_text(script)
    site = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{vendor.parent}:{site}", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-S", str(tmp_path / "recipe.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == STEPS and result["losses"] and all(loss > 0 for loss in result["losses"])
    assert "adapter_model.safetensors" in result["adapter"] and "adapter_config.json" in result["adapter"]
    assert sorted(result["scores"]) == sorted(examples.class_names)
    assert all(score < 0 for score in result["scores"].values())  # log-likelihoods of each class name
