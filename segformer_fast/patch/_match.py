"""Finding the modules to replace: the first rule that matches a module wins, and nothing inside
a matched module is visited."""
from __future__ import annotations

from typing import Callable, Iterator

import torch.nn as nn

Rule = tuple[Callable[[nn.Module], bool], Callable[[], type]]


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


def walk(model: nn.Module, rules: list[Rule]) -> Iterator[tuple[str, nn.Module, type]]:
    """Yield (dotted path, module, fused class) for each module matched by a rule."""
    def visit(prefix: str, module: nn.Module):
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            for pred, fused in rules:
                if pred(child):
                    yield path, child, fused()
                    break
            else:
                yield from visit(path, child)

    yield from visit("", model)
