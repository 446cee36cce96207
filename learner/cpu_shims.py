"""CPU shims that let megatron-core 0.16 run without CUDA (tests, the embedded CPU default).

Megatron-core assumes a GPU in a handful of places that have nothing to do with the
maths: RNG bookkeeping, streams, a few tensors created with ``device='cuda'``, an
optional TransformerEngine symbol, and numpy split sizes for the all-to-all. Each shim
below fixes exactly one of those; the CUDA ones are applied only when
``torch.cuda.is_available()`` is False, and ``apply()`` is idempotent. They are import-time monkeypatches, kept in this
one module so a megatron-core upgrade that moves or fixes one of them shows up in
``tests/test_learner_shims.py`` (one test per shim) and nowhere else.

Two of them are about TransformerEngine being absent rather than CUDA (Megatron half
announces TE when it is not installed); those apply on GPU machines without TE as well.

What runs on CPU with these (gloo backend): GPTModel with the local (non-TE) layer
specs, MoE layers with the ``allgather`` and ``alltoall`` dispatchers over expert
parallelism, Megatron's RNG tracker (``model_parallel_cuda_manual_seed``), and the
grad-norm / clipping helpers of ``megatron.core.optimizer.clip_grads``, Megatron's DDP and its
optimizers: fp32, bf16 mixed precision (fp32 master weights) and the distributed optimizer
(gloo in torch 2.13 has all_gather_into_tensor and reduce_scatter_tensor).

Note: with ``use_cpu_initialization`` the experts are drawn without the expert-parallel
RNG fork, so rank 0's expert 0 equals rank 1's expert 0; EP runs must load weights
explicitly (``learner.bridge``), never rely on initialisation.

Side effect worth knowing: in a CUDA-less process the patches are process-wide (e.g.
``torch.cuda.manual_seed`` then seeds the CPU generator, ``torch.cuda.synchronize`` is a
no-op), including for other code running in the same process (a pytest session).
"""

from __future__ import annotations

import contextlib
import types

import torch

_APPLIED = False
_TE_APPLIED = False
# name -> one-line claim; the test module checks each of these.
SHIMS: dict[str, str] = {}


def _shim(name: str, claim: str):
    def deco(fn):
        SHIMS[name] = claim
        fn.shim_name = name
        return fn

    return deco


def needed() -> bool:
    """The CUDA shims are for CUDA-less processes only; on a GPU Megatron runs unpatched by them."""
    return not torch.cuda.is_available()


# ---- 1. RNG -------------------------------------------------------------------------------------


def _cpu_get_rng_state(device="cuda", *args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, *args, **kwargs):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    # torch.default_generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


@_shim(
    "rng",
    "torch.cuda.{get,set}_rng_state/manual_seed and Megatron's _get/_set_cuda_rng_state "
    "act on the CPU generator, so model_parallel_cuda_manual_seed and the RNG tracker forks work",
)
def _rng() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    for mod in (torch.cuda, torch.cuda.random):
        mod.get_rng_state = _cpu_get_rng_state
        mod.set_rng_state = _cpu_set_rng_state
        mod.manual_seed = _cpu_manual_seed
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state


# ---- 2. device, streams, events -----------------------------------------------------------------


class _DummyStream:
    """Stands for a CUDA stream on CPU: everything is already ordered, so every call is a no-op."""

    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _DummyEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_STREAM = _DummyStream()


@_shim(
    "device_streams",
    "torch.cuda.current_device() answers the CPU device; torch.cuda.Stream/Event/current_stream/"
    "default_stream/stream()/synchronize are no-op dummies (the alltoall dispatcher makes a stream)",
)
def _device_streams() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyEvent
    torch.cuda.current_stream = lambda device=None: _STREAM
    torch.cuda.default_stream = lambda device=None: _STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    torch.cuda.synchronize = lambda device=None: None


# ---- 3. TransformerEngine symbol ----------------------------------------------------------------


@_shim(
    "te_general_gemm",
    "megatron.core.transformer.moe.moe_utils.te_general_gemm exists (None) without TransformerEngine, "
    "so the router's gating GEMM takes its torch path instead of raising NameError",
)
def _te_general_gemm() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ---- 3b. TransformerEngine absent but announced ---------------------------------------------------


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@_shim(
    "mla_have_te",
    "megatron.core.transformer.multi_latent_attention.HAVE_TE is False without TransformerEngine "
    "(upstream sets it True because extensions.transformer_engine imports with MagicMock stand-ins, "
    "and MLASelfAttention then calls isinstance(..., <MagicMock>) and raises TypeError)",
)
def _mla_have_te() -> None:
    import megatron.core.transformer.multi_latent_attention as mla

    if not _have_te():
        mla.HAVE_TE = False


