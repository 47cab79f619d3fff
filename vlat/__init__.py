"""vlat: adversarial and robust training of vision-language models, taught by running it."""

__version__ = "0.1.0"
