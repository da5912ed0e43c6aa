"""Test support shipped with the package: fault injection (`faults`)."""
