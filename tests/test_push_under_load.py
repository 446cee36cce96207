"""Weight pushes under load: nothing in flight is lost, and nothing computed with old weights is served after.

Three client threads keep generation calls in flight on one engine while ten versions are pushed
from another thread (as the rollout actor's weight concurrency group does). What must hold, for the
torch engine and for the sglang backend over FakeSGLangEngine (a stand-in for sglang.Engine, not
SGLang; it models SGLang's prefix cache and its refusal to flush while requests run):
- every call returns, none raises: 0 requests lost across 10 pushes;
- every sample is wholly one version's: its logprobs are those the weights of its
  `policy_version` give to its tokens (a request in flight finished under the old version);
- right after a push, scoring a sequence scored before it gives the new weights' logprobs
  (no prefix or KV cache entry computed with old weights survives the push).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import zeda_rl  # noqa: F401
from actors.engine import make_engine
from actors.fake_sglang import FakeSGLangEngine
from tests.helpers import save_static
from zeda_rl.convert import convert_checkpoint
from zeda_rl.sampling import SamplingParams
from zeda_rl.weights import WeightUpdate, make_buckets

PUSHES = 10
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
PROBE = [4, 9, 16, 25, 36, 49, 3]  # scored before and after every push


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("push")
    save_static("qwen3_moe", d / "static", eos_token_id=1, pad_token_id=0)
    return convert_checkpoint(d / "static", d / "zeda", zero_experts=4, seed=0)


def _engine(backend: str, ckpt):
    if backend == "sglang":
        return make_engine("sglang", str(ckpt), _engine_factory=FakeSGLangEngine, flush_timeout_s=5)
    return make_engine("torch", str(ckpt))


def _versions(ref) -> dict[int, dict[str, torch.Tensor]]:
    """Weights v0..v10: v0 is the checkpoint, each next one a visible step away from the last."""
    states = {0: {k: v.clone() for k, v in ref.model.state_dict().items() if v.is_floating_point()}}
    g = torch.Generator().manual_seed(0)
    for v in range(1, PUSHES + 1):
        states[v] = {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in states[v - 1].items()}
    return states


def _score_under(ref, state, seqs) -> list[np.ndarray]:
    ref.model.load_state_dict(state, strict=False)
    return ref.score(seqs)


@pytest.mark.parametrize("backend", ["torch", "sglang"])
def test_ten_pushes_under_load_lose_nothing_and_serve_no_stale_state(backend, ckpt):
    eng, ref = _engine(backend, ckpt), make_engine("torch", str(ckpt))
    states = _versions(ref)
    stop, results, errors, calls = threading.Event(), [], [], [0, 0, 0]

    def client(i: int) -> None:
        params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=100 + i, stop_token_ids=[])
        while not stop.is_set():
            calls[i] += 1
            try:
                results.append((i, eng.generate(PROMPTS, params)))
            except Exception as err:  # noqa: BLE001 - a lost request is what the test counts
                errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    scored = []
    try:
        before = eng.score([PROBE])[0]  # now cached by a prefix cache, if the engine keeps one
        np.testing.assert_allclose(before, _score_under(ref, states[0], [PROBE])[0], atol=1e-5)
        for v in range(1, PUSHES + 1):
            n_before = len(results)
            assert eng.update_weights(WeightUpdate(v, make_buckets(states[v].items(), bucket_bytes=8192))) == v
            scored.append((v, eng.score([PROBE])[0]))
            while len(results) < n_before + 2 and not errors:  # load between pushes: calls land on each version
                threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)

    assert not errors, errors
    assert len(results) == sum(calls), f"{sum(calls) - len(results)} requests lost"
    for v, got in scored:  # the push's weights, not a cache of the previous ones
        want = _score_under(ref, states[v], [PROBE])[0]
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"score after push v{v}")
        assert np.abs(got - _score_under(ref, states[v - 1], [PROBE])[0]).max() > 1e-3

    seen = {s.policy_version for _, samples in results for s in samples}
    assert len(seen) >= PUSHES // 2, f"calls landed on versions {sorted(seen)} only: not under load"
    by_client: dict[int, list[int]] = {}
    for i, samples in results:
        assert len({s.policy_version for s in samples}) == 1  # one call, one version
        by_client.setdefault(i, []).append(samples[0].policy_version)
    assert all(vs == sorted(vs) for vs in by_client.values())  # no call sees an older version than the last

    checked = {}  # one call per version: its tokens' logprobs are that version's
    for _, samples in results:
        checked.setdefault(samples[0].policy_version, samples)
    for v, samples in sorted(checked.items()):
        want = _score_under(ref, states[v], [s.prompt_ids + s.output_ids for s in samples])
        for s, w in zip(samples, want):
            np.testing.assert_allclose(s.logprobs, w[len(s.prompt_ids) - 1 :], atol=1e-4, err_msg=f"v{v}")


def test_fake_sglang_refuses_a_flush_while_a_request_runs(ckpt):
    """The fake keeps SGLang's rule that the backend's retry exists for, and a push waits for the call in flight."""
    eng = _engine("sglang", ckpt)
    fake, entered, release = eng._engine, threading.Event(), threading.Event()
    real_one = fake._one

    def slow_one(*a, **kw):
        entered.set()
        release.wait(30)
        return real_one(*a, **kw)

    fake._one = slow_one
    running = threading.Thread(target=lambda: fake.generate(input_ids=[PROMPTS[0]], sampling_params={}))
    running.start()
    assert entered.wait(30)
    out = fake.flush_cache()
    assert not out.success and "pending requests" in out.message
    release.set()
    running.join(30)
    assert fake.flush_cache().success


def test_a_flush_that_never_lands_is_an_error_not_a_stale_cache(ckpt, monkeypatch):
    from actors.fake_sglang import FlushCacheReqOutput

    eng = make_engine("sglang", str(ckpt), _engine_factory=FakeSGLangEngine, flush_timeout_s=0.2)
    monkeypatch.setattr(eng._engine, "flush_cache", lambda: FlushCacheReqOutput(False, "pending requests"))
    state = {"model.norm.weight": torch.full((32,), 2.0)}
    with pytest.raises(RuntimeError, match=r"could not flush its cache after weight update v3 .*flush_timeout_s"):
        eng.update_weights(WeightUpdate(3, [list(state.items())]))
    assert eng.version == -1  # new weights, old cache: served as no version at all
