"""Records to token ids through the tokenizer's own chat template, the same way everywhere.

The rollout engines, the teacher, SFT and OPD all see a prompt as
`template(messages, add_generation_prompt=True)`; an SFT answer is the rest of
`template(messages + [answer])` after that prompt, cut after the end-of-turn token (the
tokenizer's eos, where generation stops). So what the student is trained on is token for
token what it is served. That needs the template's prefix property (the prompt render is
a prefix of the full render); a template without it is refused, never patched over.

A tokenizer without a chat template (the embedded character tokenizer) keeps its plain
format: the user text as is, the answer followed by eos.
"""

from __future__ import annotations

from zeda_rl.data import Record


class TemplateError(ValueError):
    """A record or template that cannot give train/serve-identical tokens."""


class ChatFormat:
    def __init__(self, tokenizer, enable_thinking: bool = True):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise TemplateError(f"{tokenizer.name_or_path}: the tokenizer has no eos token, so no answer could end")
        self.eos_id = int(tokenizer.eos_token_id)
        self.eos_token = tokenizer.eos_token

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
        """(prompt ids, answer ids ending with eos): train only on the second part."""
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
        end = rest.rfind(self.eos_token)
        if end < 0:
            raise TemplateError(
                f"{record.where}: the chat template does not end the assistant turn with the eos token "
                f"{self.eos_token!r}, so generation would never stop where the answer ends"
            )
        return self._encode(prompt), self._encode(rest[:end]) + [self.eos_id]


def _plain_prompt(record: Record) -> str:
    if len(record.messages) != 1 or record.messages[0]["role"] != "user":
        raise TemplateError(
            f"{record.where}: a conversation of {len(record.messages)} turns "
            f"({[m['role'] for m in record.messages]}) needs a chat template; this tokenizer has none"
        )
    return record.messages[0]["content"]
