"""What notebooks 01 and 02 use to teach: the published sizes, the memory planner, clippable inspection, plots."""
