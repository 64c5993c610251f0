"""Hidden states of a frozen model: at the last prompt token (chosen layers), and at the tokens of
its own responses (the gate's layers, for monitor mode).

``h_l(x)`` is the residual stream entering decoder block ``l`` at the last prompt token. We read
it with forward pre-hooks on the decoder blocks -- the very hooks the runtime uses -- so fit and
serving see the same tensor. The forward stops at the deepest layer asked for (the blocks after
it, the final norm and ``lm_head`` never run).

Text prompts are tokenized exactly as the runtime tokenizes them and run in groups that share a
token prefix (the chat template's system turn for all of them; a jailbreak template's opening
for prompts wrapped in the same template): the prefix runs once into a KV cache, then the
suffixes run in right-padded batches on top of it. This is the same attention as running each
prompt alone (states agree to float rounding, tests/test_fit_scale.py), at about half the tokens
on the default fit data. Multimodal prompts and prompts with a response prefix run left padded,
with the positions ``generate`` would use.

A :class:`StatesCache` makes the extraction resumable: every finished batch is written to disk,
and a rerun with the same model, format, layers and prompts reads it back instead of running.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import decoder_layers, stop_token_ids
from ..prompting import (PromptFormat, PromptLike, append_response_prefix, batching_key, common_prefix_len, encode_batch,
                         encode_one, is_processor, position_ids_from_mask, prompt_image, text_tokenizer, to_model)


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class _Stop(Exception):
    """Raised by the deepest capture hook: nothing after the last state needed is computed."""


def model_identity(model) -> str:
    """A hash of what the states depend on: the model's config, dtype, and a sample of every
    parameter's values (its first 64 elements; shape only for parameters offloaded to the meta
    device). Two models that differ in any layer's weights get different identities."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type != "meta":
            h.update(p.detach().reshape(-1)[:64].double().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


class StatesCache:
    """Finished batches of a state extraction on disk, one safetensors file per batch, under
    ``root/<run key>/``; the run key covers the model (:func:`model_identity`), the prompt format
    and the layers, the batch key the token ids of the batch's prompts. Files are written
    atomically (a temporary name, then a rename), so an interrupted run leaves only whole batches."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def run_dir(self, model, fmt: PromptFormat, layers: list[int], kind: str) -> Path:
        key = hashlib.sha256(json.dumps([model_identity(model), fmt.to_dict(), list(layers), kind],
                                        sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.root / key

    @staticmethod
    def batch_key(seqs: list[list[int]]) -> str:
        h = hashlib.sha256()
        for s in seqs:
            h.update(json.dumps(s).encode() + b"\n")
        return h.hexdigest()[:24]

    def get(self, run: Path, key: str) -> torch.Tensor | None:
        path = run / f"{key}.safetensors"
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors.torch import load_file

        self.hits += 1
        return load_file(str(path))["states"]

    def put(self, run: Path, key: str, states: torch.Tensor) -> None:
        from safetensors.torch import save_file

        run.mkdir(parents=True, exist_ok=True)
        tmp = run / f".{key}.{os.getpid()}.tmp"
        save_file({"states": states.contiguous()}, str(tmp))
        tmp.replace(run / f"{key}.safetensors")


def prefix_groups(seqs: list[list[int]], min_extra: int = 32) -> list[tuple[int, list[int]]]:
    """Group prompts by a shared token prefix: ``[(prefix_len, members), ...]`` covering every index once.

    Sorted lexicographically, neighbours that share at least ``min_extra`` tokens more than the
    prefix common to all prompts form a group with their own longest common prefix (prompts wrapped
    in one jailbreak template); the rest form one group on the common prefix (the system turn). A
    prefix always leaves at least one token of every member to run (its last token is read)."""
    if not seqs:
        return []
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    adj = [common_prefix_len(seqs[order[k]], seqs[order[k + 1]]) for k in range(len(order) - 1)]
    base = min(adj) if adj else len(seqs[0]) - 1
    runs: list[list[int]] = [[order[0]]]
    run_lcp: list[int] = [1 << 30]
    for k, a in enumerate(adj):
        if a >= base + min_extra:
            runs[-1].append(order[k + 1])
            run_lcp[-1] = min(run_lcp[-1], a)
        else:
            runs.append([order[k + 1]])
            run_lcp.append(1 << 30)
    groups, rest = [], []
    for members, lcp in zip(runs, run_lcp):
        if len(members) > 1:
            groups.append((min(lcp, min(len(seqs[i]) for i in members) - 1), members))
        else:
            rest += members
    if rest:
        groups.append((min(base, min(len(seqs[i]) for i in rest) - 1), rest))
    return [(max(p, 0), m) for p, m in groups]


def _cache_kwarg(model) -> str:
    """The forward's KV-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _expanded_cache(prefix_cache, model, rows: int):
    """A fresh KV cache holding ``rows`` copies of the prefix's keys and values (the suffix forward
    appends to its own copy; the prefix's stays as it is for the next batch)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for idx, layer in enumerate(prefix_cache.layers):
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), idx)
    return cache


def _batches(members: list[int], lengths: list[int], batch_size: int, token_budget: int) -> list[list[int]]:
    """Members sorted by length, cut into batches of at most ``batch_size`` rows (more rows for short
    ones, up to ``token_budget`` padded tokens and 8x ``batch_size`` rows)."""
    members = sorted(members, key=lambda i: lengths[i])
    out, cur = [], []
    for i in members:
        width = max([lengths[j] for j in cur] + [lengths[i]])
        limit = min(8 * batch_size, max(batch_size, token_budget // max(width, 1)))
        if cur and len(cur) + 1 > limit:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def prefix_group_forwards(model, seqs: list[list[int]], layers: list[int], batch_size: int, pad_id: int, *,
                          tail: int, read, lookup=None):
    """The shared-prefix driver (module docstring) of :func:`last_token_states` and the pooled gate's token states
    (:func:`autosteer.method.token_probe.prompt_token_states`): prompts grouped by a shared token prefix
    (:func:`prefix_groups`), each group's prefix run once into a ``DynamicCache`` (when a batch of the group first
    needs it), its members' suffixes in right-padded batches on an expanded copy, every forward stopped after the
    deepest of ``layers``. Every prompt keeps at least ``tail + 1`` tokens for its batch.

    ``read(h, last)`` runs in each of ``layers``' forward pre-hooks on the layer's input ``h`` ([B, W, H]) with
    ``last`` (each row's last suffix index, [B]; None in a prefix forward) and returns what to keep of it.
    ``lookup(rows)``: a batch's result from elsewhere (a resumed run's cache), or None to run it. Yields, in order,
    ``(kind, p, members, rows, got)``: ``"prefix"`` after a group's prefix forward (``got``: {layer: read's
    result}), ``"batch"`` after a batch's forward (``rows``: its prompt indices; suffix ``i`` starts at position
    ``p``), ``"cached"`` for a batch ``lookup`` had (``got``: its result)."""
    from transformers import DynamicCache

    blocks = decoder_layers(model)
    deepest = max(layers)
    got: dict[int, object] = {}
    where: dict[str, torch.Tensor | None] = {"last": None}

    def hook(_mod, args, kwargs, layer):
        got[layer] = read(_hidden_arg(args, kwargs), where["last"])
        if layer == deepest:
            raise _Stop

    handles = [blocks[layer].register_forward_pre_hook(lambda m, a, k, layer=layer: hook(m, a, k, layer),
                                                       with_kwargs=True) for layer in sorted(set(layers))]
    device = next(model.parameters()).device
    cache_arg = _cache_kwarg(model)
    try:
        for p, members in prefix_groups(seqs):
            p = max(0, min(p, min(len(seqs[i]) for i in members) - 1 - tail))
            lengths = {i: len(seqs[i]) - p for i in members}
            prefix_cache = None
            for b in _batches(members, lengths, batch_size, batch_size * 256):
                hit = lookup(b) if lookup is not None else None
                if hit is not None:
                    yield "cached", p, members, b, hit
                    continue
                if p > 0 and prefix_cache is None:
                    prefix_cache = DynamicCache(config=model.config)
                    ids = torch.tensor([seqs[members[0]][:p]], device=device)
                    where["last"] = None
                    got.clear()
                    try:
                        model(input_ids=ids, attention_mask=torch.ones_like(ids),
                              position_ids=torch.arange(p, device=device)[None], use_cache=True, logits_to_keep=1,
                              **{cache_arg: prefix_cache})
                    except _Stop:
                        pass
                    yield "prefix", p, members, members, dict(got)
                width = max(lengths[i] for i in b)
                ids = torch.full((len(b), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(b), p + width), dtype=torch.long)
                mask[:, :p] = 1
                for r, i in enumerate(b):
                    ids[r, :lengths[i]] = torch.tensor(seqs[i][p:], dtype=torch.long)
                    mask[r, p:p + lengths[i]] = 1
                where["last"] = torch.tensor([lengths[i] - 1 for i in b], dtype=torch.long)
                got.clear()
                kv = _expanded_cache(prefix_cache, model, len(b)) if p > 0 else None
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device),
                          position_ids=(p + torch.arange(width, device=device)).expand(len(b), -1),
                          use_cache=kv is not None, logits_to_keep=1, **({cache_arg: kv} if kv is not None else {}))
                except _Stop:
                    pass
                yield "batch", p, members, b, dict(got)
    finally:
        for h in handles:
            h.remove()


def _shared_prefix_states(model, seqs: list[list[int]], layers: list[int], batch_size: int, pad_id: int,
                          desc: str, progress: bool, cache: StatesCache | None, run: Path | None,
                          offsets: tuple[int, ...] = (0,)) -> torch.Tensor:
    """``[n, n_layers, n_offsets, H]``: the states ``offsets`` tokens before each prompt's last token."""
    back = torch.tensor(offsets, dtype=torch.long)
    if min(offsets) < 0 or any(len(s) <= max(offsets) for s in seqs):
        raise ValueError(f"offsets {offsets}: every offset must be >= 0 and shorter than every prompt")

    def read(h, last):
        if last is None:  # the shared prefix's own forward: nothing to read
            return None
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        return h[rows, (last[:, None] - back[None, :]).to(h.device)].float().cpu()

    def lookup(b):
        return cache.get(run, StatesCache.batch_key([seqs[i] for i in b])) if cache is not None else None

    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
    out = torch.empty(len(seqs), len(layers), len(offsets), hidden)
    bar = tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False)
    try:
        for kind, _p, _members, b, got in prefix_group_forwards(model, seqs, layers, batch_size, pad_id,
                                                                tail=max(offsets), read=read, lookup=lookup):
            if kind == "prefix":
                continue
            states = got if kind == "cached" else torch.stack([got[l] for l in layers], dim=1)
            out[b] = states
            if kind == "batch" and cache is not None:
                cache.put(run, StatesCache.batch_key([seqs[i] for i in b]), states)
            bar.update(len(b))
    finally:
        bar.close()
    return out


