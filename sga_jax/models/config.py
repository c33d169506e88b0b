"""What every model family's config dataclass shares: a JSON round trip and the checks of the
run settings (`dtype`, `param_dtype`, `attention`, `remat`), with clear errors."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax.numpy as jnp

from sga_jax.models import nn

C = TypeVar("C", bound="ModelConfig")


class ModelConfig:
    """Mixin for the frozen config dataclasses of the model families.

    `to_dict()` gives a JSON-ready dict (tuples as lists) that converters store beside weights and
    checkpoints; `from_dict()` inverts it (lists back to tuples, so configs stay hashable and
    usable as static arguments) and names any unknown field. `run_setting_problems()` checks the
    run settings: compute / parameter dtype names (every family has them), attention
    implementation and remat policy (where the family has them). Families whose attention needs a bias or mask narrow `attention_implementations`.
    """

    attention_implementations: tuple[str, ...] = nn.ATTENTION_IMPLEMENTATIONS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from `to_dict` output; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}; expected a subset of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def run_setting_problems(self) -> list[str]:
        """What is wrong with dtype / param_dtype / attention / remat, as messages (empty: fine).
        A family without attention or remat settings (a conv net) simply has no such field."""
        problems = []
        if hasattr(self, "attention") and self.attention not in self.attention_implementations:
            problems.append(f"attention {self.attention!r} is not one of {self.attention_implementations}")
        if hasattr(self, "remat") and self.remat not in nn.REMAT_POLICIES:
            problems.append(f"remat {self.remat!r} is not one of {nn.REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                problems.append(f"{name} {getattr(self, name)!r} is not a dtype name")
        return problems

    def check_positive_ints(self, *names: str) -> None:
        """Raise a ValueError naming the config class and the first of `names` that is not a positive int."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def check_heads(self, width: str = "hidden_size", heads: str = "num_attention_heads") -> None:
        """Raise a ValueError naming the config class when the `width` field does not split into `heads`."""
        if getattr(self, width) % getattr(self, heads):
            raise ValueError(f"{type(self).__name__}.{width} {getattr(self, width)} is not divisible by "
                             f"{heads} {getattr(self, heads)}")

    def check_run_settings(self) -> None:
        """Raise a ValueError naming the config class and every bad run setting."""
        problems = self.run_setting_problems()
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
