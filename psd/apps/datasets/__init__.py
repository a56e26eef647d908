"""Data sets for the bundled apps; generators are named so a job file can pick one."""
from psd.apps.datasets.synthetic import SparseDataset, make_sparse_logreg, shard, shard_bounds

GENERATORS = {"sparse_logreg": make_sparse_logreg}

__all__ = ["GENERATORS", "SparseDataset", "make_sparse_logreg", "shard", "shard_bounds"]
