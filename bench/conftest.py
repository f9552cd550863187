"""`pytest bench/` runs the suites shipped in metalearn_fast/benchmarks (one copy, which
`metalearn-fast bench` runs from any install); this loads their options, fixtures and timing policy."""
pytest_plugins = ["metalearn_fast.benchmarks.plugin"]