def last_token_states(
    model,
    tokenizer,
    prompts: list[PromptLike],
    fmt: PromptFormat,
    batch_size: int = 16,
    layers: list[int] | None = None,
    desc: str = "hidden states",
    progress: bool = True,
    response_prefix: str = "",
    share_prefixes: bool = True,
    cache: StatesCache | None = None,
    offsets: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``[n_prompts, n_layers, H]`` fp32 states at the last prompt token (layers = all by default;
    with a ``response_prefix``, the assistant turn begun with it: the state at its last token).

    ``share_prefixes``: run text prompts in groups sharing a token prefix (module docstring);
    False, or prompts with images or a response prefix: left-padded batches. ``cache``: resume
    from / write to a :class:`StatesCache` (text prompts with shared prefixes only). ``offsets``
    (shared-prefix path only): also read the states that many tokens before the last one (e.g. the
    end of the user's text, before the assistant header); the result is then ``[n, n_layers,
    n_offsets, H]``."""
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    if not layers:
        raise ValueError("last_token_states: no layers asked for")
    shared = (share_prefixes and not response_prefix and not is_processor(tokenizer)
              and not any(prompt_image(p) is not None for p in prompts))
    if shared:
        tok = text_tokenizer(tokenizer)
        seqs = [encode_one(tok, p, fmt) for p in prompts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        offs = (0,) if offsets is None else tuple(int(o) for o in offsets)
        run = cache.run_dir(model, fmt, layers, f"last_token{list(offs)}") if cache is not None else None
        out = _shared_prefix_states(model, seqs, layers, batch_size, pad, desc, progress, cache, run, offs)
        return out[:, :, 0] if offsets is None else out
    if offsets is not None:
        raise ValueError("last_token_states: offsets need the shared-prefix path (text prompts, no response prefix)")
    return _padded_states(model, tokenizer, prompts, fmt, batch_size, layers, desc, progress, response_prefix)


@torch.no_grad()
def _padded_states(model, tokenizer, prompts, fmt, batch_size, layers, desc, progress, response_prefix) -> torch.Tensor:
    blocks = decoder_layers(model)
    deepest = max(layers)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for l in sorted(set(layers)):
        def hook(_mod, args, kwargs, l=l):
            store[l] = _hidden_arg(args, kwargs)[:, -1, :].float().cpu()
            if l == deepest:
                raise _Stop
        handles.append(blocks[l].register_forward_pre_hook(hook, with_kwargs=True))
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: batching_key(prompts[i]))
    out = torch.empty(len(prompts), len(layers), model.config.get_text_config().hidden_size
                      if hasattr(model.config, "get_text_config") else model.config.hidden_size)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            inputs = to_model(append_response_prefix(encode_batch(tokenizer, [prompts[i] for i in idx], fmt),
                                                     tokenizer, fmt, response_prefix), model)
            try:
                model(**inputs, position_ids=position_ids_from_mask(inputs["attention_mask"]), use_cache=False,
                      logits_to_keep=1)
            except _Stop:
                pass
            out[idx] = torch.stack([store[l] for l in layers], dim=1)
    finally:
        for h in handles:
            h.remove()
    return out


def probe_features(states: torch.Tensor) -> torch.Tensor:
    """What a probe reads from ``[n, k, H]`` states at its ``k`` layers (ascending, as a pack's
    ``layers``): ``[n, k * H]`` fp32, the layers' states concatenated in that order (layer-major);
    ``[n, H]`` (one layer, already squeezed) is returned as fp32."""
    if states.dim() == 3:
        return states.reshape(states.shape[0], -1).float()
    if states.dim() != 2:
        raise ValueError(f"probe_features: states of shape {tuple(states.shape)}, expected [n, k, H] or [n, H]")
    return states.float()


def probe_inputs(model, tokenizer, prompts: list[PromptLike], fmt: PromptFormat, layers: list[int],
                 batch_size: int = 16, **kwargs) -> torch.Tensor:
    """``[n, len(layers) * H]``: the input of a probe reading ``layers`` (a pack's ``layers``) at the
    last prompt token, by :func:`last_token_states` (``kwargs`` go to it)."""
    return probe_features(last_token_states(model, tokenizer, prompts, fmt, batch_size, layers=list(layers), **kwargs))


@torch.no_grad()
def generated_token_states(
    model,
    tokenizer,
    prompts: list[PromptLike],
    fmt: PromptFormat,
    layer: int | list[int],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    desc: str = "response states",
    progress: bool = True,
    response_prefix: str = "",
) -> tuple[list[torch.Tensor], list[str]]:
    """The states monitor mode probes, on the model's own greedy responses.

    For every prompt: ``[k, H]`` fp32 states entering block ``layer`` at generated tokens
    ``0 .. k-1`` (``k <= max_new_tokens``; fewer when the response ends: the stop token and what
    follows are not probed at run time, so they are left out), read by the same pre-hook during
    ``generate`` -- cached decode, exactly the tensor the runtime sees -- and the decoded
    responses. The model runs unsteered (nothing is attached during a fit). ``layer`` a list of n
    layers (a pack's ``layers``): ``[k, n * H]``, each token's states at those layers concatenated in
    the list's order, as a probe reading them takes them.

    ``response_prefix``: text put at the start of the assistant turn before generating (for
    example ``"Sure, here is"``: the model's responses when it has begun to comply); with no chat
    template (``fmt.chat_template`` False, or a tokenizer without one) it starts a new line after
    the prompt. Its tokens are part of the prompt: neither their states nor their text are returned.
    """
    layers = [int(layer)] if isinstance(layer, int) else [int(v) for v in layer]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"generated_token_states: layers {layers} must be distinct and at least one")
    blocks = decoder_layers(model)
    per_layer: dict[int, list[torch.Tensor]] = {l: [] for l in layers}

    def hook(_mod, args, kwargs, l):
        per_layer[l].append(_hidden_arg(args, kwargs)[:, -1, :].float().cpu())

    from ..prompting import text_tokenizer

    tok = text_tokenizer(tokenizer)
    stop = stop_token_ids(model)  # where the runtime stops probing a row
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)
    stop_ids = torch.tensor(stop, dtype=torch.long)
    order = sorted(range(len(prompts)), key=lambda i: batching_key(prompts[i]))
    states: list[torch.Tensor | None] = [None] * len(prompts)
    responses: list[str] = [""] * len(prompts)
    handles = [blocks[l].register_forward_pre_hook(lambda m, a, k, l=l: hook(m, a, k, l), with_kwargs=True) for l in layers]
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            inputs = to_model(append_response_prefix(encode_batch(tokenizer, [prompts[i] for i in idx], fmt),
                                                     tokenizer, fmt, response_prefix), model)
            width = inputs["input_ids"].shape[1]
            for v in per_layer.values():
                v.clear()
            # one more step than tokens kept: the state of generated token j is read when it is fed back
            seqs = model.generate(**inputs, max_new_tokens=max_new_tokens + 1, do_sample=False, pad_token_id=pad)
            seqs = seqs if isinstance(seqs, torch.Tensor) else seqs.sequences
            gen = seqs[:, width:].cpu()
            if len({len(v) for v in per_layer.values()}) != 1:
                raise RuntimeError("generated_token_states: the layers were read a different number of times")
            steps = [torch.cat(hs, dim=-1) for hs in zip(*(per_layer[l] for l in layers))]
            if len(steps) != gen.shape[1]:  # one forward for the prompt, one per generated token fed back
                raise RuntimeError(f"generated_token_states: {len(steps)} forwards for {gen.shape[1]} generated tokens "
                                   "(a chunked prefill?): the states would not line up with the tokens")
            fed = torch.stack(steps[1:], dim=1) if len(steps) > 1 else steps[0].new_zeros(len(idx), 0, steps[0].shape[-1])
            for j, i in enumerate(idx):
                ended = torch.isin(gen[j], stop_ids).nonzero()
                n = int(ended[0]) if len(ended) else gen.shape[1]
                k = min(n, fed.shape[1], max_new_tokens)
                states[i] = fed[j, :k].clone()
                responses[i] = tok.decode(gen[j, :n], skip_special_tokens=True)
    finally:
        for h in handles:
            h.remove()
    return states, responses  # type: ignore[return-value]

