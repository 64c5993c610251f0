"""Does a served request's prompt look like the prompts the pack was fitted on?

The gate reads the hidden state at the prompt's last token, and its threshold was calibrated on
prompts rendered in the pack's *prompt format*: the chat template with the pack's system prompt
(or the template's default) and the generation prompt appended. A request rendered otherwise -- its
own system prompt, another chat template, a plain completion without any template -- is still
gated, but at false-positive and recall rates nobody measured (``docs/method.md`` section 7k: a
support-bot system prompt alone moves the shipped pack's fiction-writing false positives from 0 to
11%, and direct-harm recall from 78 to 69%).

:class:`PromptFrame` holds the token ids every prompt in the pack's format starts with (the
system turn and the user header) and ends with (the end of the user turn and the assistant header),
computed from the serving tokenizer by rendering two different user messages and keeping what they
share. :meth:`PromptFrame.mismatch` names how a request's prompt ids leave that frame.
:class:`PromptCheck` applies the serving policy (``AUTOSTEER_PROMPT_CHECK``):

- ``warn`` (default): the request is gated as usual and a warning names what differs (the first
  request of each kind, then the 2nd, 4th, 8th, ... with the count so far, so a stream of them does
  not flood the log);
- ``refuse``: the request is steered from its first generated token (the Refusal Head answers it),
  with the same warnings -- for deployments that serve only the pack's format;
- ``off``: no check (a deployment that measured its own format, e.g. ``autosteer eval --system``).

Multi-turn chats pass where the chat template puts the system turn first (ChatML, Llama 3 and most
others; a template that writes the system prompt into the last user turn does not). Images inside the
prompt do not matter (only the two ends are compared).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..prompting import PromptFormat, common_prefix_len, encode_batch, encode_one, is_processor

log = logging.getLogger(__name__)

ENV_PROMPT_CHECK = "AUTOSTEER_PROMPT_CHECK"
POLICIES = ("warn", "refuse", "off")

# user messages that share no first or last token (letters vs digits, different punctuation), and ones that start
# or end with white space, which some tokenizers merge with the template's token beside it: the frame is what all
# of them share, so a message of any kind keeps it intact
_PROBES = ("Zebra crossing lights, please?", "1 2 3 4 5 6 7 8 9", "\n\nZebra\n\n", " 1 ", "\tx\t")


class PromptCheckError(ValueError):
    """The prompt-format check cannot be set up as asked; the message says why."""


def parse_policy(value, source: str = ENV_PROMPT_CHECK) -> str:
    """``warn`` / ``refuse`` / ``off`` (any case; unset or blank: ``warn``). Anything else raises ValueError
    naming ``source``: a typo must not turn a safety check off."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "warn"
    v = str(value).strip().lower()
    if v not in POLICIES:
        raise ValueError(f"{source}={value!r}: must be one of {', '.join(POLICIES)}")
    return v


def _encode(tokenizer, text: str, fmt: PromptFormat) -> list[int]:
    """One text prompt's ids as served: a multimodal processor renders and tokenizes it its own way."""
    if is_processor(tokenizer):
        return encode_batch(tokenizer, [text], fmt)["input_ids"][0].tolist()
    return encode_one(tokenizer, text, fmt)


