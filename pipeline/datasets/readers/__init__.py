"""Readers for the public chest X-ray datasets, each registered as ``<name>:<root>``.

Options follow the root as a query: ``<reader>:<root>?key=value&key=value`` (see
``_common``). Importing this package registers every reader.
"""
from pipeline.datasets.readers import chexpert, covidx, iu_xray, mimic_cxr, rsna_pneumonia, siim_pneumothorax  # noqa: F401
