"""Methods register here by name. A new method is one new file with a `Learner` subclass plus one line in `METHODS`."""

from __future__ import annotations

from types import MappingProxyType

from spacil.errors import InputError
from spacil.learner import Learner, LearnerContext
from spacil.methods.area import Area
from spacil.methods.bofa import BOFA
from spacil.methods.engine import Engine
from spacil.methods.finetune import FineTune
from spacil.methods.proof import Proof
from spacil.methods.ranpac import RanPAC
from spacil.methods.rapf import RAPF
from spacil.methods.simplecil import SimpleCIL
from spacil.methods.spa import SPA
from spacil.methods.zeroshot import ZeroShot

METHODS: "MappingProxyType[str, type[Learner]]" = MappingProxyType({
    cls.name: cls for cls in (SPA, ZeroShot, SimpleCIL, FineTune, RAPF, Proof, RanPAC, BOFA, Engine, Area)
})


def create_learner(config, context: LearnerContext) -> Learner:
    if config.method not in METHODS:
        raise InputError(f"--method {config.method}: unknown method (known: {', '.join(METHODS)})")
    return METHODS[config.method](config, context)
