"""A named-backend registry, shared by ``torch_impl.ssu_dispatch`` and
``jax_impl.ssu_dispatch`` (the pattern of vLLM's ``ssu_dispatch``)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """The backend choice and its options (vLLM's ``MambaConfig`` fields)."""

    backend: str
    enable_stochastic_rounding: bool = False
    # 0 selects the default number of philox rounds (10).
    stochastic_rounding_philox_rounds: int = 0


class MambaSSUBackend:
    """Base of the state-update backends: called like the framework's
    ``selective_state_update`` (torch: in place; JAX: returns ``(out, new_state)``),
    arguments forwarded as given. ``rounding`` holds the config's stochastic
    rounding options, as that function takes them."""

    name = "abstract"
    has_stochastic_rounding = True

    def __init__(self, mamba_config: MambaConfig):
        if mamba_config.enable_stochastic_rounding and not self.has_stochastic_rounding:
            raise ValueError(f"mamba_config: the {self.name} backend has no stochastic rounding")
        self._mamba_config = mamba_config
        self.rounding = dict(
            enable_stochastic_rounding=mamba_config.enable_stochastic_rounding,
            cache_philox_rounds=mamba_config.stochastic_rounding_philox_rounds)


# Options of the kernels that a reference function does not take.
KERNEL_ONLY_OPTIONS = ("is_blackwell", "validate_indices", "rounding_seed")


class FunctionBackend(MambaSSUBackend):
    """A backend that calls ``function``: a kernel with the config's rounding
    options, or a reference (``has_stochastic_rounding=False``) without the
    kernel-only options."""

    def __init__(self, mamba_config: MambaConfig, *, name: str, function: Callable,
                 has_stochastic_rounding: bool):
        self.name, self.has_stochastic_rounding = name, has_stochastic_rounding
        self._function = function
        super().__init__(mamba_config)

    def __call__(self, *args, **kwargs):
        if self.has_stochastic_rounding:
            return self._function(*args, **kwargs, **self.rounding)
        return self._function(*args, **{k: v for k, v in kwargs.items() if k not in KERNEL_ONLY_OPTIONS})


class BackendRegistry:
    """Maps backend names to factories ``factory(mamba_config) -> backend``
    and holds the one initialized backend of a framework."""

    def __init__(self, what: str):
        self._what = what
        self._factories: dict[str, Callable[[MambaConfig], Any]] = {}
        self._active: Any = None

    def register(self, name: str):
        def decorate(factory):
            self._factories[name] = factory
            return factory

        return decorate

    def register_function(self, name: str, function: Callable, *,
                          has_stochastic_rounding: bool = True) -> None:
        """Register ``function`` as the backend ``name`` (a ``FunctionBackend``)."""
        self._factories[name] = functools.partial(
            FunctionBackend, name=name, function=function,
            has_stochastic_rounding=has_stochastic_rounding)

    @property
    def names(self) -> list[str]:
        return list(self._factories)

    def initialize(self, mamba_config: MambaConfig) -> Any:
        name = mamba_config.backend
        if name not in self._factories:
            raise ValueError(
                f"Unknown {self._what} backend: {name!r}. Valid options: {self.names}"
            )
        self._active = self._factories[name](mamba_config)
        return self._active

    def get(self) -> Any:
        if self._active is None:
            raise RuntimeError(
                f"{self._what} backend has not been initialized. "
                "Call initialize_mamba_ssu_backend() first."
            )
        return self._active
