"""Token logprobs fused with the output layer, `logits_chunk_tokens` tokens at a time.

The plain path materialises the micro-batch's logits [T, V], their fp32 log-softmax and both
gradients; at V ~ 150k and T ~ 16k that is tens of GiB. Here the output layer is taken out of
the model's forward (`hidden_states`), and `ChunkedLogprob` computes, per chunk of tokens,
logits = h W^T in fp32, their logsumexp and the target's logit, keeping only [T] results and the
hidden states; the backward recomputes each chunk's logits and softmax to form that chunk's
gradient (d logits = (onehot - softmax) x g / temperature) and multiplies it straight into
dh and dW. So at most one chunk's [chunk, V] tensors exist at a time, what `launch.plan`
budgets for the logits (chunk x V x (logits + fp32 log-softmax, its gradient, the logits'
gradient)).

Tensor parallelism would need the vocab-parallel reductions (max, sum-exp, target logit over
the TP group) and the sequence-parallel gather of h: learner.config.not_implemented refuses it
with TP > 1 (where the unchunked path is learner.tp_logprob).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ChunkedLogprob(torch.autograd.Function):
    """log softmax(h W^T / temperature)[target] for h [T, H], W [V, H], target [T] -> [T] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, inv_temp: float):
        t = hidden.shape[0]
        out = torch.empty(t, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(t, dtype=torch.float32, device=hidden.device)
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            logits = (hidden[s:e] @ weight.t()).float() * inv_temp
            lse[s:e] = torch.logsumexp(logits, -1)
            out[s:e] = logits.gather(-1, target[s:e, None]).squeeze(-1) - lse[s:e]
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk, ctx.inv_temp = chunk, inv_temp
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, target, lse = ctx.saved_tensors
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(hidden.shape[0], s + ctx.chunk)
            logits = (hidden[s:e] @ weight.t()).float() * ctx.inv_temp
            g = grad[s:e, None].float()
            d = torch.exp(logits - lse[s:e, None]).mul_(-g)  # -softmax x g
            d.scatter_add_(-1, target[s:e, None], g)  # + onehot x g
            d = d.mul_(ctx.inv_temp).to(hidden.dtype)
            if dh is not None:
                dh[s:e] = d @ weight
            if dw is not None:
                dw += (d.t() @ hidden[s:e]).float()
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(tokens[:, t+1] | ..t) [B, S-1] fp32 from hidden states [B, S, H] (zeda_rl.losses.token_logprobs' contract)."""
    b, s, h = hidden.shape
    x = hidden[:, :-1].reshape(-1, h)
    y = tokens[:, 1:].reshape(-1)
    return ChunkedLogprob.apply(x, weight, y, int(chunk), 1.0 / float(temperature)).view(b, s - 1)


@contextmanager
def hidden_states(model: torch.nn.Module):
    """Inside, the GPTModel's forward returns the final hidden states [B, S, H] instead of logits;
    yields a dict whose "weight" is the output weight the skipped layer was given (tied or not)."""
    layer = model.output_layer
    seen: dict[str, torch.Tensor] = {}

    def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
        seen["weight"] = layer.weight if weight is None else weight
        return input_, None

    layer.forward = forward
    try:
        yield seen
    finally:
        del layer.forward
