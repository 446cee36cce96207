"""The learner's training step (SFT, OPD), gradient accumulation, schedule and exact resume (one CPU rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner import bridge, checkpoint
from learner.config import LearnerSection, OPDStage, SFTStage
from learner.router import routers
from learner.testing import tiny_checkpoint
from learner.train import Learner
from zeda_rl.losses import token_logprobs

FAMILIES = ["qwen3_moe", "glm4_moe_lite"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("learner_train")
    return {f: tiny_checkpoint(f, root / f) for f in FAMILIES}


def sft_batch(b=4, s=12, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, s))
    loss_mask = np.zeros((b, s), np.uint8)
    loss_mask[:, 4:] = 1
    attn = np.ones((b, s), np.uint8)
    attn[1, 9:] = 0  # right padding on two rows
    attn[3, 6:] = 0
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attn}


SFT, OPD = SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0), OPDStage(lr=1e-2)


def make(ckpt, stage=SFT, save_dir=None, **kw):
    """A learner on `ckpt` with the `learner:` section's fields `kw` (over these tests' defaults) in `stage`."""
    return Learner(ckpt, LearnerSection(**{"grad_clip": 1.0, "micro_batch_tokens": 64, **kw}), stage, save_dir=save_dir)


def params(learner):
    return {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)}


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_steps_decrease_the_loss_and_report_metrics(ckpts, family):
    learner = make(ckpts[family])
    batch = sft_batch()
    ms = [learner.train_step(batch) for _ in range(5)]
    assert ms[-1]["sft_loss"] < ms[0]["sft_loss"] - 0.5
    n_moe = len(learner.info.moe_layers)
    for m in ms:
        assert m["aux_loss"] > 0 and len(m["aux_loss_per_layer"]) == n_moe
        assert 0 <= m["zero_ratio"] <= 1 and len(m["zero_ratio_per_layer"]) == n_moe
        assert m["grad_norm"] > 0 and m["tokens_per_s"] > 0
        assert m["tokens"] == float(batch["attention_mask"].sum())
        assert m["response_tokens"] == float((batch["loss_mask"] * batch["attention_mask"])[:, 1:].sum())
        assert m["loss"] == pytest.approx(m["sft_loss"] + m["aux_loss"])
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5]


def _student_logprobs(learner, batch):
    lg = learner.logits(batch["tokens"], batch["attention_mask"])
    out = np.zeros(batch["tokens"].shape, np.float32)
    out[:, 1:] = token_logprobs(lg, torch.as_tensor(batch["tokens"])).numpy()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_opd_steps_move_the_student_towards_the_teacher(ckpts, family):
    """The OPD loss uses fresh advantages, so its value is not a descent objective; what must fall is
    the per-token gap |log p_teacher - log p_student| on the sampled response tokens."""
    learner = make(ckpts[family], OPDStage(lr=3e-3))
    batch = sft_batch(seed=1)
    behaviour = _student_logprobs(learner, batch)
    rng = np.random.default_rng(0)
    teacher = behaviour + rng.normal(0.0, 1.0, behaviour.shape).astype(np.float32)  # up on some tokens, down on others
    batch.update(behaviour_logprobs=behaviour, teacher_logprobs=teacher)
    mask = (batch["loss_mask"] * batch["attention_mask"]).astype(bool)
    mask[:, 0] = False

    def gap():
        return float(np.abs(teacher - _student_logprobs(learner, batch))[mask].mean())

    before = gap()
    ms = [learner.train_step(batch) for _ in range(4)]
    after = gap()
    assert after < 0.8 * before
    m0 = ms[0]
    assert m0["reverse_kl"] == pytest.approx(
        float((behaviour - teacher)[mask].mean()), abs=1e-4
    )  # fresh = behaviour at step 1
    assert m0["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m0["clip_frac"] == 0.0
    assert m0["loss"] == pytest.approx(m0["policy_loss"] + m0["aux_loss"])
    assert all(m["aux_loss"] > 0 and 0 <= m["zero_ratio"] <= 1 for m in ms)
    # the student moved away from the behaviour policy; the official ratio (vs the learner's own old logprobs) never clips
    assert ms[-1]["behaviour_clip_frac"] > 0 and ms[-1]["behaviour_ratio_mean"] != 1.0
    assert all(m["clip_frac"] == 0.0 and m["ratio_mean"] == 1.0 for m in ms)


def test_opd_with_routing_replay_uses_the_given_experts(ckpts):
    learner = make(ckpts["qwen3_moe"], OPD)
    batch = sft_batch(seed=2)
    b, s = batch["tokens"].shape
    info = learner.info
    rng = np.random.default_rng(0)
    routed = np.stack(
        [rng.permutation(info.router.total)[: info.router.top_k] for _ in range(len(info.moe_layers) * b * s)]
    )
    routed = routed.reshape(b, s, len(info.moe_layers), info.router.top_k).astype(np.int16)
    batch.update(
        behaviour_logprobs=np.zeros((b, s), np.float32),
        teacher_logprobs=np.zeros((b, s), np.float32),
        routed_experts=routed,
    )
    m = learner.train_step(batch)
    valid = batch["attention_mask"].astype(bool)
    want = [float((routed[:, :, i][valid] >= info.num_experts).mean()) for i in range(len(info.moe_layers))]
    assert m["zero_ratio_per_layer"] == pytest.approx(want)


def test_gradient_accumulation_matches_one_micro_batch(ckpts):
    """alpha=0 (L_GA is per micro-batch by definition): 1 micro-batch vs 4 give the same gradient."""
    grads = {}
    for budget in (1000, 12):
        learner = make(ckpts["glm4_moe_lite"], alpha=0.0, micro_batch_tokens=budget)
        st = learner.accumulate(sft_batch())
        assert st["n_mb"] == (1 if budget == 1000 else 4)
        grads[budget] = dict(bridge.full_hf_state(learner.model, cast=False, grads=True))
        grads[budget]["loss"] = torch.tensor(st["sums"]["main"])
    for k in grads[1000]:
        torch.testing.assert_close(grads[12][k], grads[1000][k], atol=1e-6, rtol=1e-5)


def test_lr_schedule():
    c = SFTStage(lr=1.0, min_lr=0.1, schedule="cosine", warmup_frac=2 / 12, steps=12)
    assert c.warmup == 2 and [c.lr_at(i) for i in (0, 1)] == [0.5, 1.0]
    assert c.lr_at(2) == pytest.approx(1.0) and c.lr_at(7) == pytest.approx(0.55) and c.lr_at(12) == pytest.approx(0.1)
    assert SFTStage(lr=2.0, schedule="constant", warmup_frac=0.0).lr_at(500) == 2.0
    assert SFTStage(steps=50).warmup == 5 and OPDStage(lr=3.0).lr_at(0) == OPDStage(lr=3.0).lr_at(99) == 3.0
    with pytest.raises(ValueError, match="lr_typo"):
        SFTStage(lr_typo=1.0)
    with pytest.raises(ValueError, match="token_budget"):
        LearnerSection(token_budget=1)


def test_resume_continues_exactly(ckpts, tmp_path):
    """Train 2 steps, save, train 1 more; vs. resume from the save and train 1: identical params and loss."""
    stage = SFTStage(lr=1e-2, schedule="cosine", warmup_frac=0.1, steps=10)
    batches = [sft_batch(seed=i) for i in range(3)]
    a = make(ckpts["qwen3_moe"], stage, save_dir=tmp_path / "ck", checkpoint_every=2)
    for i in range(2):
        a.train_step(batches[i], data_cursor={"epoch": 0, "row": 4 * (i + 1)})
        assert a.saved_step == (2 if i == 1 else None)  # what the driver's phase-end save skips when equal to step
    saved = checkpoint.latest(tmp_path / "ck")
    assert saved is not None and saved.name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000002"]  # no temporary left
    m3 = a.train_step(batches[2])
    assert a.saved_step == 2 and a.step == 3
    p3 = params(a)

    b = make(ckpts["qwen3_moe"], stage, save_dir=tmp_path / "ck", checkpoint_every=2)
    meta = b.load(saved)
    assert meta["step"] == 2 and b.step == 2 and b.data_cursor == {"epoch": 0, "row": 8} and b.saved_step == 2
    r3 = b.train_step(batches[2])
    assert r3["loss"] == m3["loss"] and r3["lr"] == m3["lr"] and r3["step"] == 3
    q3 = params(b)
    assert all(torch.equal(p3[k], q3[k]) for k in p3)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_periodic_saves_keep_only_the_newest_checkpoints(ckpts, tmp_path):
    """A 30B checkpoint is ~430 GB: every save deletes all but learner.keep_checkpoints of the older step_* dirs.
    A newer step (another lineage's) and a directory of another name are not the saver's to delete."""
    root = tmp_path / "ck"
    a = make(ckpts["qwen3_moe"], save_dir=root, checkpoint_every=1, keep_checkpoints=2)
    a.save(root / "step_00000099")  # as if left by a longer run this one resumed from an earlier point
    (root / "step_final").mkdir()
    (root / "step_final" / "meta.json").write_text("{}")
    for i in range(4):
        a.train_step(sft_batch(seed=i))
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004", "step_00000099", "step_final"]
    assert checkpoint.latest(root).name == "step_00000099"  # by step number; other names are not checkpoints
    assert a.load(root / "step_00000004")["step"] == 4  # the kept ones are whole
    b = make(ckpts["qwen3_moe"], save_dir=root, checkpoint_every=1, keep_checkpoints=1)
    b.train_step(sft_batch(seed=9))  # step 1 of a new learner: nothing older than it to delete
    assert (root / "step_00000003").is_dir()
    b.save(root / "step_00000005")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000099", "step_final"]


def test_resume_refuses_another_layout(ckpts, tmp_path):
    a = make(ckpts["qwen3_moe"])
    a.train_step(sft_batch())
    a.save(tmp_path / "ck")
    b = make(ckpts["qwen3_moe"], alpha=0.2)
    with pytest.raises(ValueError, match="alpha"):
        b.load(tmp_path / "ck")


def test_stage_switch_resets_the_schedule(ckpts):
    learner = make(ckpts["qwen3_moe"], SFTStage(lr=1e-2, schedule="cosine", warmup_frac=0.5, steps=4))
    learner.train_step(sft_batch())
    c = learner.set_stage(OPDStage(lr=5e-3))
    assert c.name == learner.stage.name == "opd" and learner.stage_start == 1
    b = sft_batch()
    b.update(
        behaviour_logprobs=np.zeros(b["tokens"].shape, np.float32),
        teacher_logprobs=np.zeros(b["tokens"].shape, np.float32),
    )
    m = learner.train_step(b)
    assert m["lr"] == 5e-3 and "policy_loss" in m


def test_batch_errors_name_the_field(ckpts):
    learner = make(ckpts["qwen3_moe"], OPD)
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        learner.train_step(sft_batch())
    bad = sft_batch()
    bad["loss_mask"] = bad["loss_mask"][:, :5]
    with pytest.raises(ValueError, match="loss_mask"):
        make(ckpts["qwen3_moe"]).train_step(bad)
    assert routers(learner.model)  # the model is still usable


def test_micro_batch_plan_keeps_the_budget_across_ranks():
    from learner.batch import plan_micro_batches

    # rank 0: one long row; rank 1: many short rows. Separate maxima would pad to 64 x 4096.
    lengths = [[4096], [64] * 64]
    for rank in (0, 1):
        groups, common = plan_micro_batches(lengths, rank, token_budget=4096)
        assert all(rows * length <= 4096 or rows == 1 for rows, length in common), common
        assert sorted(i for g in groups for i in g) == list(range(len(lengths[rank])))
    # one rank: the greedy consecutive grouping, each group within the budget
    groups, common = plan_micro_batches([[10, 10, 30, 5, 5, 5]], 0, token_budget=60)
    assert groups == [[0, 1], [2, 3], [4, 5]] and common == [(2, 10), (2, 30), (2, 5)]


def test_gradients_are_clipped_to_the_global_norm(ckpts):
    from learner import parallel

    learner = make(ckpts["qwen3_moe"], grad_clip=1e-3)
    learner.accumulate(sft_batch())
    before = parallel.grad_norm(learner.model)
    assert before > 1e-3
    assert parallel.clip_grads(learner.model, 1e-3) == pytest.approx(before)  # reports the norm before
    assert parallel.grad_norm(learner.model) == pytest.approx(1e-3, rel=1e-3)
    assert parallel.clip_grads(learner.model, 0.0) == pytest.approx(1e-3, rel=1e-3)  # 0: disabled, untouched
    assert parallel.grad_norm(learner.model) == pytest.approx(1e-3, rel=1e-3)
    m = make(ckpts["qwen3_moe"], grad_clip=1e-3).train_step(sft_batch())
    assert m["grad_norm"] == pytest.approx(before, rel=1e-4)  # the metric is the norm before clipping


def test_expert_load_and_its_violation_of_uniform():
    """Slots per real expert (zero slots and unrecorded -1 left out) and the max / mean relative violation."""
    from learner.step_metrics import expert_load, load_violation

    ids = torch.tensor([[[[0, 1]], [[0, 4]]], [[[2, 3]], [[-1, -1]]]])  # [B=2, S=2, L=1, K=2], N=4 real, id 4 zero
    valid = torch.tensor([[True, True], [True, False]])[:, :, None, None].expand_as(ids)
    load = expert_load(ids, valid, 4)
    assert load.tolist() == [[2.0, 1.0, 1.0, 1.0]]
    v = load_violation(torch.cat([load, torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.zeros(1, 4)]))
    # mean 1.25: max (2 - 1.25) / 1.25 = 0.6, mean |.| = (0.75 + 3 * 0.25) / 4 / 1.25 = 0.3; uniform 0; empty 0
    assert v["max"] == pytest.approx([0.6, 0.0, 0.0]) and v["mean"] == pytest.approx([0.3, 0.0, 0.0])


def test_a_phase_end_save_is_skipped_when_the_state_is_on_disk_as_it_is(tmp_path):
    """A resumed run whose phase had nothing left to train rewrote the checkpoint it had just loaded (430 GB for
    Qwen3-30B-A3B) after each phase; so did a phase ending on a `checkpoint_every` step."""
    from launch.config import load_config
    from launch.pipeline import _save

    class Recorder:  # what _save reads of a LearnerGroup (state) and calls (save), recorded
        def __init__(self, step, saved_step):
            self.s, self.saves = {"step": step, "saved_step": saved_step}, []

        def state(self):
            return dict(self.s)

        def save(self, path):
            self.saves.append(path.name)

    cfg = load_config("launch/configs/tiny-cpu.yaml", {"output_dir": str(tmp_path)})
    for step, saved, want in ((790, 790, []), (800, 790, ["step_00000800"]), (800, None, ["step_00000800"])):
        learner = Recorder(step, saved)
        _save(cfg, learner)
        assert learner.saves == want
