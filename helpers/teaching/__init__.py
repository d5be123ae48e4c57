"""What the lessons use to teach: the published sizes, the memory planner (which also plans the training
micro-batch, ``helpers.speed``), clippable inspection, plots."""
