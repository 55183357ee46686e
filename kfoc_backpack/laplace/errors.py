"""Errors of the laplace-torch integration, of the classes laplace-torch's callers catch.

Code written against laplace-torch catches what laplace-torch raises: a ``KeyError``
for a dict-like batch without the target key, and ``ValueError``, ``AttributeError``,
``RuntimeError`` or ``SystemExit`` around a fit that a precision cannot run. K-FOC's
errors keep their own message and are *also* of those classes, so that both
``except KeyError`` and ``except ValueError`` (the class K-FOC raised before) work.
"""

from __future__ import annotations


class BatchKeyError(KeyError, ValueError):
    """A dict-like batch lacks the key the Laplace was told to read (``dict_key_y``).

    A ``KeyError`` as laplace-torch's ``batch[dict_key_y]`` raises it, and a
    ``ValueError`` as for any other malformed batch.
    """

    def __str__(self) -> str:
        """Return the message itself (``KeyError`` would print its quoted ``repr``)."""
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(TypeError, ValueError):
    """The model's floating-point type cannot be fitted (float16, bfloat16).

    A ``TypeError`` (what is wrong is the type) and a ``ValueError``, the class
    laplace-torch's callers catch around a fit in a precision it cannot run.
    """
