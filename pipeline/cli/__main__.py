"""`python -m pipeline.cli ...` (what torchrun launches) is the `pipe` command."""
from pipeline.cli import main

main()
