import os

# Tests must never reach a model hub: missing weights must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Wide enough that rich tables do not fold the paths and reasons that tests look for.
os.environ["COLUMNS"] = "240"
