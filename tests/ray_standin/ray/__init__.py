"""Stand-in for Ray (tests only): just the `ray start` command line, see scripts/scripts.py."""
