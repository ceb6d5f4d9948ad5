"""Every private torch API the package touches: the compatibility watch's list.

Pattern passes stop matching silently after a torch upgrade, and this package leans on
Inductor's private surface (the custom-pass config, the pattern matcher, the partitioner's
tags, the compile wrapper). ``tests/test_compat_watch.py`` imports each entry and fails,
naming it, when one is missing; docs/design.md ("The compatibility watch") shows the same
table, and the test keeps the two equal. The other half of the watch, pinned fold counts,
is ``tests/test_fold_watch.py``. Nothing here is imported at run time.
"""

from __future__ import annotations

import dataclasses

CHECKED_OLDEST, CHECKED_NEWEST = "2.11.0", "2.15.0"
"""The torch releases every entry was checked on (CI's ``make test-min-core`` and ``make test-next-core``)."""


@dataclasses.dataclass(frozen=True)
class Api:
    module: str
    name: str
    """An attribute of ``module``, dotted for a member of a class or of a config module."""
    used_by: str
    since: tuple[int, int] = (2, 11)
    """Checked absent from 2.11 and present in this torch (the releases between were not
    installed); ``_compat`` holds the shim for older ones."""


APIS: tuple[Api, ...] = (
    # the pass and how it is installed
    Api("torch._inductor.config", "joint_custom_pre_pass", "backend.py"),
    Api("torch._inductor.custom_graph_pass", "CustomGraphPass", "passes/fold.py"),
    Api("torch._inductor.custom_graph_pass", "get_hash_for_files", "passes/fold.py"),
    Api("torch._inductor.custom_graph_pass", "get_custom_graph_passes", "_compat.py", since=(2, 14)),
    Api("torch._inductor.pattern_matcher", "PatternMatcherPass", "passes/sites/find.py"),
    Api("torch._inductor.pattern_matcher", "register_graph_pattern", "passes/sites/find.py"),
    Api("torch._inductor.pattern_matcher", "CallFunction", "passes/sites/find.py"),
    Api("torch._inductor.pattern_matcher", "Arg", "passes/sites/find.py"),
    Api("torch._inductor.pattern_matcher", "Match", "passes/sites/find.py"),
    Api("torch._inductor.pattern_matcher", "stable_topological_sort", "passes/fold.py"),
    Api("torch._inductor.fx_passes.post_grad", "same_meta", "passes/normalise/forms.py"),
    Api("torch._inductor.compile_fx", "compile_fx", "_compat.py"),
    Api("torch._inductor.compile_fx", "inductor_metrics_log", "bench/core/measure.py"),
    Api("torch", "_TorchCompileInductorWrapper.__call__", "_compat.py, install.py"),
    Api("torch._dynamo.backends.registry", "_COMPILER_FNS", "__init__.py"),
    Api("torch._guards", "TracingContext.try_get", "backend.py"),
    Api("torch._ops", "OpOverload", "_compat.py, passes/graph.py, passes/mutations.py"),
    Api("torch._dynamo", "register_backend", "__init__.py"),
    Api("torch._dynamo", "reset", "install.py"),
    Api("torch._dynamo", "explain", "explain.py"),
    # what the partitioner reads off the joint graph's nodes (meta["recompute"])
    Api("torch.utils.checkpoint", "CheckpointPolicy.PREFER_RECOMPUTE", "passes/rewrite/masks.py"),
    Api("torch.utils.checkpoint", "CheckpointPolicy.MUST_RECOMPUTE", "passes/rewrite/common.py"),
    Api("torch._functorch.partitioners", "min_cut_rematerialization_partition", "bench/core/runner.py"),
    # the CPU epilogue's lowering
    Api("torch._inductor.lowering", "lowerings", "_compat.py"),
    Api("torch._inductor.lowering", "make_fallback", "_compat.py"),
    Api("torch._inductor.lowering", "tag_to_layout_constraint", "_compat.py"),
    Api("torch._inductor.lowering", "user_lowerings", "_compat.py", since=(2, 14)),
    Api("torch._library.utils", "get_layout_constraint_tag", "_compat.py"),
    Api("torch._inductor.ir", "TensorBox", "passes/epilogue.py"),
    Api("torch._C", "_has_mkldnn", "passes/epilogue.py"),
    Api("torch.ops.mkldnn", "_convolution_pointwise", "ops.py"),
    Api("torch.ops.mkldnn", "_is_mkldnn_bf16_supported", "ops.py"),
    Api("torch.ops.mkldnn", "_is_mkldnn_fp16_supported", "ops.py"),
    Api("torch._inductor.mkldnn_ir", "ConvolutionUnary", "passes/epilogue.py"),
    Api("torch._prims_common", "make_channels_last_strides_for", "ops.py"),
    Api("torch._prims_common", "make_contiguous_strides_for", "ops.py"),
    # logging, tracing, the record store
    Api("torch._logging._internal", "register_log", "__init__.py"),
    Api("torch._logging._internal", "log_state", "trace.py"),
    Api("torch._logging._internal", "LazyTraceHandler", "trace.py"),
    Api("torch._logging._internal", "trace_log", "trace.py"),
    Api("torch._logging", "trace_structured", "trace.py"),
    Api("torch._logging", "set_logs", "trace.py"),
    Api("torch._inductor.runtime.cache_dir_utils", "cache_dir", "record_store.py"),
    Api("torch.utils._pytree", "tree_map", "explain.py, bench/twin/fake_cuda.py"),
    # the benchmark and the tests
    Api("torch._inductor.utils", "fresh_cache", "bench/core/measure.py"),
    Api("torch._inductor.decomposition", "select_decomp_table", "bench/core/runner.py"),
    Api("torch._functorch.aot_autograd", "make_boxed_func", "bench/core/runner.py"),
    Api("torch._dynamo.backends.common", "aot_autograd", "bench/core/runner.py"),
    Api("torch._inductor.config", "fx_graph_cache", "bench/core/measure.py"),
    Api("torch._inductor.config", "patch", "bench/core/measure.py, bench/twin/"),
    Api("torch._functorch.config", "patch", "bench/core/measure.py, bench/twin/fake_cuda.py"),
    Api("torch._functorch.config", "enable_autograd_cache", "bench/core/measure.py"),
    Api("torch._dynamo.config", "recompile_limit", "bench/core/runner.py"),
    Api("torch._dynamo.config", "accumulated_recompile_limit", "bench/core/runner.py"),
    Api("torch._dynamo.config", "automatic_dynamic_shapes", "bench/core/runner.py"),
    Api("torch._dynamo.config", "optimize_ddp", "bench/modes/ddp_splits.py"),
    Api("torch._dynamo.config", "compiled_autograd", "bench/modes/ddp_splits.py"),
    # the GPU twin (bench/twin/): Inductor's Triton path on this CPU
    Api("torch._inductor.config", "cpu_backend", "bench/twin/interpret.py"),
    Api("torch._inductor.config", "compile_threads", "bench/twin/interpret.py"),
    Api("torch._inductor.runtime.triton_helpers", "libdevice", "bench/twin/interpret.py"),
    Api("torch._inductor.runtime.triton_helpers", "set_driver_to_cpu", "bench/twin/interpret.py"),
    Api("torch.utils._python_dispatch", "TorchDispatchMode", "bench/twin/fake_cuda.py"),
    Api("torch._subclasses.fake_tensor", "FakeTensor", "bench/twin/codegen.py"),
    Api("torch._subclasses.fake_tensor", "FakeTensorMode", "bench/twin/codegen.py"),
    Api("torch._dynamo.device_interface", "CudaInterface", "bench/twin/fake_cuda.py"),
    Api("torch._dynamo.device_interface", "caching_worker_device_properties", "bench/twin/fake_cuda.py"),
    Api("torch._dynamo.device_interface", "caching_worker_current_devices", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.async_compile", "AsyncCompile.triton", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.codegen.triton", "TritonScheduling.define_kernel", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.compile_fx", "compile_fx_inner", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.constant_folding", "ConstantFolder.run", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.fx_passes.fuse_attention", "_sfdp_init", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.fx_passes.pad_mm", "_should_pad", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.fx_passes.joint_graph", "lazy_init", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.fx_passes.joint_graph", "pass_patterns", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.fx_passes.post_grad", "lazy_init", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.fx_passes.post_grad", "pass_patterns", "bench/twin/fake_cuda.py"),
    Api("torch._inductor.runtime.hints", "DeviceProperties.create", "bench/twin/fake_cuda.py"),
    Api("torch._functorch.config", "force_non_lazy_backward_lowering", "bench/twin/fake_cuda.py"),
    Api("torch.utils._triton", "has_triton", "bench/twin/fake_cuda.py"),
    Api("torch.fx.traceback", "set_grad_fn_seq_nr", "bench/twin/engine.py"),
    Api("torch.autograd.graph", "Node._input_metadata", "bench/twin/engine.py"),
)


def table() -> str:
    """The markdown table docs/design.md shows ("The compatibility watch"), row for row."""
    rows = ["| module | name | used by (under `compile_affine/`) | since |", "|---|---|---|---|"]
    for a in APIS:
        since = "" if a.since == (2, 11) else "%d.%d (shimmed before)" % a.since
        rows.append(f"| `{a.module}` | `{a.name}` | {a.used_by} | {since} |")
    return "\n".join(rows)
