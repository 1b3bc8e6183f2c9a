"""`python -m nas.cli`: the `nas` command, run as a module (as the tests start it)."""

from nas.cli import main

main()