@dataclass(frozen=True)
class PromptFrame:
    """The token ids every prompt in a pack's format starts and ends with."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    fmt: PromptFormat

    @classmethod
    def from_tokenizer(cls, tokenizer, fmt: PromptFormat) -> "PromptFrame":
        # an empty message and the probes: what all the renderings share at each end
        # is the format's (the empty one bounds it: no message token can be taken for the frame, even where a
        # tokenizer reads both messages as unknown tokens)
        empty, *full = (_encode(tokenizer, text, fmt) for text in ("",) + _PROBES)
        p = min(common_prefix_len(empty, x) for x in full)
        s = min(common_prefix_len(empty[::-1], x[::-1]) for x in full)
        s = min(s, len(empty) - p)  # the two ends never overlap
        return cls(tuple(empty[:p]), tuple(empty[len(empty) - s:]) if s else (), fmt)

    def describe(self) -> str:
        """The format in words, for messages."""
        if not self.fmt.chat_template:
            return "plain text without a chat template"
        sys_ = "its default system prompt" if self.fmt.system is None else \
            f"the system prompt {_clip(self.fmt.system)!r}"
        return f"the chat template, {sys_}, and the generation prompt"

    def mismatch(self, ids: Sequence[int]) -> str | None:
        """None when ``ids`` (one prompt's token ids, no padding) start with the frame's prefix and end with its
        suffix; else what differs, in words."""
        ids = list(ids)
        pre, suf = list(self.prefix), list(self.suffix)
        if suf and (len(ids) < len(suf) or ids[len(ids) - len(suf):] != suf):
            return ("does not end with the chat template's generation prompt (a completion without the chat template, "
                    "another template, or an assistant turn to continue)")
        if pre and ids[:len(pre)] != pre:
            return ("does not start as the pack's format does (another system prompt than the pack's, or another "
                    "chat template)")
        if len(ids) < len(pre) + len(suf):
            return f"is {len(ids)} tokens, shorter than the pack's format alone ({len(pre) + len(suf)} tokens)"
        return None


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class PromptCheck:
    """A serving policy over a :class:`PromptFrame`: :meth:`check` returns whether a request must be refused,
    and warns (rate-limited) about requests off the pack's format. ``frame`` None: the check could not be set
    up (``unavailable`` says why); under ``warn`` that was said once, ``refuse`` never gets here (it raises)."""

    def __init__(self, frame: PromptFrame | None, policy: str = "warn", *, where: str = "autosteer",
                 unavailable: str | None = None, setting: str = ENV_PROMPT_CHECK):
        self.setting = setting  # what the user sets the policy with, for messages
        self.policy = parse_policy(policy, setting)
        self.frame = frame if self.policy != "off" else None
        self.where = where
        self.counts: dict[str, int] = {}  # kind of mismatch -> off-format requests so far
        self.checked = 0
        self.quiet = False  # True: check and refuse, but leave the warnings to another process (tensor-parallel ranks)
        if self.policy != "off" and frame is None:
            why = unavailable or "no tokenizer to render the pack's format with"
            if self.policy == "refuse":
                raise PromptCheckError(f"{setting}=refuse, but the prompt-format check cannot run: {why}")
            log.warning("%s: requests are not checked against the pack's prompt format (%s); a request in another "
                        "format is gated at rates nobody measured. Set %s=off to silence this", where, why, setting)

    @classmethod
    def from_tokenizer(cls, tokenizer, fmt: PromptFormat, policy: str = "warn", *, where: str = "autosteer",
                       setting: str = ENV_PROMPT_CHECK) -> "PromptCheck":
        policy = parse_policy(policy, setting)
        if policy == "off":
            return cls(None, "off", where=where, setting=setting)
        try:
            frame = PromptFrame.from_tokenizer(tokenizer, fmt)
        except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot render the format: said, not raised (warn)
            return cls(None, policy, where=where, setting=setting,
                       unavailable=f"the serving tokenizer cannot render the pack's format: {exc}")
        from ..prompting import text_tokenizer

        specials = set(getattr(text_tokenizer(tokenizer), "all_special_ids", None) or ())
        if not frame.suffix and all(t in specials for t in frame.prefix):
            # nothing, or only a BOS every format starts with: a prompt in another format passes as well
            return cls(None, policy, where=where, setting=setting, unavailable=(
                f"the pack's format ({frame.describe()}) puts no fixed tokens around a prompt but the tokenizer's "
                "special tokens, so nothing tells a prompt in it from one in another format"))
        return cls(frame, policy, where=where, setting=setting)

    @property
    def off_format(self) -> int:
        return sum(self.counts.values())

    def check(self, request_id, ids: Sequence[int]) -> bool:
        """Check one new request's prompt ids; True when the policy refuses it (it must be steered from its
        first token). Warns for the 1st, 2nd, 4th, 8th, ... request of each kind of mismatch."""
        if self.frame is None:
            return False
        self.checked += 1
        why = self.frame.mismatch(ids)
        if why is None:
            return False
        kind = re.sub(r"\d+", "N", why)  # (one kind whatever the lengths it names)
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        refuse = self.policy == "refuse"
        if n & (n - 1) == 0 and not self.quiet:  # a power of two
            log.warning("%s: request %s: its prompt %s. The gate was calibrated on prompts in the pack's format (%s): "
                        "%s (%d such request%s so far). %s", self.where, request_id, why, self.frame.describe(),
                        "it is REFUSED (steered from its first token)" if refuse else
                        "it is gated at false-positive and recall rates nobody measured",
                        n, "" if n == 1 else "s",
                        f"{self.setting}=warn serves such requests gated as usual" if refuse else
                        f"Fit a pack in this format (autosteer fit --system ...), measure it (autosteer eval --system "
                        f"...), or set {self.setting}=refuse to refuse such requests")
        return refuse


def check_for_pack(pack, tokenizer, policy: str = "warn", *, where: str = "autosteer",
                   setting: str = ENV_PROMPT_CHECK, unavailable: str | None = None) -> PromptCheck:
    """The prompt-format check of ``pack`` served with ``tokenizer``: the pack's format rendered by it, where its chat
    template is the one the pack was fitted with (``chat_template_sha256_16``). No tokenizer, another template, or
    ``unavailable`` (the engine cannot hand over prompt ids): said once under ``warn``, :class:`PromptCheckError`
    under ``refuse``."""
    from ..prompting import template_hash

    policy = parse_policy(policy, setting)
    if policy == "off":
        return PromptCheck(None, "off", where=where, setting=setting)
    if unavailable is None and tokenizer is None:
        unavailable = "no tokenizer to render the pack's format with"
    if unavailable is None:
        want, have = pack.meta.get("chat_template_sha256_16"), template_hash(tokenizer)
        if want and have != want:
            unavailable = (f"the serving tokenizer's chat template is not the one the pack was fitted with (sha256 "
                           f"{have} vs {want}), so the pack's format cannot be rendered")
    if unavailable is not None:
        return PromptCheck(None, policy, where=where, setting=setting, unavailable=unavailable)
    return PromptCheck.from_tokenizer(tokenizer, pack.prompt_format, policy, where=where, setting=setting)
