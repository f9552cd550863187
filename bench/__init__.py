# A package, so that pytest imports these files as bench.test_* and never confuses them with tests/test_*.
