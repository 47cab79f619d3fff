"""Embedding-space adversarial training, one method per file; the plumbing lives in :mod:`.base`.

Every method is a dataclass whose instances are training steps for :func:`vlat.train.train`
(``step_fn=FGM(...)``); most also offer ``attack(model, batch, task)`` returning δ per site.
"""

from vlat.adversarial.base import Adversary, init_delta, normalize_grad, per_example_norm, project, site_norms
from vlat.adversarial.fgm import FGM, FGSM
from vlat.adversarial.freeat import FreeAT
from vlat.adversarial.freelb import FreeLB
from vlat.adversarial.pgd import PGD
from vlat.adversarial.smart import SMART
from vlat.adversarial.villa import VILLA
from vlat.adversarial.yopo import YOPO

METHODS = {"fgsm": FGSM, "fgm": FGM, "pgd": PGD, "freeat": FreeAT, "freelb": FreeLB, "smart": SMART, "yopo": YOPO,
           "villa": VILLA}

__all__ = ["Adversary", "FGM", "FGSM", "FreeAT", "FreeLB", "METHODS", "PGD", "SMART", "VILLA", "YOPO", "init_delta",
           "normalize_grad", "per_example_norm", "project", "site_norms"]
