"""The GPU twin: Inductor's CUDA path for the plugin's graphs, on a machine without a GPU.

Two halves, each patching torch and triton only inside its own context manager (importing
this package patches nothing; every stand-in names the function it replaces):

* ``codegen``: compile training steps and inference for a fake CUDA device (an H100's or
  a V100's description), launching nothing: Inductor's CUDA decompositions, the plugin's
  GPU decisions (read off the graph's cuda values), the min-cut partitioner, CUDA lowering,
  Triton scheduling and codegen; kernels and bytes are counted.
* ``interpret``: run the Triton code Inductor writes for the plugin's graphs on CPU
  tensors through Triton's interpreter, with the pass deciding as on a GPU
  (``compile_affine.passes.target.decide_as``), to check it against eager in float64.
"""
