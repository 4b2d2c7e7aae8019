"""Downstream evaluation from the cache: metrics, label fractions, features, tasks and reports."""
