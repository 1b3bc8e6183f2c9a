"""`python -m nas.cli`: the `nas` command (how `nas search --workers` starts its processes)."""

from nas.cli import main

main()
