"""Background localization jobs: records, their stores (files or Redis), runners (in-process or RQ)."""
