"""Saved benchmark rows (``--json`` files), installed with the package as ``vlat.results`` so that the
notebooks that plot them (07, 08) find them in a wheel too: :func:`vlat.resources.benchmark_results`."""
