"""Generation and evaluation: refusal rates per prompt file for unsteered / always-steered / AutoSteer.

The refusal judge is the offline phrase matcher of :mod:`autosteer.judge`, validated against
pyrit's human-labelled responses; its agreement is part of every report. Attack success rate
(ASR) is the share of harmful prompts not refused; over-refusal the share of benign prompts
refused.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .judge import is_refusal
from .method.pack import layers_text
from .prompting import (PromptFormat, PromptLike, append_response_prefix, batching_key, encode_batch, prompt_image, prompt_text,
                        text_tokenizer)

SETTINGS = {
    "unsteered": {"force": False, "mode": None},
    "always": {"force": True, "mode": None},
    "autosteer": {"force": None, "mode": "prefill"},
    "monitor": {"force": None, "mode": "monitor"},
}


def rate_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at ``z = 1.96``) of a rate seen ``k`` times in ``n``: what a dev set of ``n``
    prompts can say about the true rate. With ``k = 0`` its upper end is ``z^2 / (n + z^2)``: 0 fires in 40 prompts
    still allow 8.8%, and showing a rate <= 2% this way takes 0 fires in at least 189. ``(nan, nan)`` for ``n = 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"rate_interval: {k} of {n}")
    p, z2 = k / n, z * z
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))


#: what the interval column of a report means (printed under the table)
INTERVAL_NOTE = ("The interval is the Wilson score interval of the gate-fire rate (`autosteer.evaluate.rate_interval`): "
                 "what a set of n prompts can show. 0 fires in 40 prompts still allow 8.8%; a rate <= 2% needs 0 fires "
                 "in at least 189 prompts.")


def interval_text(k: int, n: int) -> str:
    """``"k/n, lo-hi%"`` for a report's cell: the 95% interval in percent, rounded outwards to 0.1 (0 fires in 184
    prompts reach 2.04%: "0.0-2.1%", not a rounded "2.0%" that would meet a 2% target); an empty set says so."""
    if n <= 0:
        return "0/0, no prompts"
    lo, hi = rate_interval(k, n)
    return f"{k}/{n}, {math.floor(1000 * lo) / 10:.1f}-{math.ceil(1000 * hi) / 10:.1f}%"


@dataclass
class Generation:
    response: str
    p_unsafe: float | None  # None where the prompt was not probed (always-steered runs)
    steered: bool  # the refusal blend was applied
    latched_at: int
    refused: bool  # the judge's verdict on the response
    gate: bool  # the gate's prefill decision (in unsteered runs: what it would have done)


def generate_batch(handle, tokenizer, prompts: list[PromptLike], setting: str = "autosteer", max_new_tokens: int = 64,
                   batch_size: int = 16, fmt: PromptFormat | None = None, progress: bool = True, desc: str = "",
                   response_prefix: str = "", **generate_kwargs) -> list[Generation]:
    """Greedy (unless ``generate_kwargs`` say otherwise) generation of every prompt in one setting.

    ``response_prefix``: every assistant turn begins with this text, a *prefilling attack* (the
    caller writes the start of the answer, as open-weight servers allow). It is part of the prompt --
    the gate reads its last token -- and the response (what the judge reads) is what follows it."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {setting!r}")
    fmt = fmt or handle.pack.prompt_format
    opts = SETTINGS[setting]
    if int(generate_kwargs.get("num_return_sequences", 1) or 1) != 1:
        raise ValueError("generate_batch makes one response per prompt: num_return_sequences must be 1")
    generate_kwargs.setdefault("do_sample", False)
    tok = text_tokenizer(tokenizer)
    pad_id = tok.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: batching_key(prompts[i]))  # less padding
    out: list[Generation | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc or setting, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        # handle.generate moves them to the model
        inputs = append_response_prefix(encode_batch(tokenizer, [prompts[i] for i in idx], fmt), tokenizer, fmt, response_prefix)
        width = inputs["input_ids"].shape[1]
        res = handle.generate(**inputs, max_new_tokens=max_new_tokens,
                              pad_token_id=pad_id, force=opts["force"], mode=opts["mode"], **generate_kwargs)
        for j, i in enumerate(idx):
            text = tok.decode(res.sequences[j, width:], skip_special_tokens=True)
            p = float(res.p_unsafe[j])
            out[i] = Generation(text, None if p != p else p, bool(res.steered[j]), int(res.latched_at[j]),
                                is_refusal(text), bool(res.gate[j]))
    return out  # type: ignore[return-value]


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file so that a crash never leaves it half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass
class PromptSet:
    name: str
    prompts: list[PromptLike]
    harmful: bool  # what refusing means here: True -> refusals are wanted (ASR), False -> over-refusal


def monitor_training(meta: dict) -> str | None:
    """What a pack's monitor probe was trained on, in words (None: no monitor metadata)."""
    from .method.fit import monitor_probe_training

    mon = meta.get("monitor")
    if not isinstance(mon, dict) or "tau_monitor" not in meta:
        return None
    return monitor_probe_training(mon)


def evaluate(handle, tokenizer, sets: list[PromptSet], settings: tuple[str, ...] = ("unsteered", "always", "autosteer"),
             max_new_tokens: int = 32, batch_size: int = 16, progress: bool = True, response_prefix: str = "",
             fmt: PromptFormat | None = None) -> dict:
    """Refusal rates for every prompt set in every setting, plus gate rates and probe scores.
    ``response_prefix``: begin every assistant turn with it (a prefilling attack; see :func:`generate_batch`).
    ``fmt``: render the prompts this way instead of as the pack was fitted (e.g. under the system prompt a
    server sets: the gate's rates move with it, docs/method.md 7k); the report records it."""
    from .judge import validate_judge

    t0 = time.time()
    has_monitor_probe = getattr(handle, "monitor_probe", None) is not None
    report: dict = {"pack": {**{k: handle.pack.meta.get(k) for k in ("model_name", "layer", "layer_rule", "tau", "tau_paper", "eps",
                                                                    "head_rank", "pooling", "pool_skip")},
                             "layers": handle.pack.meta.get("layers") or [handle.pack.meta.get("layer")]},
                    "tau_used": handle.tau, "tau_monitor_used": getattr(handle, "tau_monitor", None),
                    "tau_monitor_fallback": bool(getattr(handle, "tau_monitor_fallback", False)),
                    "monitor_probe": has_monitor_probe,
                    "monitor_window": getattr(handle, "monitor_window", None),
                    "monitor_from": getattr(handle, "monitor_from", None),
                    "monitor_training": monitor_training(handle.pack.meta) if has_monitor_probe else None,
                    "max_new_tokens": max_new_tokens, "response_prefix": response_prefix, "settings": list(settings),
                    # the format the prompts were rendered with when it is not the pack's (None: the pack's own)
                    "prompt_format": None if fmt is None else fmt.to_dict(),
                    "prompt_format_is_the_packs": fmt is None or fmt == handle.pack.prompt_format,
                    "sets": {}}
    for s in sets:
        entry: dict = {"n": len(s.prompts), "harmful": s.harmful, "results": {}}
        scores = gates = None
        for setting in settings:
            gens = generate_batch(handle, tokenizer, s.prompts, setting, max_new_tokens, batch_size, fmt=fmt,
                                  progress=progress, desc=f"{s.name}/{setting}", response_prefix=response_prefix)
            refusal = sum(g.refused for g in gens) / max(len(gens), 1)
            entry["results"][setting] = {
                "refusal_rate": refusal,
                "steered_rate": sum(g.steered for g in gens) / max(len(gens), 1),
                "examples": [{"prompt": str(p), "response": g.response, "refused": g.refused, "steered": g.steered}
                             for p, g in list(zip(s.prompts, gens))[:3]],
                # every row, for responses.jsonl (write_report keeps them out of report.json)
                "rows": [{"response": g.response, "refused": g.refused, "steered": g.steered, "gate": g.gate,
                          "latched_at": g.latched_at} for g in gens],
            }
            if setting == "monitor":
                leaks = sorted(g.latched_at for g in gens if g.latched_at > 0)
                entry["results"][setting]["leaked_tokens"] = leaks
                missed = [g for g in gens if not g.gate]  # rows the prefill gate let through
                entry["results"][setting]["prefill_missed"] = len(missed)
                entry["results"][setting]["caught_after_prefill"] = sum(g.steered for g in missed)
            if scores is None and setting != "always":
                scores, gates = [g.p_unsafe for g in gens], [g.gate for g in gens]
        if scores is None:
            scores = probe_scores(handle, tokenizer, s.prompts, batch_size, response_prefix=response_prefix, fmt=fmt)
            gates = handle.gate_decision(torch.tensor(scores)).tolist()
        tau_paper = float(handle.pack.meta["tau_paper"])
        entry["p_unsafe"] = scores
        entry["gate_rate"] = sum(gates) / max(len(gates), 1)
        entry["gate_fires"] = int(sum(gates))
        entry["gate_rate_ci95"] = list(rate_interval(entry["gate_fires"], len(gates))) if gates else None
        entry["gate_rate_tau_paper"] = sum(p is not None and p > tau_paper for p in scores) / max(len(scores), 1)
        report["sets"][s.name] = entry
    report["judge"] = validate_judge()
    report["seconds"] = round(time.time() - t0, 1)
    return report


@torch.no_grad()
def probe_scores(handle, tokenizer, prompts: list[PromptLike], batch_size: int = 16, response_prefix: str = "",
                 fmt: PromptFormat | None = None) -> list[float]:
    """The gate's score of each prompt: the probe's at the last prompt token (no generation; with a
    ``response_prefix``, at its last token, as :func:`generate_batch` serves it): the states at the
    pack's layers (``pack.layers``), concatenated in that order. ``fmt``: as :func:`evaluate`'s."""
    from .method.hidden_states import probe_inputs

    fmt = fmt or handle.pack.prompt_format
    if getattr(handle, "pool_probe", None) is not None:  # a pooled gate: its score as served, from one prefill each
        gens = generate_batch(handle, tokenizer, prompts, "unsteered", max_new_tokens=1, batch_size=batch_size, fmt=fmt,
                              progress=False, response_prefix=response_prefix)
        return [float("nan") if g.p_unsafe is None else g.p_unsafe for g in gens]
    x = probe_inputs(handle.model, tokenizer, prompts, fmt, handle.pack.layers, batch_size, progress=False,
                     response_prefix=response_prefix)
    return handle.probe_scores(x.to(handle.W1.device)).cpu().tolist()



def markdown_report(report: dict) -> str:
    """A human-readable summary of :func:`evaluate`'s report."""
    settings = report["settings"]
    lines = ["# AutoSteer evaluation", ""]
    p = report["pack"]
    tau_paper = p.get("tau_paper", 0.5)
    lines.append(f"Model `{p.get('model_name')}`, {layers_text(p)} ({p.get('layer_rule')}), tau {report['tau_used']:.3f} "
                 f"(paper {tau_paper}), eps {p.get('eps')}, head rank {p.get('head_rank')}; greedy, {report['max_new_tokens']} new tokens.")
    if p.get("pooling", "last_token") != "last_token":
        lines += ["", f"Pooled gate ({p['pooling']}): a prompt's score is the higher of the last token's and its highest "
                      f"token's from position {p.get('pool_skip')} on (docs/method.md 7l)."]
    if report.get("prompt_format_is_the_packs") is False:
        pf = report["prompt_format"]
        lines += ["", f"**Prompts rendered with the system prompt {pf.get('system')!r}**, not the one the pack was fitted "
                      "with: the gate's rates are measured for that system prompt (docs/method.md 7k)."]
    if report.get("response_prefix"):
        lines += ["", f"Prefilling attack: every assistant turn began with {report['response_prefix']!r} (part of the prompt: "
                      "the gate read its last token); the responses judged are what the model wrote after it."]
    lines += ["", "Refusal rate per prompt set (harmful sets: higher is better, ASR = 1 - rate; benign sets: lower is better).", ""]
    lines.append(f"| set | kind | n | gate fires (tau) | fires, 95% interval | gate fires ({tau_paper}) | "
                 + " | ".join(settings) + " |")
    lines.append("|---|---|---|---|---|---|" + "---|" * len(settings))
    for name, e in report["sets"].items():
        cells = [f"{100 * e['results'][s]['refusal_rate']:.1f}%" for s in settings]
        k = e.get("gate_fires", round(e["gate_rate"] * e["n"]))  # (reports written before the count was kept)
        lines.append(f"| {name} | {'harmful' if e['harmful'] else 'benign'} | {e['n']} | {100 * e['gate_rate']:.1f}% | "
                     f"{interval_text(k, e['n'])} | {100 * e['gate_rate_tau_paper']:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", INTERVAL_NOTE]
    j = report.get("judge", {})
    if j:
        lines += ["", "Refusal judge (phrase matcher on the response text, as used above) against pyrit's human labels:", ""]
        for fname, r in j.items():
            for mode in ("text", "text_on_topic"):
                m = r.get(mode) if isinstance(r, dict) else None
                if m:
                    what = "all rows" if mode == "text" else f"without the {r.get('n_off_topic')} off-topic answers pyrit labels as refusals"
                    lines.append(f"- {fname}, {what}: agreement {100 * m['agreement']:.1f}% (n={m['n']}), "
                                 f"precision {100 * m['precision']:.1f}%, recall {100 * m['recall']:.1f}%")
    if "monitor" in settings:
        tm = report.get("tau_monitor_used")
        scorer = "the pack's monitor probe" if report.get("monitor_probe") else "the prefill probe"
        window = report.get("monitor_window")
        how = ("" if tm is None else f" Generated tokens are scored by {scorer} against tau_monitor {tm:.6g}"
               + (" (a prefill-only pack: the prompt threshold, the probe never saw responses)" if report.get("tau_monitor_fallback")
                  else " (" + (report.get("monitor_training") or "fitted on the model's responses to fit prompts") + ")"
                  if report.get("monitor_probe") else " (the pack has no monitor probe: its prefill probe scores them)")
               + (f", the first {window} of them" if window else ", all of them")
               + ("." if report.get("monitor_from") is None else
                  f", in the requests whose prompt score is at least {report['monitor_from']:.4g} only (the two-stage gate)."))
        lines += ["", "Monitor mode: tokens generated before the latch (rows that latched after prefill)." + how, ""]
        for name, e in report["sets"].items():
            leaks = e["results"]["monitor"].get("leaked_tokens", [])
            r = e["results"]["monitor"]
            if leaks:
                med = leaks[len(leaks) // 2]
                p90 = leaks[min(len(leaks) - 1, int(0.9 * len(leaks)))]
                lines.append(f"- {name}: {len(leaks)} rows latched after prefill; leaked tokens median {med}, p90 {p90}")
            else:
                lines.append(f"- {name}: no row latched after prefill")
            if r.get("prefill_missed"):
                lines.append(f"  - the prefill gate let {r['prefill_missed']} rows through; monitor mode latched on "
                             f"{r['caught_after_prefill']} of them ({100 * r['caught_after_prefill'] / r['prefill_missed']:.1f}%) "
                             f"within {report['max_new_tokens']} new tokens")
    lines += ["", f"Evaluation took {report['seconds']} s."]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _scores_by_label(report: dict) -> tuple[list[float], list[float]]:
    harm = [p for e in report["sets"].values() if e["harmful"] for p in e["p_unsafe"] if p is not None]
    ben = [p for e in report["sets"].values() if not e["harmful"] for p in e["p_unsafe"] if p is not None]
    return harm, ben


def add_roc_auc(report: dict) -> None:
    """``report["roc_auc"]``: the probe's AUROC, harmful sets against benign sets (when both exist)."""
    from .method.probe import auroc

    harm, ben = _scores_by_label(report)
    if harm and ben:
        report["roc_auc"] = auroc(torch.tensor(harm + ben), torch.cat([torch.ones(len(harm)), torch.zeros(len(ben))]))


def save_plots(report: dict, pack_meta: dict, out_dir: str | os.PathLike) -> list[Path]:
    """SAS and AUROC per layer, probe-score histograms per set, ROC (harmful vs benign sets), refusal bars.

    Uses matplotlib's object API (``Figure``), never pyplot, so a caller's backend (a notebook's) is
    left alone. Without matplotlib: no plots, one warning naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots (pip install 'autosteer-kernels[plots]')", RuntimeWarning,
                      stacklevel=2)
        return []

    from .method.probe import roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    if "sas" in pack_meta and "val_auroc" in pack_meta:  # packs from `autosteer fit` record the layer sweep
        fig = Figure(figsize=(7, 3.5))
        ax = fig.subplots()
        layers = list(range(len(pack_meta["sas"])))
        ax.plot(layers, pack_meta["sas"], "o-", label=f"SAS ({pack_meta.get('sas_pairing', '?')} pairs)")
        if "sas_random_pairs" in pack_meta:
            ax.plot(layers, pack_meta["sas_random_pairs"], ".--", label="SAS (random pairs)")
        ax2 = ax.twinx()
        ax2.plot(layers, pack_meta["val_auroc"], "s-", color="tab:red", label="probe val AUROC")
        for layer in pack_meta.get("layers") or [pack_meta["layer"]]:
            ax.axvline(layer, color="gray", ls=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("SAS")
        ax2.set_ylabel("AUROC")
        fig.legend(loc="lower right", fontsize=8)
        chosen = "+".join(map(str, pack_meta.get("layers") or [pack_meta["layer"]]))
        ax.set_title(f"layer choice: {chosen} ({pack_meta['layer_rule']})")
        paths.append(_save(fig, out_dir / "layers.png"))

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for name, e in report["sets"].items():
        ax.hist([p for p in e["p_unsafe"] if p is not None], bins=40, range=(0, 1), alpha=0.5, label=name)
    ax.axvline(report["tau_used"], color="k", ls="--", label="tau")
    ax.set_xlabel("probe score p(unsafe)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "probe_scores.png"))

    harm, ben = _scores_by_label(report)
    if harm and ben:
        fpr, tpr, _ = roc_curve(torch.tensor(harm + ben), torch.cat([torch.ones(len(harm)), torch.zeros(len(ben))]))
        if "roc_auc" not in report:  # write_report computes it before plotting (also without matplotlib)
            add_roc_auc(report)
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set_xlabel("false-positive rate (benign sets)")
        ax.set_ylabel("true-positive rate (harmful sets)")
        ax.set_title(f"probe ROC, AUC {report['roc_auc']:.3f}")
        paths.append(_save(fig, out_dir / "roc.png"))

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    names = list(report["sets"])
    width = 0.8 / len(report["settings"])
    for k, setting in enumerate(report["settings"]):
        ax.bar([i + k * width for i in range(len(names))],
               [100 * report["sets"][n]["results"][setting]["refusal_rate"] for n in names], width, label=setting)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("refusal rate (%)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "refusal_rates.png"))
    return paths


def response_records(report: dict, prompts: dict[str, list] | None = None) -> list[dict]:
    """One record per prompt and setting: ``set``, ``index`` (the prompt's place in its set or file),
    ``setting``, ``p_unsafe``, the gate's prefill decision, ``steered``, ``latched_at`` (monitor mode:
    generated tokens before the latch; 0: from the prompt; -1: never), the judge's ``refused`` and the
    ``response``; with ``prompts`` (set name -> prompts) the prompt text too."""
    out = []
    for name, entry in report["sets"].items():
        for setting, res in entry["results"].items():
            for i, row in enumerate(res.get("rows", [])):
                rec = {"set": name, "index": i, "setting": setting, "p_unsafe": entry["p_unsafe"][i], **row}
                if prompts is not None and name in prompts:
                    p = prompts[name][i]
                    rec["prompt"] = prompt_text(p)
                    if prompt_image(p) is not None:
                        rec["image"] = str(prompt_image(p)) if isinstance(prompt_image(p), (str, os.PathLike)) else "(in memory)"
                out.append(rec)
    return out


def write_report(report: dict, pack_meta: dict, out_dir: str | os.PathLike,
                 prompts: dict[str, list] | None = None) -> dict[str, Path]:
    """``report.json`` (rates, scores, plots' data), ``report.md`` with the plots, and
    ``responses.jsonl``: every response with its gate score and verdict (:func:`response_records`)."""
    out_dir = Path(out_dir)
    add_roc_auc(report)
    plots = save_plots(report, pack_meta, out_dir)
    md = markdown_report(report) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    records = response_records(report, prompts)
    slim = {**report, "sets": {name: {**entry, "results": {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                                           for k, v in entry["results"].items()}}
                               for name, entry in report["sets"].items()}}
    return {"json": write_atomic(out_dir / "report.json", json.dumps(slim, indent=1)),
            "markdown": write_atomic(out_dir / "report.md", md),
            "responses": write_atomic(out_dir / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in records))}
