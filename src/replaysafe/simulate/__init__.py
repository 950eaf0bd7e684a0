"""The load model of the ambiguity window (being split by job: see ``model``)."""

from replaysafe.simulate.model import *  # noqa: F403
from replaysafe.simulate.model import __all__ as __all__
