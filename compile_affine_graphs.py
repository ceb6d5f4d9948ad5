"""Not code: the name ``TORCH_LOGS="compile_affine_graphs"`` refers to.

Torch parses ``TORCH_LOGS`` when it is imported, before ``compile_affine`` can register
a log name, and accepts a name it does not know only if it is an importable module; this
module makes it one. Nothing imports it. compile_affine logs each graph before and after
its pass to ``logging.getLogger("compile_affine_graphs")`` (compile_affine/trace.py).
"""
