"""Does OPD's gain come from the student's own prefixes? The dense objective on the student's samples (on-policy,
what OPD does) against the same objective on the teacher's samples (off-policy: supervised KD, GKD's lambda = 0).

Both arms start from the same SFT student of each seed (`zeda baselines` keeps it, OUT/zeda-sN/student-sft) and
share every line but the sampler: the config's OPD prompt stream and sizes (prompts per step, samples per prompt,
steps, lr), samples at temperature 1 with no truncation, the exact reverse KL(p_S || p_T) over the vocabulary at
every response position as `opd.objective: full_kl` takes it (per-sample token mean, then the mean over samples),
plus L_GA summed over MoE layers, AdamW with the learner's defaults and its gradient clip. Plain PyTorch on the HF
checkpoints (no Ray, no Megatron), so the on-policy arm reproduces the pipeline's OPD only up to the learner's
implementation; the arms are compared with each other. Each student is written as ROOT/zeda-sN/student, ready for
`bench/opd_vs_sft.py --recipe NAME=ROOT` (and `--vs` for the arms against each other).

    python bench/opd_prefixes.py --config launch/configs/tiny-cpu-hard-lean.yaml \\
        --baselines runs/tiny-cpu-hard-lean-baselines --seeds 0,1,2 --out runs/lean-opd/prefixes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _batch(prompts: list[list[int]], responses: list[list[int]], pad: int):
    """Right-padded sequences; `resp[j, t]`: position t predicts a response token of row j."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    resp = torch.zeros((len(seqs), n - 1), dtype=torch.bool)
    for j, (s, p) in enumerate(zip(seqs, prompts)):
        ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        resp[j, len(p) - 1 : len(s) - 1] = True
    return ids, mask, resp


def _router_logits(model):
    """Forward hooks that keep each MoE router's logits ([tokens, N + N_Z]) of the last forward."""
    from zeda_rl.modeling import moe_blocks

    kept: list[torch.Tensor] = []
    for block in moe_blocks(model):
        block.gate.register_forward_hook(lambda mod, args, out: kept.append(out[0]))
    return kept


def train_arm(
    cfg,
    student_dir: Path,
    teacher,
    tok,
    sampler: str,
    seed: int,
    out: Path,
    divergence: str = "reverse",
    temperature: float = 1.0,
) -> dict:
    from launch.streams import chat_format, opd_prompts
    from zeda_rl.evaluate import load
    from zeda_rl.losses import group_aux_loss
    from zeda_rl.modeling import router_spec
    from zeda_rl.probe import sample_ids

    o, lc = cfg.opd, cfg.learner
    torch.manual_seed(seed)
    student, _ = load(student_dir)
    spec = router_spec(student.config)
    stream = opd_prompts(cfg, chat_format(cfg, tok))
    kept = _router_logits(student)
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2 and not n.endswith(".bias")]
    rest = [p for n, p in student.named_parameters() if not (p.dim() >= 2 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": lc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(lc.betas),
        eps=lc.eps,
    )
    pad, t0, log = tok.pad_token_id or 0, time.time(), []
    for step in range(o.steps):
        drawn, _ = stream.take(o.prompts_per_step)
        texts = [tok.decode(p) for p in drawn for _ in range(o.samples_per_prompt)]
        prompts = [list(p) for p in tok(texts).input_ids]  # as sample_ids encodes them
        policy = student if sampler == "student" else teacher
        student.eval()
        responses = sample_ids(
            policy, tok, texts, cfg.sampling.max_new_tokens, seed=seed * 100_003 + step, temperature=temperature
        )
        ids, mask, resp = _batch(prompts, responses, pad)
        with torch.no_grad():
            lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        student.train()
        kept.clear()
        ls = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        if divergence == "reverse":  # [rows, positions]: the exact KL at each response position, as full_kl takes it
            kl = (ls.exp() * (ls - lt)).sum(-1) * resp
        else:  # forward KL(p_T || p_S): mass-covering, the teacher's whole distribution as a soft label
            kl = (lt.exp() * (lt - ls)).sum(-1) * resp
        per_sample = kl.sum(1) / resp.sum(1).clamp_min(1)
        loss_kl = per_sample.mean() if o.loss_agg == "sample_mean" else kl.sum() / resp.sum()
        tokens = mask.reshape(-1).bool()
        aux = sum(
            group_aux_loss(
                torch.softmax(z.float(), -1)[tokens], spec.num_experts, spec.num_zero, spec.top_k, lc.alpha, lc.w
            )
            for z in kept
        )
        opt.zero_grad(set_to_none=True)
        (loss_kl + aux).backward()
        if lc.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), lc.grad_clip)
        opt.step()
        log.append({"step": step + 1, "reverse_kl": loss_kl.item(), "aux": float(aux.item())})
        if (step + 1) % 50 == 0:
            print(
                f"  {sampler} s{seed} step {step + 1}: KL {log[-1]['reverse_kl']:.4f} L_GA {log[-1]['aux']:.4f}",
                flush=True,
            )
    student.eval()
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log))
    return {"seconds": round(time.time() - t0, 1), "kl_first_50": _mean(log[:50]), "kl_last_50": _mean(log[-50:])}


