"""lfme_fast: high-throughput long-tailed classification (LFME, CBD, ECL).

Data flow, one module per stage: ``data_prep`` (shards) -> ``lfme_fast.shards`` (random access) ->
``lfme_fast.sampling`` -> ``lfme_fast.loaders`` -> experts -> ``lfme_fast.offline`` -> student -> eval ->
``lfme_fast.bench``.
"""

__version__ = "0.1.0"
