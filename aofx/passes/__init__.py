"""Graph passes, one per built-in scheme; importing a scheme's module registers its pass.

Each pass is a ``LinearRewrite`` (see ``_graph.py``): it says which weights it can take, how to
quantize one (``aofx.numerics``), and how to call its ``torch.ops.aofx`` op.
"""

from aofx.passes import (  # noqa: F401  (registers the passes)
    float8_dynamic_activation_float8_weight,
    float8_weight_only,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)
