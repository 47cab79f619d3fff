"""vlat's sample data, installed with the package as ``vlat.samples``: image-caption pairs (``pairs/``) and
the shipped tiny checkpoints (``checkpoints/``). Find them with :mod:`vlat.resources`."""
