"""What every codebase adapter shares: rules that find parts, and binding a fused forward.

An adapter (one file per codebase) is a ``NAME``, a ``matches(model)`` test and ``RULES``: for
each kind of part, a predicate that recognises it, the fused forward to bind onto it (a plain
function taking the module as ``self``, written with the codebase's attribute names and return
convention), and a check that says why a given instance cannot be fused.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Rule:
    kind: str                                       # "patch_embed", "attention", "mix_ffn", "decode_head"
    matches: Callable[[nn.Module], bool]
    forward: Callable                               # forward(self, *args, **kwargs), bound per instance
    unfusable: Callable[[nn.Module], str | None] = lambda m: None   # why not (None: it can be)


def has(m: nn.Module, *paths: str) -> bool:
    """Whether every dotted attribute path exists on ``m``."""
    for path in paths:
        obj = m
        for part in path.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
    return True


def class_named(*names: str) -> Callable[[nn.Module], bool]:
    return lambda m: type(m).__name__ in names


def walk(model: nn.Module, rules: list[Rule]) -> Iterator[tuple[str, nn.Module, Rule]]:
    """Yield (dotted path, module, rule) for each module matched by a rule, the model itself
    included (a bare part); the first rule that matches wins and nothing inside it is visited."""
    def visit(path: str, module: nn.Module):
        for rule in rules:
            if rule.matches(module):
                yield path, module, rule
                return
        for name, child in module.named_children():
            yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit("", model)


# ----------------------------------------------------------------------------- per instance
_STATE = ("forward", "_sf_patched", "_sf_backend", "_sf_cache", "_sf_warned")


def bind(m: nn.Module, rule: Rule, adapter: str, backend: str | None) -> None:
    """Give ``m`` the fused forward (an instance attribute: class, hooks, Parameters and
    ``state_dict`` stay as they are) and its pinned backend (None: the process-wide choice)."""
    d = m.__dict__
    d["forward"] = types.MethodType(rule.forward, m)
    d["_sf_patched"] = f"{adapter}.{rule.kind}"
    d["_sf_backend"] = backend
    d["_sf_cache"] = {}


def unbind(m: nn.Module) -> bool:
    d = m.__dict__
    if "_sf_patched" not in d:
        return False
    for k in _STATE:
        d.pop(k, None)
    return True


def is_patched(m: nn.Module) -> bool:
    return "_sf_patched" in m.__dict__


def backend_of(m: nn.Module) -> str | None:
    return m.__dict__.get("_sf_backend")


def cache_of(m: nn.Module) -> dict:
    return m.__dict__.setdefault("_sf_cache", {})


def stock_forward(m: nn.Module, *args, **kwargs):
    """The module's own class forward: exact by definition (attention probabilities asked for,
    masks, dropout on probabilities, parts that cannot be fused)."""
    return type(m).forward(m, *args, **kwargs)


def checked(unfusable: Callable[[nn.Module], str | None], fused: Callable) -> Callable:
    """A forward that runs ``fused`` while ``unfusable(self)`` finds nothing, else the stock
    forward with a one-time warning: for parts read wholesale by weight (the decoder fold),
    whose projections may change after patching (LoRA added, hooks registered)."""
    def forward(self, *args, **kwargs):
        why = unfusable(self)
        if why is not None:
            warn_unfused(self, why)
            return stock_forward(self, *args, **kwargs)
        return fused(self, *args, **kwargs)
    return forward


def warn_unfused(m: nn.Module, why: str) -> None:
    """Say once per module that it runs its stock forward (a part changed after patching, e.g.
    LoRA added to the decode head's projections): exact, but not fused."""
    if torch.compiler.is_compiling() or m.__dict__.get("_sf_warned") == why:
        return
    m.__dict__["_sf_warned"] = why
    warnings.warn(f"segformer_fast: {type(m).__name__} runs its stock forward: {why}", stacklevel=3)
