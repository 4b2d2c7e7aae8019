import os

# Tests must never reach a model hub: missing weights must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `import pipeline` does, before a test module imports torch: idle OpenMP threads sleep, not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Help pages are rendered at a fixed width (logs and tables off a terminal are never wrapped).
os.environ["COLUMNS"] = "160"
