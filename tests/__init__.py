"""port-broker's tests; the shared harness is tests/harness (bench/ uses it too)."""
