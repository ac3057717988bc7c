"""Registries of named components: likelihoods, priors, graph encoders, alignments, classifiers.

A component class registers itself under the name the configs use::

    @LIKELIHOODS.register("nb")
    class NB(Likelihood): ...

and ``LIKELIHOODS.get("nb")`` returns it. Each registry mirrors one config folder
(``configs/model/likelihood/nb.yaml`` etc.); a test keeps the two in agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from diagvi.errors import DataError


class Registry:
    """A name -> class table for one kind of component.

    Parameters
    ----------
    kind
        What the registry holds, used in error messages (``"likelihood"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator registering ``cls`` under ``name``; refuses duplicates."""
        if not isinstance(name, str):
            # ``@REGISTRY.register`` without ``("name")`` would replace the class by ``add``
            raise TypeError(
                f"{self.kind} names must be strings, got {name!r}; decorate with "
                f'@register("name"), not @register'
            )

        def add(cls: type) -> type:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = cls
            cls.registry_name = name
            return cls

        return add

    def get(self, name: str) -> type:
        """The class registered as ``name``; the error lists the known names."""
        known = ", ".join(sorted(self._items))
        if not isinstance(name, str):  # e.g. a list from a config: not a bare "unhashable type"
            raise DataError(
                f"a {self.kind} name must be a string, got {type(name).__name__} {name!r}; "
                f"expected one of: {known}"
            )
        try:
            return self._items[name]
        except KeyError:
            raise DataError(f"unknown {self.kind} {name!r}; expected one of: {known}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the class registered as ``name``."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


LIKELIHOODS = Registry("likelihood")
PRIORS = Registry("prior")
GRAPH_ENCODERS = Registry("graph encoder")
ALIGNMENTS = Registry("alignment")
CLASSIFIERS = Registry("classifier")
