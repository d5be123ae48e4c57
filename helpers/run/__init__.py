"""The headless run: its parameters, the run folder, metrics.json and sharded evaluation."""
