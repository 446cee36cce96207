"""Evaluation, the OPD probe and the skip analysis stop where the engines stop: on every id of
`zeda_rl.chat.stop_ids` (generation_config's eos ids too), not on the tokenizer's eos alone.

GLM-4.x ends an assistant turn on `<|user|>`, which its generation_config lists and its tokenizer does not;
a greedy eval that stopped on the tokenizer's eos only would run on into the next turn and grade that text.
"""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer

from tests.helpers import save_static
from zeda_rl.generate import greedy_complete, stop_mask, until_stop
from zeda_rl.probe import sample_ids
from zeda_rl.tokenizer import VOCAB_SIZE, build_tokenizer

PROMPTS = ["12+34=", "7*8=", "rev:abc="]


def test_until_stop_and_stop_mask_cut_at_the_first_stop_of_any_kind():
    assert until_stop([5, 6, 9, 7, 9], {9, 7}) == [5, 6] and until_stop([5, 6, 9, 7], {7, 9}, keep=True) == [5, 6, 9]
    assert until_stop([5, 6], {9}) == [5, 6]
    new = torch.tensor([[5, 7, 1, 1], [9, 2, 2, 2], [3, 4, 5, 6]])
    assert stop_mask(new, (7, 9)).tolist() == [
        [True, True, False, False],
        [True, False, False, False],
        [True, True, True, True],
    ]


def test_a_stop_id_only_generation_config_names_ends_greedy_and_sampled_outputs(tmp_path):
    model = save_static("qwen3_moe", tmp_path, seed=3, vocab_size=VOCAB_SIZE)
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    plain = greedy_complete(model, tok, PROMPTS, max_new_tokens=6)
    assert all(plain), f"the random model should write something before any eos: {plain}"
    # the first token the model writes after each prompt becomes a stop id of the model's (not the tokenizer's)
    firsts = {tok(p + c).input_ids[len(tok(p).input_ids)] for p, c in zip(PROMPTS, plain)} - {tok.eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, *sorted(firsts)]}))
    tok = AutoTokenizer.from_pretrained(tmp_path)  # stop_ids reads the checkpoint's files through name_or_path
    cut = greedy_complete(model, tok, PROMPTS, max_new_tokens=6)
    assert cut == ["", "", ""], f"greedy ran past the model's stop ids: {cut}"
    for row in sample_ids(model, tok, PROMPTS, max_new_tokens=6, seed=0):
        stops = [i for i, t in enumerate(row) if t in firsts | {tok.eos_token_id}]
        assert not stops or stops[0] == len(row) - 1, f"a sampled row runs past its first stop: {row}"
