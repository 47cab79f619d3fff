"""The method registry: the one place that knows which methods exist.

Each method file in :mod:`vlat.adversarial` declares itself with :func:`register`: its name, its paper,
the authors' reference defaults, the options it exposes (with help text and ranges) and its preset in
relative radii (the explorer's and the benchmarks'). The CLI (``vlat train --method``), the explorer,
the benchmarks, notebook 09, the docs' method sheet and the tests all read :data:`REGISTRY`; adding a
method is one new file in ``vlat/adversarial/`` plus its tests (the package imports every module in its
folder, so the new file registers itself).

>>> from vlat.adversarial import registry
>>> registry.get("pgd").label
'PGD'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from vlat.adversarial.base import check_number

DOCS = "docs/methods.md"


@dataclass(frozen=True)
class Paper:
    """Where a method comes from."""

    title: str
    authors: str
    venue: str
    year: int
    url: str                                     # arXiv (or the proceedings) page


@dataclass(frozen=True)
class Option:
    """A method setting exposed on the command line (``vlat train --<flag>``).

    ``field`` is the dataclass field it sets; the flag is the field with dashes unless ``flag`` is given.
    ``low``/``high`` bound numbers (checked before any work), ``choices`` bound strings.
    """

    field: str
    help: str
    type: type = float
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None

    @property
    def cli(self) -> str:
        return "--" + (self.flag or self.field.replace("_", "-"))

    @property
    def dest(self) -> str:
        return self.cli[2:].replace("-", "_")

    def check(self, value: Any, method: str) -> Any:
        """``value`` if it fits this option, else a ValueError naming the flag, the method and the range."""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{self.cli} for {method} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.cli} for {method} must be a finite number; got {value!r}")
        check_number(f"{self.cli} for {method}", value, -math.inf if self.low is None else self.low,
                     math.inf if self.high is None else self.high, integer=self.type is int)
        return value


STEPS = Option("steps", "ascent steps K", int, 1, 1000)                       # shared by the K-step methods
INIT_MAG = Option("init_mag", "initial delta magnitude (uniform start)", float, 0.0)   # FreeLB and VILLA


# A preset builds the method from the explorer's controls: sites, a relative radius eps (a fraction of
# each site's norm after Adversary.calibrate), the number of steps K and the ascent step eta.
Preset = Callable[[tuple, float, int, float], Any]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of vlat needs to know about one method."""

    name: str                                    # the CLI name: pgd
    label: str                                   # the display name: PGD
    cls: type                                    # the Adversary subclass (a training step with attack())
    paper: Paper
    summary: str                                 # one line: what it does
    reference: dict                              # the authors' defaults, as they state them (for the docs)
    options: tuple[Option, ...] = ()             # settings beyond sites / norm / eps / step size
    preset: Preset | None = None                 # see Preset; None: the class with sites, eps, step size
    steps_mean: str = "K ascent steps"           # what the explorer's "steps" control sets for this method
    single_site: bool = False                    # perturbs one site at a time (YOPO)
    sites_hint: str | None = None                # set when --sites does not apply: what chooses the sites
    # cost of one training batch in clean passes, given the method and the cost of a layer-one pass (a
    # fraction of a clean step; YOPO's inner steps); benchmarks/methods_cost.py checks time against it
    passes: Callable[[Any, float], float] = field(default=lambda m, layer_one: 1.0)

    @property
    def anchor(self) -> str:
        return self.name

    @property
    def docs(self) -> str:
        """The method's section of the method sheet."""
        return f"{DOCS}#{self.anchor}"

    def build(self, sites, eps: float, steps: int, step_size: float | None = None):
        """The method at relative radius ``eps`` with ``steps`` steps; ``step_size`` defaults to
        :func:`relative_step` (the one rule the explorer and the benchmarks share)."""
        sites = tuple(sites)
        if self.single_site and len(sites) > 1:
            raise ValueError(f"{self.label} perturbs one site at a time: pick one of {', '.join(sites)}")
        eta = relative_step(eps, steps) if step_size is None else float(step_size)
        if self.preset is None:
            return self.cls(sites=sites, eps=eps, step_size=eta)
        return self.preset(sites, eps, int(steps), eta)


def relative_step(eps: float, steps: int) -> float:
    """Madry et al.'s rule for the ascent step: ``η = 2.5 ε / K``, so K steps can cross the ball
    and come back (PGD's reference 8/255, 2/255, 10 steps is the same rule up to rounding)."""
    return 2.5 * eps / max(int(steps), 1)


REGISTRY: dict[str, MethodSpec] = {}


def register(**spec) -> Callable[[type], type]:
    """Class decorator: ``@register(name="pgd", label="PGD", paper=Paper(...), ...)``."""

    def wrap(cls: type) -> type:
        s = MethodSpec(cls=cls, **spec)
        if s.name in REGISTRY and REGISTRY[s.name].cls is not cls:
            raise ValueError(f"method name {s.name!r} is registered twice")
        REGISTRY[s.name] = s
        cls.spec = s
        return cls

    return wrap


def specs() -> tuple[MethodSpec, ...]:
    """Every registered method, in the order they were published (the order vlat teaches them)."""
    return tuple(sorted(REGISTRY.values(), key=lambda s: (s.paper.year, s.label.lower())))


def names() -> tuple[str, ...]:
    """Every registered method's CLI name, oldest paper first."""
    return tuple(s.name for s in specs())


def get(name: str) -> MethodSpec:
    """A method by CLI name or display name, case-insensitive."""
    key = str(name).lower()
    for s in specs():
        if key in (s.name, s.label.lower()):
            return s
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(names())}")


def cli_options() -> dict[str, tuple[Option, list[MethodSpec]]]:
    """Every method option by flag, with the methods that take it (one flag, one field, one type)."""
    out: dict[str, tuple[Option, list[MethodSpec]]] = {}
    for s in specs():
        for o in s.options:
            if o.cli in out:
                first = out[o.cli][0]
                if (first.field, first.type, first.choices) != (o.field, o.type, o.choices):
                    raise ValueError(f"{o.cli} means different things for {out[o.cli][1][0].name} and {s.name}")
                out[o.cli][1].append(s)
            else:
                out[o.cli] = (o, [s])
    return out
