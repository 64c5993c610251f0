"""The Refusal Head: an LM-Steer matrix ``S`` on the output embedding.

``logits = E (g + eps * S g)`` where ``g`` is the final normed hidden state (``lm_head``'s input)
and ``E`` the output embedding. Only ``S`` is trained (the model is frozen), with token
cross-entropy on the refusal answer for harmful prompts, ``eps`` fixed (0.1 as in the paper).

``S`` is parametrised as ``I + A B^T``: ``rank=None`` trains a full ``d x d`` matrix
(stored as ``A = S - I``, ``B = I``), an integer rank ``r`` trains ``A, B`` of shape ``[d, r]``
with ``A = 0`` at init, so ``S = I`` at init either way. At serving time the op applies
``z' = (1 + eps) z + eps (E A)(B^T g)`` with ``E A`` precomputed once -- never ``E S`` per step.

Because the model is frozen and ``S`` acts only at the output, the model runs **once** over the
teacher-forced refusal answers to collect ``g``; training then touches only ``g``, ``E`` and ``S``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models import output_head, stop_token_ids
from ..prompting import (PromptFormat, PromptLike, batching_key, encode_batch, pad_left, position_ids_from_mask, text_tokenizer,
                         to_model)

REFUSAL_ANSWER = "I'm sorry, but I can't assist with that."


@dataclass
class RefusalHead:
    A: torch.Tensor  # [H, r]
    B: torch.Tensor  # [H, r]
    eps: float

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"head.A": self.A.contiguous(), "head.B": self.B.contiguous()}

    def steered_logits(self, g: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """Plain-formula logits ``E (g + eps S g)`` (for training and tests; the runtime uses the op)."""
        g = g.float()
        sg = g + (g @ self.B) @ self.A.t()
        return (g + self.eps * sg) @ E.float().t()


def answer_token_ids(tokenizer, answer: str = REFUSAL_ANSWER) -> list[int]:
    """The refusal answer's tokens followed by the end-of-turn token, so a refusal stops."""
    tokenizer = text_tokenizer(tokenizer)
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


def _states_before_answer(model, batches, n_ans: int) -> torch.Tensor:
    """lm_head's input ``g`` at the positions that predict the last ``n_ans`` tokens of each row, for model inputs
    (left-padded, every row ending with the answer) from ``batches``; ``[rows * n_ans, H]`` fp32 on the CPU."""
    seen: dict[str, torch.Tensor] = {}
    handle = output_head(model).register_forward_pre_hook(lambda _m, args: seen.__setitem__("g", args[0]))
    gs = []
    try:
        for inputs in batches:
            inputs = to_model(inputs, model)
            model(**inputs, position_ids=position_ids_from_mask(inputs["attention_mask"]), use_cache=False,
                  logits_to_keep=n_ans + 1)
            g = seen.pop("g")[:, -n_ans - 1:-1, :]  # position t predicts token t+1
            gs.append(g.reshape(-1, g.shape[-1]).float().cpu())
    finally:
        handle.remove()
    return torch.cat(gs)


