"""Triton kernels for the UNet's hot layers. Imports nothing from runtime/.

Each op lives in its own module beside a pure-torch reference and is registered as a torch custom op:
`kernels.group_norm` (group_norm, group_norm_reference, launch), `kernels.attention` (attention,
attention_reference, launch), `kernels.geglu` (geglu, geglu_reference, launch) and `kernels.fused_linear`
(linear_geglu, linear_bias_residual, their references and launchers: GEMMs with those epilogues);
kernels/aot.py holds the ahead-of-time compilation convention they share.
Import the functions from their modules: the package itself exports no names that could shadow them.

transformers probes for Hugging Face's unrelated `kernels` package by importing whatever `kernels`
resolves to, so importing the package never raises and needs no triton; importing a kernel module
without triton raises ImportError.
"""
