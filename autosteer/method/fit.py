"""``autosteer fit``: hidden states -> SAS and probe AUROC per layer -> layer -> probe -> Refusal Head -> pack.

Data comes from :func:`autosteer.data.default_splits` (fit splits only; dev data is never
touched here) or from the user's own labelled files. A stratified validation split of the fit
data chooses the layer (``layer_rule="auroc"``, the default, because on SmolLM2 SAS peaks at a
layer whose probe validates poorly -- the whole SAS curve is still recorded) and calibrates the
threshold to a target false-positive rate on benign validation prompts.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..models import num_layers, output_head
from ..prompting import PromptFormat, template_hash
from .hidden_states import last_token_states
from .pack import FORMAT, FORMAT_VERSION, SteerPack, model_fingerprint
from .probe import auroc, calibrate_threshold, roc_curve, train_probe
from .refusal_head import REFUSAL_ANSWER, answer_token_ids, collect_answer_states, train_refusal_head
from .sas import random_pairs, safety_awareness_score

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    layer_rule: str = "auroc"  # "auroc", "sas" or a layer number as a string/int
    probe_hidden: int = 64
    probe_epochs: int = 300
    probe_lr: float = 1e-3
    probe_weight_decay: float = 1e-2
    val_fraction: float = 0.25
    target_fpr: float = 0.05
    tau_paper: float = 0.5
    eps: float = 0.1
    head_rank: int | None = 16  # None: full d x d S
    head_epochs: int = 5
    head_lr: float = 1e-3
    head_prompts: int = 300
    refusal_answer: str = REFUSAL_ANSWER
    max_per_class: int = 1000
    batch_size: int = 16
    seed: int = 0
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    progress: bool = True


@dataclass
class FitData:
    harmful: list[str]
    benign: list[str]
    pairs: list[tuple[str, str]]  # minimal (harmful, benign) pairs for SAS; may be empty
    sources: dict  # description of where the data came from, with counts


def default_fit_data(seed: int = 0, max_per_class: int = 1000) -> FitData:
    """The fit splits of the shipped sources (see :mod:`autosteer.data`)."""
    from .. import data

    splits = data.default_splits(seed=seed)
    rng = random.Random(seed)
    harmful = [p.text for p in splits["fit_harmful"]]
    benign = [p.text for p in splits["fit_benign"]]
    rng.shuffle(harmful)
    rng.shuffle(benign)
    pairs = list(splits["fit_pairs"])
    # keep every minimal-pair question, fill up to the cap with the rest
    pair_h = {h for h, _ in pairs}
    pair_b = {b for _, b in pairs}
    harmful = list(pair_h) + [h for h in harmful if h not in pair_h]
    benign = list(pair_b) + [b for b in benign if b not in pair_b]
    harmful, benign = sorted(harmful[:max_per_class]), sorted(benign[:max_per_class])
    rng.shuffle(harmful)
    rng.shuffle(benign)
    sources = {name: sorted({p.source for p in splits[name]}) for name in ("fit_harmful", "fit_benign")}
    sources["counts"] = {"harmful": len(harmful), "benign": len(benign), "minimal_pairs": len(pairs)}
    return FitData(harmful, benign, pairs, sources)


def _stratified_split(labels: torch.Tensor, val_fraction: float, gen: torch.Generator):
    train, val = [], []
    for cls in (0, 1):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, int(round(val_fraction * len(idx))))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(val)


def choose_layer(rule: str | int, sas: list[float], val_auroc: list[float]) -> tuple[int, str]:
    rule = str(rule)
    if rule == "sas":
        return int(torch.tensor(sas).argmax()), "sas"
    if rule == "auroc":
        return int(torch.tensor(val_auroc).nan_to_num(0).argmax()), "auroc"
    if rule.lstrip("-").isdigit():
        layer = int(rule)
        if not 0 <= layer < len(sas):
            raise ValueError(f"layer {layer} is outside 0..{len(sas) - 1}")
        return layer, "fixed"
    raise ValueError(f"unknown layer rule {rule!r}: use 'auroc', 'sas' or a layer number")


def fit(model, tokenizer, cfg: FitConfig | None = None, data: FitData | None = None) -> SteerPack:
    """Fit AutoSteer on a frozen model and return the steer pack (not yet saved)."""
    cfg = cfg or FitConfig()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = data or default_fit_data(cfg.seed, cfg.max_per_class)
    if len(data.harmful) < 4 or len(data.benign) < 4:
        raise ValueError(f"fit needs at least 4 harmful and 4 benign prompts (got {len(data.harmful)} and {len(data.benign)})")
    n_layers = num_layers(model)
    fmt = cfg.prompt_format

    # 1. last-prompt-token states at every layer
    texts = list(dict.fromkeys(data.harmful + data.benign + [t for pair in data.pairs for t in pair]))
    where = {t: i for i, t in enumerate(texts)}
    states = last_token_states(model, tokenizer, texts, fmt, batch_size=cfg.batch_size, progress=cfg.progress)
    t_states = time.time() - t0
    X = torch.stack([states[where[t]] for t in data.harmful + data.benign])  # [n, L, H]
    y = torch.cat([torch.ones(len(data.harmful)), torch.zeros(len(data.benign))])

    # 2. SAS per layer: minimal pairs where we have them, random pairs always (noisier)
    sas_random_idx = random_pairs(len(data.harmful), len(data.benign), max(len(data.pairs), 150), gen)
    sas_random = safety_awareness_score(X[: len(data.harmful)][sas_random_idx[0]],
                                        X[len(data.harmful):][sas_random_idx[1]]).tolist()
    if len(data.pairs) >= 2:
        ph = torch.stack([states[where[h]] for h, _ in data.pairs])
        pb = torch.stack([states[where[b]] for _, b in data.pairs])
        sas = safety_awareness_score(ph, pb).tolist()
        sas_pairing = "minimal"
    else:
        sas, sas_pairing = sas_random, "random"

    # 3. probe validation AUROC per layer
    train_idx, val_idx = _stratified_split(y, cfg.val_fraction, gen)
    val_auroc = []
    for layer in range(n_layers):
        probe = train_probe(X[train_idx, layer], y[train_idx], cfg.probe_hidden, cfg.probe_epochs, cfg.probe_lr,
                            cfg.probe_weight_decay, cfg.seed)
        val_auroc.append(auroc(probe.score(X[val_idx, layer]), y[val_idx]))
    layer, rule = choose_layer(cfg.layer_rule, sas, val_auroc)
    sas_layer = int(torch.tensor(sas).argmax())
    t_probe_sweep = time.time() - t0 - t_states

    # 4. final probe on the chosen layer, thresholds from the validation split
    probe = train_probe(X[train_idx, layer], y[train_idx], cfg.probe_hidden, cfg.probe_epochs, cfg.probe_lr,
                        cfg.probe_weight_decay, cfg.seed)
    val_scores = probe.score(X[val_idx, layer])
    val_y = y[val_idx]
    tau_cal = calibrate_threshold(val_scores[val_y == 0], cfg.target_fpr)
    tau = max(tau_cal, 1e-6)
    if tau >= 1.0 - 1e-6:
        log.warning("the calibrated threshold saturated at %.6f (benign validation scores of 1.0): the gate would "
                    "hardly ever fire; check the fit data or raise --target-fpr", tau)

    def rates(t: float) -> dict:
        fire = val_scores > t
        return {"tpr": float(fire[val_y == 1].float().mean()), "fpr": float(fire[val_y == 0].float().mean())}

    fpr, tpr, _ = roc_curve(val_scores, val_y)

    # 5. Refusal Head on harmful fit prompts
    answer_ids = answer_token_ids(tokenizer, cfg.refusal_answer)
    head_prompts = data.harmful[: cfg.head_prompts]
    g, targets = collect_answer_states(model, tokenizer, head_prompts, fmt, answer_ids, cfg.batch_size, cfg.progress)
    head, head_losses = train_refusal_head(model, g, targets, cfg.head_rank, cfg.eps, cfg.head_epochs, cfg.head_lr,
                                           seed=cfg.seed, progress=cfg.progress)
    E = output_head(model).weight.detach().float().cpu()
    with torch.no_grad():
        pred = head.steered_logits(g, E).argmax(-1)
        head_token_acc = float((pred == targets).float().mean())

    elapsed = time.time() - t0
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "autosteer_version": __version__,
        "model_name": getattr(model, "autosteer_name", getattr(model.config, "_name_or_path", "")),
        "fingerprint": model_fingerprint(model),
        "num_layers": n_layers,
        "hidden_size": int(E.shape[1]),
        "vocab_size": int(E.shape[0]),
        "layer": layer,
        "layer_rule": rule,
        "sas_layer": sas_layer,
        "sas_pairing": sas_pairing,
        "sas": sas,
        "sas_random_pairs": sas_random,
        "val_auroc": val_auroc,
        "probe_hidden": cfg.probe_hidden,
        "pooling": "last_token",
        "tau": tau,
        "tau_rule": f"calibrated to FPR <= {cfg.target_fpr} on benign validation prompts",
        "tau_calibrated": tau_cal,
        "tau_paper": cfg.tau_paper,
        "target_fpr": cfg.target_fpr,
        "eps": cfg.eps,
        "head_rank": head.rank,
        "head_form": "full" if cfg.head_rank is None else "low_rank",
        "refusal_answer": cfg.refusal_answer,
        "prompt_format": fmt.to_dict(),
        "chat_template_sha256_16": template_hash(tokenizer),
        "metrics": {
            "val_auroc": val_auroc[layer],
            "val_at_tau": rates(tau),
            "val_at_tau_paper": rates(cfg.tau_paper),
            "val_roc": {"fpr": fpr, "tpr": tpr},
            "val_counts": {"harmful": int(val_y.sum()), "benign": int((val_y == 0).sum())},
            "head_losses": head_losses,
            "head_token_accuracy": head_token_acc,
            "seconds": {"states": round(t_states, 1), "probe_sweep": round(t_probe_sweep, 1), "total": round(elapsed, 1)},
        },
        "data": data.sources,
        "fit_config": {k: (v.to_dict() if isinstance(v, PromptFormat) else v) for k, v in cfg.__dict__.items()},
        "seed": cfg.seed,
    }
    pack = SteerPack(probe.W1, probe.b1, probe.w2, probe.b2, head.A.float(), head.B.float(), meta)
    pack.validate()
    log.info("fit done in %.1f s: layer %d (%s), val AUROC %.3f", elapsed, layer, rule, val_auroc[layer])
    return pack
