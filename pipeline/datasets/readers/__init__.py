"""Readers for the public chest X-ray datasets, each registered as ``<name>:<root>``.

Options follow the root as a query: ``<reader>:<root>?key=value&key=value`` (see
``_common``). Importing this package registers every reader.
"""
from pipeline.datasets.readers import chexpert, covidx, iu_xray, mimic_cxr, rsna_pneumonia, siim_pneumothorax  # noqa: F401
from pipeline.datasets.readers._common import COMMON  # noqa: E402
from pipeline.datasets.registry import READER_OPTIONS  # noqa: E402


def describe_readers() -> list[dict]:
    """Every registered reader with its options after ``?`` (name, default, what it does), for `pipe data readers`."""
    rows = []
    for name in sorted(READER_OPTIONS):
        own, description = READER_OPTIONS[name]
        options = own if name == "demo" else {**own, **COMMON}  # the demo has its own grammar, no common options
        rows.append({"reader": name, "description": description,
                     "options": [{"name": k, "default": o.default, "help": o.help} for k, o in options.items()]})
    return rows
