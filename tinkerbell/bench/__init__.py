"""`tinkerbell bench`: drive a running (or self-started) server over HTTP with the real clients and write a
report (report.md, PNG plots, results.json). Each scenario is a module with `run(ctx) -> ScenarioResult`;
docs/bench.md says what each measures."""
