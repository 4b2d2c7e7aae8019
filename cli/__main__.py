"""`python -m cli ...` (what torchrun launches) is the `pipe` command."""
from cli import main

main()
