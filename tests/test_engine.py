"""The `torch` engine: KV-cache generation, logprobs, routed experts, scoring, weight updates."""

import numpy as np
import pytest
import torch

from actors.engine import make_engine
from tests.helpers import save_static
from zeda_rl.convert import convert_checkpoint
from zeda_rl.modeling import record_routing
from zeda_rl.sampling import SamplingParams


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    d = tmp_path_factory.mktemp("eng")
    save_static("qwen3_moe", d / "static", eos_token_id=1, pad_token_id=0)
    return convert_checkpoint(d / "static", d / "zeda", zero_experts=4, seed=0)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_greedy_matches_transformers_generate_and_scores(student):
    eng = make_engine("torch", str(student))
    samples = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(1,)))
    for p, s in zip(PROMPTS, samples):
        ref = eng.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6, eos_token_id=1, pad_token_id=0)
        assert s.output_ids == ref[0, len(p) :].tolist()[: len(s.output_ids)]
        # behaviour logprobs == a prefill score of the same tokens (batched left-padded decode vs right-padded prefill)
        score = eng.score([p + s.output_ids])[0]
        np.testing.assert_allclose(score[len(p) - 1 :], s.logprobs, atol=1e-5)
        # routed experts: what a full forward over the sequence chooses; the last token was never fed
        with torch.no_grad(), record_routing(eng.model) as rec:
            eng.model(torch.tensor([p + s.output_ids]))
        full = rec()[0].numpy()  # [P+O, L, K]
        assert s.routed_experts.shape == (len(p) + len(s.output_ids), 2, 2)
        assert (s.routed_experts[:-1] == full[:-1]).all() and (s.routed_experts[-1] == -1).all()


def test_sampling_seeded_top_p_and_stop(student):
    eng = make_engine("torch", str(student))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, stop_token_ids=(1,), seed=3)
    a = eng.generate(PROMPTS * 3, params)
    b = eng.generate(PROMPTS * 3, params)
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    assert len({tuple(s.output_ids) for s in a}) > 1
    for s in a:
        assert len(s.output_ids) == len(s.logprobs) <= 8
        assert (s.logprobs <= 0).all()
        assert (s.finish_reason == "stop") == (s.output_ids[-1] == 1)
        assert 1 not in s.output_ids[:-1]
    hot = eng.score([PROMPTS[0] + [3, 4]], temperature=2.0)[0]
    cold = eng.score([PROMPTS[0] + [3, 4]], temperature=1.0)[0]
    assert not np.allclose(hot, cold)


def test_weight_update_changes_outputs_and_version(student):
    from zeda_rl.weights import WeightUpdate, decode_update, encode_update, make_buckets

    eng = make_engine("torch", str(student))
    params = SamplingParams(temperature=0, max_new_tokens=5)
    before = [s.output_ids for s in eng.generate(PROMPTS, params)]
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in eng.model.state_dict().items() if v.is_floating_point()}
    upd = WeightUpdate(version=7, buckets=make_buckets(new.items(), bucket_bytes=4096))
    assert eng.update_weights(decode_update(encode_update(upd))) == 7
    after = eng.generate(PROMPTS, params)
    assert all(s.policy_version == 7 for s in after)
    assert [s.output_ids for s in after] != before
    for k, v in new.items():
        assert torch.equal(eng.model.state_dict()[k], v), k
