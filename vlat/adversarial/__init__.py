"""Embedding-space adversarial training, one method per file; the plumbing lives in :mod:`.base`.

Every method is a dataclass whose instances are training steps for :func:`vlat.train.train`
(``step_fn=FGM(...)``) and offer ``attack(model, batch, task)`` returning δ per site; both run the
method's one inner maximisation (:meth:`~vlat.adversarial.base.Adversary.maximize`).

Each method file registers itself (:mod:`.registry`); this package imports every module in its folder,
so a new method is one new file: the CLI, the explorer, the benchmarks and the docs find it in
:data:`REGISTRY`. Method classes are importable from here by their class names
(``from vlat.adversarial import PGD``).
"""

import importlib
import pkgutil

from vlat.adversarial.base import Adversary, Frozen, init_delta, normalize_grad, per_example_norm, project, site_norms
from vlat.adversarial.registry import REGISTRY, MethodSpec, get, names, specs

_PLUMBING = {"base", "registry", "weight_table"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name not in _PLUMBING and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

for _spec in REGISTRY.values():            # PGD, FreeLB, ... as attributes of the package
    globals()[_spec.cls.__name__] = _spec.cls

METHODS = {s.name: s.cls for s in specs()}   # CLI name -> class, derived from the registry

__all__ = ["Adversary", "Frozen", "METHODS", "MethodSpec", "REGISTRY", "get", "init_delta", "names",
           "normalize_grad", "per_example_norm", "project", "site_norms", "specs",
           *sorted(s.cls.__name__ for s in REGISTRY.values())]
