"""The stages of the pipeline, one package each.

- ``stages.embed``: stage one, each frozen encoder once per distinct content into the cache;
- ``stages.train``: stage two, the Adaptor trained from the cache alone;
- ``stages.evaluate``: downstream heads (classification, segmentation, retrieval, zero-shot)
  trained and scored from the cache;
- ``stages.sweep`` and ``stages.demo``: orchestrations of the stages above.

Each package exposes its config dataclass and ``run(cfg) -> result``.
"""
