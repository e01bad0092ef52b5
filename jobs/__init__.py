"""Ray entry points of the pipeline; `duch <command>` (jobs/cli.py) dispatches to them."""
