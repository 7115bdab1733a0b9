"""``torch.ops.aofx.*``: one ``triton_op`` per scheme, importing a module registers its op.

Each op body branches on the device: CUDA with bf16/fp16 activations runs the scheme's Triton
kernels through ``wrap_triton`` (so eager, ``torch.compile``, ``torch.export`` and AOTInductor all
see the same code), every other case runs the ``aofx.numerics`` reference.
"""

from aofx.ops import (  # noqa: F401  (registers the ops)
    float8_dynamic_activation_float8_weight,
    float8_weight_only,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)
