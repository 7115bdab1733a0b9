"""Config type -> how to apply it. Two registries, both looked up along the config's MRO.

* graph passes (``register_pass``): the built-in schemes; ``quantize_`` captures the module with
  ``torch.export`` and the pass rewrites ``aten.linear`` into an ``aofx`` op.
* module handlers (``register_quantize_module_handler``): eager ``handler(module, config) -> module``
  transforms, torchao's extension point for user-defined configs. As in torchao, a handler with a
  ``parameter_name`` keyword also takes an ``FqnToConfig`` key naming a parameter
  (``handler(module, config, parameter_name="weight")``).

A handler registered for a built-in config, or for a subclass of one, replaces its pass (``uses_handler``).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

from aofx.configs import AOBaseConfig

_PASSES: dict[type, object] = {}
_HANDLERS: dict[type, Callable] = {}


def _check_config_type(config_type) -> None:
    if not (isinstance(config_type, type) and issubclass(config_type, AOBaseConfig)):
        raise TypeError(f"expected a subclass of AOBaseConfig, got {config_type!r}")


def register_pass(config_type: type):
    """Class decorator: register a graph pass object (``aofx.passes._graph.LinearRewrite``) for a config type."""
    _check_config_type(config_type)

    def decorator(pass_cls):
        _PASSES[config_type] = pass_cls()
        return pass_cls

    return decorator


def register_quantize_module_handler(config_type: type):
    """Decorator: ``handler(module, config) -> module`` applied eagerly to each selected module."""
    _check_config_type(config_type)

    def decorator(handler: Callable):
        _HANDLERS[config_type] = handler
        return handler

    return decorator


def _lookup(table: dict, config_type: type):
    for klass in config_type.__mro__:
        if klass in table:
            return table[klass]
    return None


def find_pass(config: AOBaseConfig) -> Optional[object]:
    return _lookup(_PASSES, type(config))


def find_handler(config: AOBaseConfig) -> Optional[Callable]:
    return _lookup(_HANDLERS, type(config))


def handler_takes_parameter(config: AOBaseConfig) -> bool:
    """Whether ``config``'s handler takes ``parameter_name`` (torchao's test for parameter-level handlers)."""
    handler = find_handler(config)
    try:
        return handler is not None and "parameter_name" in inspect.signature(handler).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def uses_handler(config: AOBaseConfig) -> bool:
    """Whether a module handler, rather than a graph pass, applies ``config``: the registration on the
    class nearest along its MRO wins, a handler over a pass on the same class (torchao looks handlers up
    by exact type, and a later registration replaces an earlier one)."""
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return True
        if klass in _PASSES:
            return False
    return False


def check_registered(config: AOBaseConfig) -> None:
    """Raise a TypeError naming the config and every registered type when nothing handles it."""
    if find_pass(config) is None and find_handler(config) is None:
        known = sorted({t.__name__ for t in (*_PASSES, *_HANDLERS)})
        raise TypeError(
            f"no aofx pass or module handler is registered for {type(config).__name__}; registered config types: "
            f"{', '.join(known)}. Register one with @aofx.register_quantize_module_handler({type(config).__name__})."
        )
