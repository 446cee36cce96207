"""What OPD changes in the student, measured on held-out prompts: the OPD probe.

The training batches say what the loss sees; this says what the student became. For one student
checkpoint and the teacher, on held-out prompts of the built-in tasks:
- greedy exact match, and exact match of one sample at temperature 1 (greedy accuracy is nearly
  blind to what reverse-KL distillation changes: it mostly pushes down unlikely tokens);
- on those temperature-1 samples (the student's own prefixes, as OPD trains on them), per response
  token: the sampled-token estimate of the reverse KL, log p_S(y_t) - log p_T(y_t), which is minus
  OPD's advantage, and the exact reverse KL(p_S || p_T) over the whole vocabulary;
- the student's zero-expert share over those sequences.
`launch.opd` exports the student every `opd.probe_every` steps; `launch.probe` runs this on each.
"""

from __future__ import annotations

import torch

from zeda_rl.tasks import Example, score


@torch.no_grad()
def sample_ids(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> list[list[int]]:
    """One response per prompt at `temperature` (1 by default) with no truncation (top-k and top-p off), as OPD
    samples; token ids up to and including the first stop id (`zeda_rl.chat.stop_ids`, as the engines stop)."""
    from zeda_rl.chat import stop_ids
    from zeda_rl.generate import until_stop

    tokenizer.padding_side = "left"
    stops, out = stop_ids(tokenizer), []
    gen_rng = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen_rng)))
        gen = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(stops) or None,
        )
        for row in gen[:, enc.input_ids.shape[1] :].tolist():
            out.append(until_stop(row, stops, keep=True))
    return out


@torch.no_grad()
def reverse_kl(
    student, teacher, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, batch_size: int = 64
) -> dict[str, float]:
    """Per-response-token means over the student's samples: the sampled-token log ratio
    log p_S(y_t) - log p_T(y_t) (minus OPD's advantage), the exact KL(p_S || p_T), and the share of
    tokens whose advantage log p_T - log p_S is positive."""
    tot = {"sampled": 0.0, "exact": 0.0, "positive": 0.0, "tokens": 0.0}
    for i in range(0, len(prompt_ids), batch_size):
        seqs = [p + r for p, r in zip(prompt_ids[i : i + batch_size], response_ids[i : i + batch_size])]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        resp = torch.zeros((len(seqs), n - 1), dtype=torch.bool)  # column t: token t+1 is a response token
        for j, (s, p) in enumerate(zip(seqs, prompt_ids[i : i + batch_size])):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
            resp[j, len(p) - 1 : len(s) - 1] = True
        ls = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        nxt = ids[:, 1:, None]
        ratio = (ls.gather(-1, nxt) - lt.gather(-1, nxt)).squeeze(-1)
        exact = (ls.exp() * (ls - lt)).sum(-1)
        tot["sampled"] += float(ratio[resp].sum())
        tot["exact"] += float(exact[resp].sum())
        tot["positive"] += float((ratio[resp] < 0).sum())
        tot["tokens"] += float(resp.sum())
    n = max(tot["tokens"], 1.0)
    return {
        "reverse_kl_sampled": tot["sampled"] / n,
        "reverse_kl_exact": tot["exact"] / n,
        "adv_pos_frac": tot["positive"] / n,
        "response_tokens": tot["tokens"],
    }


def probe_checkpoint(student_dir, teacher, tokenizer, examples: list[Example], seed: int = 0) -> dict:
    """Every probe measurement of one student checkpoint (see the module docstring)."""
    from zeda_rl.chat import stop_ids
    from zeda_rl.evaluate import load, routed_zero_ratio
    from zeda_rl.generate import greedy_complete, until_stop

    student, _ = load(student_dir)
    prompts = [e.prompt for e in examples]
    max_new = max(len(tokenizer(e.answer).input_ids) for e in examples) + 4
    greedy = greedy_complete(student, tokenizer, prompts, max_new)
    sampled = sample_ids(student, tokenizer, prompts, max_new, seed)
    stops = stop_ids(tokenizer)
    texts = [tokenizer.decode(until_stop(r, stops), skip_special_tokens=True) for r in sampled]
    fams = list(dict.fromkeys(e.family for e in examples))

    def acc(outs):
        per = {
            f: sum(score(e, c) for e, c in zip(examples, outs) if e.family == f) / sum(e.family == f for e in examples)
            for f in fams
        }
        return {**per, "mean": sum(per.values()) / len(per)}

    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    kl = reverse_kl(student, teacher, prompt_ids, sampled, tokenizer.pad_token_id or 0)
    zr = routed_zero_ratio(student, tokenizer, [p + t for p, t in zip(prompts, texts)])
    return {"accuracy_greedy": acc(greedy), "accuracy_t1": acc(texts), **kl, "zero_ratio": zr["overall"]}
