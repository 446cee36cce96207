"""Records to token ids through the tokenizer's own chat template, the same way everywhere.

The rollout engines, the teacher, SFT and OPD all see a prompt as
`template(messages, add_generation_prompt=True)`; an SFT answer is the rest of
`template(messages + [answer])` after that prompt, ended by the token that ends the
assistant turn. So what the student is trained on is token for token what it is served.
That needs the template's prefix property (the prompt render is a prefix of the full
render); a template without it is refused, never patched over.

Where a turn ends is the model's, not the tokenizer's alone: `stop_ids` (generation_config.json's
and config.json's `eos_token_id`, int or list, plus the tokenizer's eos) is the one list every
phase and both engine backends stop on: teacher rollouts, OPD sampling, SFT targets, evaluation.
Qwen3's template closes the assistant turn with `<|im_end|>` (its eos); GLM-4.x's closes it with
nothing, and generation ends on the next role marker (`<|user|>`, `<|observation|>`), which its
generation_config lists as eos ids. An SFT answer therefore ends with the stop token the template
renders at the end of the assistant turn, or else with the one it puts right after it (the next
turn's marker); a template that does neither is refused.

A tokenizer without a chat template (the embedded character tokenizer) keeps its plain
format: the user text as is, the answer followed by eos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zeda_rl.data import Record

# What `sft_ids` renders after the conversation to see which token the template puts right after
# an assistant turn (plain words: any tokenizer encodes them, no template treats them specially).
_PROBE_ANSWER = "zeda probe answer"
_PROBE_NEXT = "zeda probe next turn"


class TemplateError(ValueError):
    """A record or template that cannot give train/serve-identical tokens."""


def stop_ids(source, tokenizer=None) -> tuple[int, ...]:
    """Every token id that ends the model's turn, sorted: the one stop list of every phase and engine.

    `source` is a checkpoint directory (its tokenizer is loaded unless `tokenizer` is given) or a
    tokenizer (its checkpoint directory is its `name_or_path`, when that is a local directory; a
    tokenizer built in memory has only its own eos). The ids are generation_config.json's
    `eos_token_id` (what `generate`, SGLang and vLLM stop on), config.json's (SGLang stops on those
    too, so the torch engine must as well), and the tokenizer's eos.
    """
    if isinstance(source, (str, os.PathLike)):
        directory = Path(source)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
    else:
        tokenizer = source
        where = str(getattr(tokenizer, "name_or_path", "") or "")
        directory = Path(where) if where and Path(where).is_dir() else None
    ids: set[int] = set()
    if directory is not None:
        for name in ("generation_config.json", "config.json"):
            ids |= _eos_ids(directory / name)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _eos_ids(path: Path) -> set[int]:
    """`eos_token_id` of one JSON config (an int, a list of ints, or absent)."""
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as err:
        raise TemplateError(f"{path}: not a JSON object ({err}); cannot read its eos_token_id") from None
    values = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TemplateError(f"{path}: eos_token_id is {eos!r}; expected a token id or a list of token ids")
    return set(values)


class ChatFormat:
    def __init__(self, tokenizer, enable_thinking: bool = True, stops=None):
        """`stops`: the stop ids (default: `stop_ids(tokenizer)`, read when first needed)."""
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise TemplateError(f"{tokenizer.name_or_path}: the tokenizer has no eos token, so no answer could end")
        self.eos_id = int(tokenizer.eos_token_id)
        self.eos_token = tokenizer.eos_token
        self._stop_ids = None if stops is None else tuple(sorted({int(i) for i in stops} | {self.eos_id}))
        self._stop_tokens: dict[int, str] | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a turn (`stop_ids`): what rollouts, the teacher, OPD and eval stop on."""
        if self._stop_ids is None:
            self._stop_ids = stop_ids(self.tokenizer)
        return self._stop_ids

    def stop_tokens(self) -> dict[int, str]:
        """The stop ids and their text, as the template writes them."""
        if self._stop_tokens is None:
            self._stop_tokens = {i: self.tokenizer.decode([i], skip_special_tokens=False) for i in self.stop_ids}
        return dict(self._stop_tokens)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def prompt_text(self, record: Record) -> str:
        """What the model is given: the templated conversation with the generation prompt."""
        if self.templated:
            return self._render(record.messages, True)
        return _plain_prompt(record)

    def prompt_ids(self, record: Record) -> list[int]:
        if self.templated:
            return self._encode(self._render(record.messages, True))
        return list(self.tokenizer(_plain_prompt(record)).input_ids)  # as the embedded teacher was trained

    def sft_ids(self, record: Record) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with the stop token that ends the turn): train only on the second part."""
        if record.response is None:
            raise TemplateError(f"{record.where}: an SFT record needs an answer (response or final assistant turn)")
        if not self.templated:
            answer = self._encode(record.response) + [self.eos_id]
            return list(self.tokenizer(_plain_prompt(record)).input_ids), answer
        prompt = self._render(record.messages, True)
        full = self._render((*record.messages, {"role": "assistant", "content": record.response}), False)
        if not full.startswith(prompt):
            at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            raise TemplateError(
                f"{record.where}: the chat template of {self.tokenizer.name_or_path or 'this tokenizer'} renders the prompt "
                f"(add_generation_prompt=True, enable_thinking={self.enable_thinking}) differently from the start of the "
                f"full conversation, from character {at}: prompt has {prompt[at : at + 40]!r}, conversation has "
                f"{full[at : at + 40]!r}. Training on that answer would not match what the model sees when served; "
                "use a template with the prefix property (or another data.enable_thinking)"
            )
        rest = full[len(prompt) :]
        tokens = self.stop_tokens()
        end = _turn_end(rest, tokens)
        if end is not None:  # the template closes the turn with a stop token (Qwen3: <|im_end|>)
            at, stop = end
            return self._encode(prompt), self._encode(rest[:at]) + [stop]
        following, nxt = self._after_turn(record)
        if nxt in tokens:  # the next turn's marker ends it (GLM: <|user|>)
            return self._encode(prompt), self._encode(rest) + [nxt]
        raise TemplateError(
            f"{record.where}: the chat template of {self.tokenizer.name_or_path or 'this tokenizer'} does not end the "
            f"assistant turn with the eos token {self.eos_token!r} or any other stop id {tokens} (generation_config.json, "
            f"config.json, tokenizer eos): the turn renders as ...{rest[-60:]!r}, and "
            + (
                f"what the template puts right after it, before a next user turn, is {following!r}, whose first token "
                f"{self._token(nxt)} is not a stop id either"
                if following is not None
                else "a next user turn cannot be rendered after it to see what ends it"
            )
            + ". Generation would never stop where the answer ends; add the end-of-turn token's id to the "
            "checkpoint's generation_config.json eos_token_id, or use a template that ends the turn with one"
        )

    def _token(self, i: int | None) -> str:
        return "(none)" if i is None else f"{i} {self.tokenizer.decode([i], skip_special_tokens=False)!r}"

    def _after_turn(self, record: Record) -> tuple[str | None, int | None]:
        """(the text the template puts between an assistant turn and the next user turn, its first token id)."""
        convo = (
            *record.messages,
            {"role": "assistant", "content": _PROBE_ANSWER},
            {"role": "user", "content": _PROBE_NEXT},
        )
        try:
            text = self._render(convo, False)
        except Exception:  # noqa: BLE001 - a template may refuse a conversation shape (jinja raise_exception)
            return None, None
        a = text.rfind(_PROBE_ANSWER)
        n = text.find(_PROBE_NEXT, a + len(_PROBE_ANSWER)) if a >= 0 else -1
        if n < 0:
            return None, None
        following = text[a + len(_PROBE_ANSWER) : n]
        ids = self._encode(following)
        return following, (ids[0] if ids else None)


def _turn_end(rest: str, tokens: dict[int, str]) -> tuple[int, int] | None:
    """(where the answer ends, the stop id there) when the rendered turn ends with a stop token (only
    whitespace after it, as `<|im_end|>\\n`); None when it does not."""
    found = []
    for i, text in tokens.items():
        at = rest.rfind(text) if text else -1
        if at >= 0 and not rest[at + len(text) :].strip():
            found.append((at, i))
    return min(found) if found else None


def _plain_prompt(record: Record) -> str:
    if len(record.messages) != 1 or record.messages[0]["role"] != "user":
        raise TemplateError(
            f"{record.where}: a conversation of {len(record.messages)} turns "
            f"({[m['role'] for m in record.messages]}) needs a chat template; this tokenizer has none"
        )
    return record.messages[0]["content"]
