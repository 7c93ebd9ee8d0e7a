"""`python -m audit`: the same command line as `audit`."""

from .cli import main

main()
