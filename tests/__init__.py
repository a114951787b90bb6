"""The test suite, a package so its shared helpers import as `tests.NAME` (pytest puts the
repository root on sys.path for a package of tests)."""
