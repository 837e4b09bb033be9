"""A task script that fails: prints a marker line and exits with status 3."""

import sys

print("fleet-conformance-task-failing")
sys.exit(3)
