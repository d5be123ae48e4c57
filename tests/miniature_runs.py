"""A miniature fine-tuned through ``python -m helpers.runner`` (notebooks 04 and 05), as each family's tests run it."""

import json
import subprocess
import sys
from pathlib import Path


def fine_tune(output_dir, params: list[str]) -> dict:
    """The runner into ``output_dir`` with ``params`` (``-p NAME VALUE`` pairs); its metrics.json."""
    proc = subprocess.run([sys.executable, "-m", "helpers.runner", "--output-dir", str(output_dir), *params],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(output_dir) / "metrics.json").read_text())


def gain(metrics: dict) -> float:
    """Fine-tuned minus baseline accuracy (constrained scoring), printed for ``pytest -s``."""
    summary = metrics["summary"]
    difference = summary["finetuned_accuracy"] - summary["baseline_accuracy"]
    print(f"fine-tuned minus baseline: {difference:.3f}")
    return difference
