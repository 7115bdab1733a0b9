"""Triton kernels, in files by algorithm, and one small dispatch module per scheme.

Algorithms (each kernel serves every scheme whose math it fits; the code type is a constexpr):

    gemv.py      M = 1 (int4: M <= 2): CUDA-core GEMVs over int8 / e4m3 / int4 codes, and the dynamic
                 schemes' quantize-and-GEMV in one launch
    mm.py        M > 1: tensor-core GEMMs over weight codes (weight-only, int4, and dynamic on x's codes)
    quantize.py  the dynamic schemes' activation quantization (per token, or per tensor via partial maxima)
    dequant.py   the whole weight dequantized to x's dtype for cuBLAS at large M
    common.py    the one ``KernelConfig``, argument checks, ``by_m`` (the per-M choice, made at run time in
                 packages), the split-K policy, the SM count, grouped tile order, code conversion and the
                 epilogue store
    ptx.py       the inline PTX snippets (e4m3 -> bf16, int4 -> bf16, dp4a)

Schemes (layout doc, config table, per-M ``select_config`` and ``linear``; one name per scheme, as the ops,
passes and configs use): ``int4_weight_only``, ``int8_weight_only``, ``int8_dynamic_activation_int8_weight``,
``float8_weight_only`` (int8 weight-only's paths on e4m3 codes), ``float8_dynamic_activation_float8_weight``
(int8 dynamic's paths on e4m3 codes).
"""
