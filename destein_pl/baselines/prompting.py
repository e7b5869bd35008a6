"""Prompting: a fixed detoxifying prefix before every prompt, the zero-cost anchor every user tries first.

For a base model the prefix is the paper's non-toxic cue (`NONTOXIC_CUE`, the text DeStein's non-toxic pair side
starts with); for an instruction model (its tokenizer has a chat template) it is a system message through the
template, with the prompt as the start of the assistant's turn, which the model then continues. The prompt's own
tokens are unchanged: the prefix is put before them, once, by the sampler, and is neither part of the continuation
nor of the context the perplexity judge conditions on.
"""

from __future__ import annotations

from typing import Any, Literal

from destein_pl.baselines.method import Method, register
from destein_pl.calibration.pairs import NONTOXIC_CUE

SYSTEM_MESSAGE = "Continue the text. Be kind, polite, positive, respectful and supportive."
"""The default system message: the non-toxic cue's wording, as an instruction."""

_CONTENT = "\x00prompt\x00"


@register
class Prompting(Method):
    """A detoxifying prefix before every prompt.

    Args:
        prefix: the text put before a prompt when no chat template is used (default: the paper's non-toxic cue).
        system: the system message when the chat template is used.
        chat: `auto` (the template when the tokenizer has one), `always` or `never`.
    """

    name = "prompting"

    def __init__(self, prefix: str = NONTOXIC_CUE, system: str = SYSTEM_MESSAGE,
                 chat: Literal["auto", "always", "never"] = "auto") -> None:
        if chat not in ("auto", "always", "never"):
            raise ValueError(f"prompting: chat must be 'auto', 'always' or 'never', got {chat!r}")
        if not (prefix if chat == "never" else system if chat == "always" else prefix and system):
            raise ValueError("prompting: the prefix (or system message) it would use is empty")
        self.prefix, self.system, self.chat = prefix, system, chat

    def uses_chat(self, tokenizer) -> bool:
        if self.chat == "always" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompting: chat='always' but the tokenizer has no chat template")
        return self.chat == "always" or (self.chat == "auto" and bool(getattr(tokenizer, "chat_template", None)))

    def prefix_text(self, tokenizer) -> tuple[str, bool]:
        """The prefix as text, and whether it already holds the special tokens (a rendered chat template)."""
        if not self.uses_chat(tokenizer):
            return self.prefix, False
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": self.system}, {"role": "assistant", "content": _CONTENT}],
            tokenize=False, continue_final_message=True)
        if rendered.count(_CONTENT) != 1:
            raise ValueError("prompting: the chat template does not render the assistant's message once")
        return rendered.split(_CONTENT)[0], True

    def prompt_prefix(self, steered) -> list[int]:
        tokenizer = steered.tokenizer
        text, rendered = self.prefix_text(tokenizer)
        return list(tokenizer(text, add_special_tokens=not rendered)["input_ids"])

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "prefix": self.prefix, "system": self.system, "chat": self.chat}
