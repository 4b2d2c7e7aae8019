"""``python -m pipeline.datasets.demo ROOT [--n N] ...``: generate the demo dataset."""
from pipeline.datasets.demo.generator import main

main()