def agreement(cfg, student_dir: Path, teacher, tok, seed: int, n: int = 1024) -> dict:
    """How often the SFT student's temperature-1 answer to an OPD prompt differs from the teacher's: drawn with
    the same random numbers (what separates the arms' samples at step 1), and the teacher's from two draws
    (what sampling alone varies)."""
    from launch.streams import chat_format, opd_prompts
    from zeda_rl.evaluate import load
    from zeda_rl.probe import sample_ids

    student, _ = load(student_dir)
    drawn, _ = opd_prompts(cfg, chat_format(cfg, tok)).take(n)
    texts = [tok.decode(p) for p in drawn]
    m = cfg.sampling.max_new_tokens
    s, t, t2 = (
        sample_ids(model, tok, texts, m, seed=k)
        for model, k in ((student, 2 * seed + 1), (teacher, 2 * seed + 1), (teacher, 2 * seed + 2))
    )
    return {
        "prompts": n,
        "student_vs_teacher_same_draws": round(sum(a != b for a, b in zip(s, t)) / n, 4),
        "teacher_vs_teacher_two_draws": round(sum(a != b for a, b in zip(t, t2)) / n, 4),
    }


def _mean(rows: list[dict]) -> float:
    return round(sum(r["reverse_kl"] for r in rows) / max(len(rows), 1), 5)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--baselines", required=True, help="a `zeda baselines` output dir with zeda-sN/student-sft")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/lean-opd/prefixes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--agreement-only", action="store_true", help="only how often the arms' samples differ")
    ap.add_argument("--samplers", default="student,teacher", help="the arms: whose samples the KL is taken on")
    ap.add_argument(
        "--divergence",
        choices=("reverse", "forward"),
        default="reverse",
        help="KL(p_S||p_T), what full_kl takes, or KL(p_T||p_S) (an ablation: not an opd.objective)",
    )
    ap.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="the arms sample at it (the KL is still taken at temperature 1): above 1 the student's prefixes "
        "leave the teacher's path more often",
    )
    a = ap.parse_args(argv)

    from launch.config import load_run_config
    from launch.fleet import teacher_dir
    from zeda_rl.evaluate import load

    torch.set_num_threads(1)
    for seed in (int(s) for s in a.seeds.split(",")):
        cfg = load_run_config(a.config, [*a.set, f"seed={seed}"])
        teacher, tok = load(teacher_dir(cfg))
        teacher.requires_grad_(False)
        sft = Path(a.baselines) / f"zeda-s{seed}" / "student-sft"
        if a.agreement_only or "teacher" in a.samplers:  # what separates the arms' samples
            print(json.dumps({"seed": seed, "samples_differ": agreement(cfg, sft, teacher, tok, seed)}), flush=True)
        if a.agreement_only:
            continue
        for sampler in a.samplers.split(","):
            arm = f"{sampler}-samples" + ("" if a.divergence == "reverse" else f"-{a.divergence}")
            arm += "" if a.temperature == 1.0 else f"-t{a.temperature:g}"
            dst = Path(a.out) / arm / f"zeda-s{seed}" / "student"
            r = train_arm(cfg, sft, teacher, tok, sampler, seed, dst, a.divergence, a.temperature)
            print(
                json.dumps(
                    {
                        "seed": seed,
                        "samples_from": sampler,
                        "divergence": a.divergence,
                        "temperature": a.temperature,
                        **r,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
