"""Communication filters: what a worker leaves out of, or shrinks in, a push.

Chosen by name per table (``kv.table(..., filters=[...])``) or per job (``filters:``
in the job file), composed in the order given. Sender side: pure functions over numpy
arrays plus per-(table, key) state (:mod:`psd.filters.chain`); receiver side: the
names a receiver knows and the undoing of quantization (:mod:`psd.filters.wire`).
docs/jobs.md, "Filters"; docs/protocol.md, "Filters"; decisions 93-96.
"""
from psd.filters.chain import FilterChain, TableInfo, build_chain
from psd.filters.spec import FILTERS, parse_filters
from psd.filters.wire import KNOWN, decode_values

__all__ = ["FILTERS", "KNOWN", "FilterChain", "TableInfo", "build_chain", "decode_values", "parse_filters"]
