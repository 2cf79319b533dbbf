"""Loaded by every Python process of a test run that fault_env() (tests/conftest.py) prepared: arms the faults of
TUNELAB_FAULT (tests/fault_injection.py)."""
import os
import sys

if os.environ.get("TUNELAB_FAULT"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fault_injection

    fault_injection.install(os.environ["TUNELAB_FAULT"])
