"""The zero-expert transformers models: exactness with the mask, real skipping without it."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import zeda_rl  # noqa: F401  (registers the Auto classes)
from tests.helpers import save_static, widen_zero_rows
from zeda_rl.convert import convert_checkpoint
from zeda_rl.modeling import moe_blocks, record_routing, replay_routing, set_zce_mask
from zeda_rl.routing import zero_ratio

FAMILY_N = {"qwen3_moe": 8, "glm4_moe_lite": 8}


def _converted(tmp_path, family, zero=4, zero_type="zero", **overrides):
    static = save_static(family, tmp_path / "static", **overrides)
    out = convert_checkpoint(tmp_path / "static", tmp_path / "zeda", zero_experts=zero, zero_type=zero_type, seed=1)
    return static, out


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen3_moe", {}),
        ("qwen3_moe", {"mlp_only_layers": [0]}),
        ("glm4_moe_lite", {}),
        ("glm4_moe_lite", {"n_group": 2, "topk_group": 1}),
    ],
)
def test_mask_on_reproduces_original(tmp_path, family, overrides, impl):
    static, out = _converted(tmp_path, family, **overrides)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["use_zce_mask"] is False and cfg["zce_nums"] == [4] and cfg["zce_types"] == ["zero"]
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation=impl).eval()
    assert type(student).__name__ == cfg["architectures"][0]
    set_zce_mask(student, True)
    static.config._experts_implementation = impl
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (student(ids).logits - static(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    set_zce_mask(student, False)
    with torch.no_grad():
        assert (student(ids).logits - static(ids).logits).abs().max().item() > 1e-4  # zero slots now in play


class _GroupedRows(TorchDispatchMode):
    """Counts the (token, expert) rows the grouped GEMMs really compute."""

    rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._grouped_mm.default:
            self.rows += int(args[2][-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
def test_real_expert_work_falls_with_zero_share(tmp_path, family):
    _, out = _converted(tmp_path, family, zero=8)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    shares, grouped_rows, eager_flops = [], [], []
    for scale in (0.0, 1.0, 3.0, 10.0):
        for impl in ("grouped_mm", "eager"):
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation=impl).eval()
            widen_zero_rows(model, scale)
            with (
                torch.no_grad(),
                record_routing(model) as rec,
                _GroupedRows() as counter,
                FlopCounterMode(display=False) as flops,
            ):
                model(ids)
            real_pairs = int((rec() < 8).sum())
            if impl == "grouped_mm":
                shares.append(zero_ratio(rec(), 8)["overall"])
                # two grouped GEMMs per layer (gate_up, down), each over exactly the real pairs
                assert counter.rows == 2 * real_pairs
                grouped_rows.append(counter.rows)
            else:
                eager_flops.append(flops.get_total_flops())
    assert shares[0] < 0.3 and shares[-1] > 0.7, shares
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert all(a > b for a, b in zip(grouped_rows, grouped_rows[1:])), grouped_rows
    assert all(a > b for a, b in zip(eager_flops, eager_flops[1:])), eager_flops


def test_save_load_round_trip_and_replay(tmp_path):
    _, out = _converted(tmp_path, "glm4_moe_lite")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4MoeLitePlusPlusForCausalLM"] and cfg["use_zce_mask"] is False

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record_routing(model) as rec:
        ref = model(ids).logits
    recorded = rec()
    assert recorded.shape == (2, 9, 2, 2)  # [B, S, MoE layers, K]: layer 0 of GLM is dense
    with torch.no_grad(), replay_routing(model, recorded):
        assert torch.equal(model(ids).logits, ref)
    forced = torch.full_like(recorded, 8)  # every slot on a zero expert: MoE output is the shared expert only
    forced[..., 1] = 9
    with torch.no_grad(), replay_routing(model, forced), record_routing(model) as rec2:
        assert not torch.allclose(model(ids).logits, ref)
    assert zero_ratio(rec2(), 8)["overall"] == 1.0
    with pytest.raises(ValueError, match="routing replay"):
        with torch.no_grad(), replay_routing(model, recorded[:, :4]):
            model(ids)


def test_copy_type_adds_the_input(tmp_path):
    _, out = _converted(tmp_path, "qwen3_moe", zero_type="copy")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    blk = moe_blocks(model)[0]
    x = torch.randn(1, 3, 32)
    forced = torch.full((3, 2), 8)  # both slots on copy experts
    blk.replay, blk.replay_pos = forced.reshape(1, 3, 2), 0
    with torch.no_grad():
        y = blk(x)
    blk.replay = None
    weights = blk.gate(x.reshape(-1, 32), forced)[1].sum(-1, keepdim=True)
    assert torch.allclose(y.reshape(-1, 32), weights * x.reshape(-1, 32), atol=1e-6)