@torch.no_grad()
def collect_answer_states(model, tokenizer, prompts: list[PromptLike], fmt: PromptFormat, answer_ids: list[int],
                          batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normed hidden states ``g`` (the input of ``lm_head``) at the positions that predict
    each answer token, and the targets. The answer is appended after each (left-padded) prompt;
    multimodal prompts keep their images."""
    n_ans = len(answer_ids)
    prompts = sorted(prompts, key=batching_key)  # image prompts apart from text ones: little padding

    def batches():
        for start in tqdm(range(0, len(prompts), batch_size), desc="refusal-head states", disable=not progress, leave=False):
            inputs = encode_batch(tokenizer, prompts[start:start + batch_size], fmt)
            answer = torch.tensor(answer_ids, dtype=torch.long).expand(inputs["input_ids"].shape[0], n_ans)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
            yield inputs

    return _states_before_answer(model, batches(), n_ans), torch.tensor(answer_ids).repeat(len(prompts))


def continuation_token_ids(tokenizer, answer: str = REFUSAL_ANSWER) -> list[int]:
    """The refusal as it continues text already written (after a word, with a space), then the end-of-turn
    token: the tokens of ``"x " + answer`` after those of ``"x"``. A tokenizer that adds a word-start marker
    of its own (SentencePiece) would turn a plain leading space into a second marker."""
    tok = text_tokenizer(tokenizer)
    full = tok("x " + answer, add_special_tokens=False)["input_ids"]
    head = tok("x", add_special_tokens=False)["input_ids"]
    ids = full[len(head):] if full[:len(head)] == head else tok(" " + answer, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return ids + ([eos] if eos is not None else [])


@torch.no_grad()
def collect_pivot_states(model, tokenizer, prompts: list[str], fmt: PromptFormat, answer_ids: list[int],
                         max_answer_tokens: int = 16, cuts: int = 2, batch_size: int = 16, seed: int = 0,
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Answer states for *pivot* rows: the prompt, the first ``j`` tokens of the model's own answer (greedy,
    unsteered, at most ``max_answer_tokens``), then the refusal answer -- what the head must produce when
    monitor mode latches ``j`` tokens into an answer. ``cuts`` distinct cut points per answer, ``j`` drawn
    uniformly from ``1 .. answer length`` (stop token excluded; an answer that stops at once gives none).

    Returns ``(g, targets, rows)`` as :func:`collect_answer_states` does, and the number of pivot rows.
    Text prompts only (monitor mode's fit data)."""
    if any(not isinstance(p, str) for p in prompts):
        raise TypeError("collect_pivot_states takes text prompts only")
    tok = text_tokenizer(tokenizer)
    stop = set(stop_token_ids(model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(stop) if stop else 0)
    rng = random.Random(f"pivot-{seed}")
    seqs: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="pivot answers", disable=not progress, leave=False):
        inputs = encode_batch(tokenizer, prompts[start:start + batch_size], fmt)
        width = inputs["input_ids"].shape[1]
        out = model.generate(**to_model(inputs, model), max_new_tokens=max_answer_tokens, do_sample=False, pad_token_id=pad)
        out = (out if isinstance(out, torch.Tensor) else out.sequences).cpu()
        for row in range(out.shape[0]):
            prompt_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
            answer = out[row, width:].tolist()
            n = next((i for i, t in enumerate(answer) if t in stop), len(answer))
            for j in sorted(rng.sample(range(1, n + 1), min(cuts, n))):
                seqs.append(prompt_ids + answer[:j] + list(answer_ids))
    if not seqs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), 0
    batches = (dict(zip(("input_ids", "attention_mask"), pad_left(seqs[i:i + batch_size], pad)))
               for i in range(0, len(seqs), batch_size))
    return _states_before_answer(model, batches, len(answer_ids)), torch.tensor(answer_ids).repeat(len(seqs)), len(seqs)


def train_refusal_head(model, g: torch.Tensor, targets: torch.Tensor, rank: int | None = 16, eps: float = 0.1,
                       epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                       progress: bool = True) -> tuple[RefusalHead, list[float]]:
    """Train ``S = I + A B^T`` by cross-entropy of ``E (g + eps S g)`` against the refusal tokens.

    Training runs where the output embedding ``E`` lives (its GPU in a model dispatched over devices:
    the vocabulary matmuls never cross to the host); the returned head is on the CPU."""
    W = output_head(model).weight
    if W.device.type == "meta":
        raise ValueError("the output embedding is offloaded (on the meta device): keep lm_head on a real device in the "
                         "device_map to fit the Refusal Head")
    dev = W.device
    E = W.detach().to(dev, torch.float32)
    g, targets = g.to(dev), targets.to(dev)
    d = E.shape[1]
    gen = torch.Generator().manual_seed(seed)  # initial values drawn on the CPU (the same on every device)
    if rank is None:
        S = torch.eye(d).to(dev).requires_grad_()
        params = [S]
    else:
        A = torch.zeros(d, rank, device=dev, requires_grad=True)
        B = (torch.randn(d, rank, generator=gen) / d ** 0.5).to(dev).requires_grad_()
        params = [A, B]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    n = g.shape[0]
    for _ in tqdm(range(epochs), desc="refusal head", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=gen).to(dev)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            gb = g[idx]
            sg = gb @ S.t() if rank is None else gb + (gb @ B) @ A.t()
            logits = (gb + eps * sg) @ E.t()
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    with torch.no_grad():
        if rank is None:
            head = RefusalHead(A=(S.cpu() - torch.eye(d)).detach(), B=torch.eye(d), eps=eps)
        else:
            head = RefusalHead(A=A.detach().cpu(), B=B.detach().cpu(), eps=eps)
    return head, losses