# ---- 4. all-to-all split sizes ------------------------------------------------------------------


def _wrap_move_to_cpu(orig):
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._zeda_cpu_shim = True
    return maybe_move_tensor_to_cpu


@_shim(
    "alltoall_splits",
    "maybe_move_tensor_to_cpu(as_numpy=True) returns numpy for CPU tensors too (upstream converts "
    "only CUDA tensors), so the alltoall dispatcher's split sizes are host arrays as it expects",
)
def _alltoall_splits() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    if getattr(moe_utils.maybe_move_tensor_to_cpu, "_zeda_cpu_shim", False):
        return
    wrapped = _wrap_move_to_cpu(moe_utils.maybe_move_tensor_to_cpu)
    moe_utils.maybe_move_tensor_to_cpu = wrapped
    token_dispatcher.maybe_move_tensor_to_cpu = wrapped


# ---- 5. literal device='cuda' in optimizer, grad-norm and param-buffer modules --------------------


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    d = torch.device(device)
    return torch.device("cpu") if d.type == "cuda" else d


def _redirect(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapped


class _CpuTorch(types.ModuleType):
    """`torch` as seen by one Megatron module: tensor factories map device='cuda' to the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "arange")

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _redirect(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU stand-in for clip_grads.clip_grad_by_total_norm_fp32 (upstream asserts CUDA tensors).

    Same contract: scale every grad in place by max_norm / (total_norm + 1e-6) when that is < 1.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for g in grads:
            g.mul_(coeff)


_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",  # the default causal mask of the local attention
    "megatron.core.transformer.moe.moe_utils",  # the MoE aux-loss logging tracker
    "megatron.core.utils",  # local_multi_tensor_l2_norm, the grad-norm fallback without apex/TE
)


@_shim(
    "cuda_literals",
    "tensors that megatron.core.optimizer.{clip_grads,optimizer}, distributed.param_and_grad_buffer, "
    "transformer.utils (default causal mask), transformer.moe.moe_utils and core.utils (grad-norm "
    "fallback) create with device='cuda' "
    "land on the CPU; clip_grad_by_total_norm_fp32 (which asserts CUDA tensors) is replaced by a CPU "
    "version with the same contract",
)
def _cuda_literals() -> None:
    import importlib

    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        if not isinstance(mod.torch, _CpuTorch):
            mod.torch = _CpuTorch()
    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


# ---- 6. CUDA type names in the mixed-precision optimizers -----------------------------------------


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and not self.is_cuda:
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _with_cuda_type_names(init):
    def __init__(self, *args, **kwargs):
        torch.Tensor.type = _cuda_type_name
        try:
            init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE

    __init__._zeda_cpu_shim = True
    return __init__


@_shim(
    "optimizer_param_types",
    "Float16OptimizerWithFloat16Params and DistributedOptimizer accept host parameters: while they are "
    "built, Tensor.type() names a CPU tensor as its CUDA type (upstream sorts parameters into fp16/bf16/"
    "fp32 by the strings 'torch.cuda.*Tensor' and raises TypeError on anything else)",
)
def _optimizer_param_types() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        if not getattr(cls.__init__, "_zeda_cpu_shim", False):
            cls.__init__ = _with_cuda_type_names(cls.__init__)


_CUDA_SHIMS = (_rng, _device_streams, _alltoall_splits, _cuda_literals, _optimizer_param_types)
_TE_SHIMS = (_te_general_gemm, _mla_have_te)  # about TransformerEngine being absent, GPU or not


def apply(force: bool = False) -> bool:
    """Apply the shims once; returns whether the CUDA ones are active.

    The two TransformerEngine shims apply whenever TE is not installed (a GPU machine
    without TE needs them too); the CUDA shims only in a process without CUDA (or with
    `force`). Safe to call from every entry point (model building, Ray actors, tests): a
    second call does nothing. Must run before Megatron creates models or RNG trackers.
    """
    global _APPLIED, _TE_APPLIED
    if not _TE_APPLIED:
        if not _have_te():
            for shim in _TE_SHIMS:
                shim()
        _TE_APPLIED = True
    if _APPLIED:
        return True
    if not (force or needed()):
        return False
    for shim in _CUDA_SHIMS:
        shim()
    _APPLIED = True
    return True


def applied() -> bool:
    return _APPLIED
