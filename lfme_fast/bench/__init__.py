"""Benchmarks: ``python -m lfme_fast.bench {sampler,loader,train,step} ...``; each writes a JSON result."""
