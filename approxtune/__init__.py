"""approxtune: compressed versions of a PyTorch classifier that stay certifiably robust.

``approxtune.load_model(DIR)`` rebuilds an exported model (see :mod:`approxtune.export`); it is imported on first use,
so ``import approxtune.<module>`` stays light.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from approxtune.export import load_model

__all__ = ["load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from approxtune.export import load_model

        return load_model
    raise AttributeError(f"module 'approxtune' has no attribute {name!r}")
