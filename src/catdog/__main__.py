"""`python -m catdog <step>`: the lifecycle CLI."""

from catdog.cli import main

main()
