"""Warnings raised by softcnn."""

__all__ = ["DivergenceWarning"]


class DivergenceWarning(RuntimeWarning):
    """The training objective stopped being finite; the last finite weights were kept."""
