"""Benchmarks: ``python -m lfme_fast.bench {sampler,loader,train,step,epoch,memory,gpu,report} ...``; each
writes a JSON result under ``results/`` and ``report`` turns them into ``results/BENCHMARKS.md``."""
