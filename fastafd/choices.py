"""The names a registry field of the config may take: config declares such fields as ``str`` subclasses and does
not import the registries (it is a leaf), so the command line (:mod:`fastafd.args`) and config files
(:mod:`fastafd.configfile`) read their choices here, from the registries, when such a field is parsed."""

from __future__ import annotations

from fastafd.config import DataFormatName, MethodName, VerifiableFormat


def _methods() -> tuple[str, ...]:
    from fastafd.methods import registry

    return tuple(registry.names())


def _formats(verifiable: bool) -> tuple[str, ...]:
    from fastafd.data import registry

    return ("auto", *registry.names(verifiable=verifiable))


KINDS = {MethodName: _methods, DataFormatName: lambda: _formats(False), VerifiableFormat: lambda: _formats(True)}
"""Each registry-named field type and the function that lists its names."""


def of(kind: object) -> tuple[str, ...] | None:
    """The names a field of type ``kind`` may take, or None when ``kind`` names no registry."""
    names = KINDS.get(kind)  # type: ignore[call-overload]
    return names() if names is not None else None
