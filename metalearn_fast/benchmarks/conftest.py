# The suites' options, fixtures and timing policy live in plugin.py, which bench/conftest.py loads too.
pytest_plugins = ["metalearn_fast.benchmarks.plugin"]
