"""The test suite (a package, so bench/ and scripts/ can import tests.support)."""
