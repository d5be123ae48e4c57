"""The package the notebooks import, arranged by who reads it (README.md, "Repository layout").

At the top: the recipe a reader takes away (chat.py and collator.py can be copied on their own; data.py,
validation.py, modeling.py, training.py, scoring.py, evaluation.py), the offline model (tiny.py), the speed switches
(speed.py) and the commands (runner.py, launch.py, predict.py, export.py). Below: run/ (the headless run's
machinery), exports/ (after training) and teaching/ (what the lessons use to teach; its memory planner also
plans the training micro-batch).
"""

import logging

# bitsandbytes, imported by PEFT, warns on CPUs with AVX512-BF16 that an optional kernel from the Hub is missing
# and falls back to its own code; the warning is about its CPU inference path, which nothing here relies on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
