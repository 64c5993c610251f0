"""The steer pack: everything the runtime needs, in one safetensors file.

Tensors: ``probe.W1 [F, k*H]``, ``probe.b1 [F]``, ``probe.w2 [F]``, ``probe.b2 [1]``,
``head.A [H, r]``, ``head.B [H, r]`` (all float32). Metadata: one JSON string under the
safetensors metadata key ``"autosteer"`` (format version, model fingerprint, layers and the
rule that chose them, sizes, tau values (``tau_monitor``, the generated-token threshold of monitor
mode, is optional: packs without it are prefill-only), eps, prompt format, SAS/AUROC curves, fit metrics,
data sources, seed).

**Layers.** The probe reads the residual stream entering ``k`` decoder layers (1 <= k <= 4) at one
token, their states concatenated in ascending layer order: ``meta["layers"]`` lists them (strictly
ascending), ``meta["layer"]`` is the first of them (what readers from before several layers read),
and ``probe.W1`` (and ``monitor.W1``) is ``[F, k*H]``. Packs without ``"layers"`` (fitted before it
existed) read one layer, ``meta["layer"]``: :attr:`SteerPack.layers`. The key is additive, as
``tau_monitor`` and ``operating_points`` were: ``format_version`` stays 1, and a reader from before it
refuses a pack of several layers by W1's shape (no silent misreading).

Optional: the **monitor probe** ``monitor.W1 [F, k*H]``, ``monitor.b1 [F]``, ``monitor.w2 [F]``,
``monitor.b2 [1]`` (same sizes as the prefill probe, float32), fitted on the model's own response
states; monitor mode scores generated tokens with it against ``tau_monitor`` (which it requires).
A pack with ``tau_monitor`` but no monitor probe scores generated tokens with the prefill probe.

Optional: the **pooled gate's token probe** ``pool.W1 [F, k*H]``, ``pool.b1``, ``pool.w2``, ``pool.b2`` (same
sizes), with ``meta["pooling"] == "last_token|max"`` and ``meta["pool_skip"]`` (the prompt position pooling
starts at): the gate also fires when the highest token score over the prompt's tokens passes tau. A reader from
before these keys refuses such a pack by its unexpected tensors, rather than serving its last-token gate alone.

Packs are read with safetensors only -- never unpickled -- and validated on load: every
tensor's name, shape, dtype and finiteness, the metadata schema, and (at attach time) the
model fingerprint. Every problem raises :class:`PackError` with a message naming it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "autosteer-pack"
FORMAT_VERSION = 1
_META_KEY = "autosteer"
_REQUIRED_META = {
    "format": str, "format_version": int, "layer": int, "layer_rule": str, "hidden_size": int,
    "vocab_size": int, "num_layers": int, "probe_hidden": int, "head_rank": int, "eps": (int, float),
    "tau": (int, float), "tau_paper": (int, float), "prompt_format": dict, "fingerprint": dict,
}
#: the most layers one probe reads (``meta["layers"]``; a ``+``-joined fit layer rule)
MAX_PROBE_LAYERS = 4
_TENSORS = ("probe.W1", "probe.b1", "probe.w2", "probe.b2", "head.A", "head.B")
_MONITOR_TENSORS = ("monitor.W1", "monitor.b1", "monitor.w2", "monitor.b2")
_POOL_TENSORS = ("pool.W1", "pool.b1", "pool.w2", "pool.b2")
#: what a gate reads of the prompt (meta "pooling", FitConfig.pooling): the last token alone, or also the max over
#: every prompt token's token-probe score (docs/method.md 7l)
POOLINGS = ("last_token", "last_token|max")
_FINGERPRINT_ROWS = 64


class PackError(ValueError):
    """A steer pack is malformed or does not match the model; the message names the problem."""


def pack_sha256(path) -> str:
    """The first 16 hex digits of a pack file's SHA-256 ("?" when it cannot be read): what servers log at start-up,
    so an operator can tell which pack each worker serves."""
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return "?"


def model_fingerprint(model) -> dict:
    """What identifies a model for a pack: its text config's sizes and a dtype-robust checksum
    of the output embedding (float64 sums of 64 fixed rows)."""
    from ..models import num_layers, output_head, text_config

    cfg = text_config(model)
    E = output_head(model).weight.detach()
    V = E.shape[0]
    idx = torch.linspace(0, V - 1, _FINGERPRINT_ROWS).long()
    rows = E[idx.to(E.device)].double().cpu()
    return {
        "model_type": getattr(cfg, "model_type", "unknown"),
        # the whole model's type: a multimodal wrapper (llava_onevision) and its bare language
        # model (qwen2) read different hidden states, so a pack of one does not serve the other
        "architecture": getattr(model.config, "model_type", "unknown"),
        "hidden_size": int(E.shape[1]),
        "vocab_size": int(V),
        "num_layers": int(num_layers(model)),
        "embedding_row_sums": [round(float(x), 6) for x in rows.sum(1)],
        "embedding_row_abs_sums": [round(float(x), 6) for x in rows.abs().sum(1)],
    }


def check_fingerprint(expected: dict, model) -> None:
    """Raise :class:`PackError` unless ``model`` is the model the pack was fitted on."""
    got = model_fingerprint(model)
    for key in ("hidden_size", "vocab_size", "num_layers"):
        if expected.get(key) != got[key]:
            raise PackError(f"pack does not match the model: {key} is {expected.get(key)} in the pack but {got[key]} in the model")
    if "architecture" in expected and expected["architecture"] != got["architecture"]:
        raise PackError(f"pack does not match the model: it was fitted on a {expected['architecture']!r} model, "
                        f"this is a {got['architecture']!r} model")
    if expected.get("model_type") != got["model_type"]:
        raise PackError(f"pack does not match the model: model_type {expected.get('model_type')!r} in the pack, {got['model_type']!r} in the model")
    a = torch.tensor(expected.get("embedding_row_abs_sums", []), dtype=torch.float64)
    b = torch.tensor(got["embedding_row_abs_sums"], dtype=torch.float64)
    s_a = torch.tensor(expected.get("embedding_row_sums", []), dtype=torch.float64)
    s_b = torch.tensor(got["embedding_row_sums"], dtype=torch.float64)
    if a.shape != b.shape or s_a.shape != s_b.shape:
        raise PackError("pack fingerprint is malformed (embedding checksums have the wrong length)")
    # robust to dtype (fp32 / fp16 / bf16 copies of the same weights), not to other weights
    if not torch.allclose(a, b, rtol=2e-2, atol=1e-2) or not torch.allclose(s_a, s_b, rtol=5e-2, atol=0.05 * float(b.mean())):
        raise PackError("pack does not match the model: the output-embedding checksum differs "
                        "(the pack was fitted on other weights)")


@dataclass
class SteerPack:
    """A fitted AutoSteer pack (probe + Refusal Head + how to apply them)."""

    W1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    meta: dict = field(default_factory=dict)
    # optional monitor probe for generated tokens: {"W1": [F, k*H], "b1": [F], "w2": [F], "b2": [1]}
    monitor: dict | None = None
    # optional token probe of the pooled gate (meta pooling "last_token|max"), the same form
    pool: dict | None = None

    @property
    def layer(self) -> int:
        """The first (lowest) layer the probe reads; :attr:`layers` lists them all."""
        return int(self.meta["layer"])

    @property
    def layers(self) -> list[int]:
        """The layers the probe reads, ascending: its input is their states at one token concatenated in
        this order (``[k*H]``). ``meta["layers"]``, or ``[meta["layer"]]`` for a pack from before the key."""
        got = self.meta.get("layers")
        return [int(v) for v in got] if got is not None else [int(self.meta["layer"])]

    @property
    def tau(self) -> float:
        return float(self.meta["tau"])

    @property
    def tau_monitor(self) -> float | None:
        """Threshold for generated tokens in monitor mode; None for a prefill-only pack."""
        v = self.meta.get("tau_monitor")
        return None if v is None else float(v)

    @property
    def eps(self) -> float:
        return float(self.meta["eps"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def prompt_format(self):
        """How prompts were formatted at fit time (:class:`autosteer.prompting.PromptFormat`): serve them the same way."""
        from ..prompting import PromptFormat

        return PromptFormat.from_dict(self.meta["prompt_format"])

    @property
    def has_monitor_probe(self) -> bool:
        return self.monitor is not None

    @property
    def pooling(self) -> str:
        """What the gate reads of the prompt: ``"last_token"``, or ``"last_token|max"`` (also :attr:`pool`'s
        token probe over the prompt's tokens from position :attr:`pool_skip` on)."""
        return str(self.meta.get("pooling") or "last_token")

    @property
    def pool_skip(self) -> int:
        """The prompt position the pooled gate starts at (the tokens before it, shared by every fit prompt, are left
        out); 0 for a pack without a pooled gate."""
        return int(self.meta.get("pool_skip", 0))

    def pool_probe(self):
        """The pooled gate's token probe (:class:`autosteer.method.probe.Probe`), or None."""
        from .probe import Probe

        return None if self.pool is None else Probe(*(self.pool[k] for k in ("W1", "b1", "w2", "b2")))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"probe.W1": self.W1, "probe.b1": self.b1, "probe.w2": self.w2, "probe.b2": self.b2,
               "head.A": self.A, "head.B": self.B}
        if self.monitor is not None:
            out.update({f"monitor.{k}": self.monitor.get(k) for k in ("W1", "b1", "w2", "b2")})
        if self.pool is not None:
            out.update({f"pool.{k}": self.pool.get(k) for k in ("W1", "b1", "w2", "b2")})
        return out

    def stacked_probes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W1 [2, F, k*H], b1 [2, F], w2 [2, F], b2 [2])``: probe 0 the prefill probe, probe 1 the
        monitor probe -- the stacked weights ``steer_step`` takes with a per-row ``row_probe``."""
        if self.monitor is None:
            raise PackError("this pack has no monitor probe")
        m = self.monitor
        return (torch.stack([self.W1, m["W1"]]), torch.stack([self.b1, m["b1"]]), torch.stack([self.w2, m["w2"]]),
                torch.cat([self.b2.reshape(1), m["b2"].reshape(1)]))

    def validate(self) -> None:
        """Check the metadata schema and every tensor's shape, dtype and finiteness."""
        _validate_meta(self.meta)
        H, F, r = self.meta["hidden_size"], self.meta["probe_hidden"], self.meta["head_rank"]
        k = len(self.layers)
        shapes = {"probe.W1": (F, k * H), "probe.b1": (F,), "probe.w2": (F,), "probe.b2": (1,), "head.A": (H, r), "head.B": (H, r)}
        shapes.update({pre + k[len("probe."):]: v for pre in ("monitor.", "pool.") for k, v in list(shapes.items())
                       if k.startswith("probe.")})
        pooling = self.meta.get("pooling", "last_token")
        if pooling not in POOLINGS:
            raise PackError(f"pack pooling {pooling!r} is unknown (this autosteer serves "
                            f"{' and '.join(map(repr, POOLINGS))})")
        if (pooling == "last_token|max") != (self.pool is not None):
            raise PackError(f"pack pooling is {pooling!r} but it {'lacks' if self.pool is None else 'has'} the "
                            "pooled gate's token probe (pool.*)")
        if self.pool is not None:
            if not isinstance(self.pool, dict) or set(self.pool) != {"W1", "b1", "w2", "b2"}:
                raise PackError("pack pooled-gate probe must hold exactly W1, b1, w2 and b2")
            skip = self.meta.get("pool_skip")
            if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
                raise PackError(f"pack metadata 'pool_skip' must be an int >= 0 (the prompt position pooling starts "
                                f"at), got {skip!r}")
        if self.monitor is not None:
            if not isinstance(self.monitor, dict) or set(self.monitor) != {"W1", "b1", "w2", "b2"}:
                raise PackError("pack monitor probe must hold exactly W1, b1, w2 and b2")
            if self.meta.get("tau_monitor") is None:
                raise PackError("pack has a monitor probe but no 'tau_monitor' threshold for it")
        for name, t in self.tensors().items():
            if not isinstance(t, torch.Tensor):
                raise PackError(f"pack tensor {name} is missing")
            if t.dtype != torch.float32:
                raise PackError(f"pack tensor {name} has dtype {t.dtype}, expected torch.float32")
            if tuple(t.shape) != shapes[name]:
                raise PackError(f"pack tensor {name} has shape {tuple(t.shape)}, expected {shapes[name]} "
                                f"(metadata says hidden_size={H}, probe_hidden={F}, head_rank={r}"
                                + (f", {k} layers {self.layers}: W1 reads {k} x {H}" if k > 1 or "layers" in self.meta else "")
                                + ")")
            if not bool(torch.isfinite(t).all()):
                raise PackError(f"pack tensor {name} contains NaN or inf")
        if not 0 <= self.meta["layer"] < self.meta["num_layers"]:
            raise PackError(f"pack layer {self.meta['layer']} is outside 0..{self.meta['num_layers'] - 1}")
        tm = self.meta.get("tau_monitor")
        if tm is not None and (isinstance(tm, bool) or not isinstance(tm, (int, float))):
            raise PackError(f"pack metadata 'tau_monitor' has the wrong type ({type(tm).__name__})")
        mon = self.meta.get("monitor")
        if mon is not None and "tokens" in mon:
            n = mon["tokens"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise PackError(f"pack metadata 'monitor.tokens' must be an int >= 1, got {n!r}")
        for key in ("tau", "tau_paper") + (("tau_monitor",) if tm is not None else ()):
            if not 0.0 <= float(self.meta[key]) <= 1.0:
                raise PackError(f"pack {key}={self.meta[key]} is not a probability threshold in [0, 1]")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pack atomically (a crash never leaves a half-written file)."""
        from safetensors.torch import save_file

        self.validate()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous().cpu() for k, v in self.tensors().items()}, tmp,
                      metadata={_META_KEY: json.dumps(self.meta, sort_keys=True)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def layers_text(meta: dict) -> str:
    """``"layer 16"`` or ``"layers 12+16+20"``: the layers a pack's probe reads, from its metadata
    (``layers``, or ``layer`` for a pack from before the key)."""
    layers = meta.get("layers") or [meta.get("layer")]
    return f"layer {layers[0]}" if len(layers) == 1 else "layers " + "+".join(map(str, layers))


def _threshold(name: str, value) -> float:
    """``value`` as a probability threshold; outside ``[0, 1]`` (or NaN) raises naming ``name``."""
    t = float(value)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{name}={value} is not a probability threshold in [0, 1]")
    return t


#: named operating points a pack may carry (``meta["operating_points"]``), strictest first: the gate
#: fires most on ``strict`` (more harmful requests caught, more benign ones steered) and least on
#: ``permissive``; ``balanced`` is the pack's own ``tau``
OPERATING_POINTS = ("strict", "balanced", "permissive")


def operating_point_tau(pack: "SteerPack", name: str) -> float:
    """The threshold of the operating point ``name`` of ``pack``; an unknown name or a pack without
    operating points raises ValueError naming what the pack has."""
    points = pack.meta.get("operating_points") or {}
    key = str(name).strip().lower()
    if key == "balanced" and not points:  # a pack from before operating points: its own tau is its balanced point
        return _threshold("tau", pack.tau)
    if key not in points:
        have = ", ".join(sorted(points)) if points else "none (it was fitted before operating points existed: refit it)"
        raise ValueError(f"operating point {name!r} is not in this pack; it has: {have}")
    return _threshold(f"operating point {key!r}", points[key]["tau"])


def operating_point_taus(pack: "SteerPack") -> dict[str, float]:
    """``{name: tau}`` of the pack's operating points (an older pack: ``{"balanced": its tau}``)."""
    points = pack.meta.get("operating_points") or {}
    return {k: float(v["tau"]) for k, v in points.items()} if points else {"balanced": float(pack.tau)}


def prompt_threshold(pack: "SteerPack", override: float | str | None = None) -> float:
    """The prefill gate's threshold: ``override`` if given (a number, or the name of one of the
    pack's operating points: ``strict``, ``balanced``, ``permissive``), else the pack's ``tau``. A
    value outside ``[0, 1]`` (or NaN) raises: above 1 the gate could never fire, below 0 it would
    steer every row."""
    if isinstance(override, str) and override.strip().lower() in OPERATING_POINTS:
        return operating_point_tau(pack, override)
    return _threshold("tau", pack.tau if override is None else override)


def monitor_threshold(pack: "SteerPack", tau: float, override: float | None = None) -> tuple[float, bool]:
    """``(threshold for generated tokens in monitor mode, fallback)``: ``override`` if given, else the
    pack's ``tau_monitor``; a prefill-only pack falls back to ``tau`` (``fallback=True``: callers warn
    when monitor mode runs on it, see :func:`warn_monitor_fallback`)."""
    if override is not None:
        return _threshold("tau_monitor", override), False
    if pack.tau_monitor is not None:
        return pack.tau_monitor, False
    return float(tau), True


#: a threshold no probability passes (the op latches on p > tau): rows the two-stage gate does not watch
NEVER_TAU = 2.0


def grey_zone_start(pack: "SteerPack", tau: float, override: float | str | None) -> float | None:
    """The two-stage gate's ``monitor_from``: monitor mode watches only the requests whose prompt score is at
    least this (a number or an operating point of ``pack``); None: every request. Raises ValueError when it is
    above the prompt threshold ``tau`` (the grey zone ``[monitor_from, tau)`` would be empty)."""
    if override is None:
        return None
    low = prompt_threshold(pack, override)
    if low > tau:
        raise ValueError(f"monitor_from {low:.4g} is above the prompt threshold {tau:.4g}: the grey zone "
                         "[monitor_from, tau) it watches would be empty")
    return low


def grey_zone_taus(p: torch.Tensor, low: float, tau_monitor: float) -> torch.Tensor:
    """Each row's generated-token threshold under the two-stage gate, from its prompt score ``p``: ``tau_monitor``
    where ``p >= low`` or ``p`` is NaN (no score: watched), :data:`NEVER_TAU` elsewhere (float32)."""
    watched = (p >= low) | torch.isnan(p)
    return torch.full(p.shape, NEVER_TAU, dtype=torch.float32, device=p.device).masked_fill_(watched, float(tau_monitor))


def monitor_window(pack: "SteerPack", override: int | None = None) -> int | None:
    """How many generated tokens monitor mode probes (then it stops, so its calibrated false-latch
    rate holds for any response length): ``override`` if given (``0``: no limit), else the number of
    response tokens ``tau_monitor`` was calibrated on (pack metadata ``monitor.tokens``); None: no limit."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 0:
            raise ValueError(f"monitor_window={override!r} must be an int >= 0 (0: probe every generated token)")
        return override or None
    mon = pack.meta.get("monitor")
    return int(mon["tokens"]) if pack.tau_monitor is not None and isinstance(mon, dict) and "tokens" in mon else None


def warn_monitor_fallback() -> None:
    import warnings

    warnings.warn(
        "autosteer: monitor mode with a prefill-only pack (no tau_monitor: fitted with monitor_prompts=0 or "
        "before monitor calibration existed). Generated tokens are probed with the prompt threshold by a probe "
        "that never saw response states; it fires on most benign responses. Refit the pack "
        "(`autosteer fit`, monitor_prompts > 0) or pass tau_monitor explicitly.",
        UserWarning,
        stacklevel=3,
    )


def _validate_meta(meta: dict) -> None:
    if not isinstance(meta, dict):
        raise PackError("pack metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise PackError(f"not an autosteer pack: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackError(f"unsupported pack format_version {meta.get('format_version')!r} (this autosteer reads {FORMAT_VERSION})")
    for key, typ in _REQUIRED_META.items():
        if key not in meta:
            raise PackError(f"pack metadata lacks {key!r}")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise PackError(f"pack metadata {key!r} has the wrong type ({type(meta[key]).__name__})")
    for key in ("hidden_size", "vocab_size", "num_layers", "probe_hidden", "head_rank"):
        if meta[key] < 1:
            raise PackError(f"pack metadata {key!r} must be >= 1, got {meta[key]}")
    fp = meta["fingerprint"]
    for key in ("hidden_size", "vocab_size", "num_layers"):  # the sizes the model is checked against
        if key in fp and fp[key] != meta[key]:
            raise PackError(f"pack metadata is inconsistent: {key} is {meta[key]} but the model fingerprint says {fp[key]}")
    if "layers" in meta:
        _validate_layers(meta)
    eps = meta["eps"]
    if not (math.isfinite(eps) and eps > 0):
        raise PackError(f"pack eps={eps} must be a positive finite number (the weight of the refusal logits)")
    pf = meta["prompt_format"]
    known = {"chat_template": bool, "system": (str, type(None)), "max_prompt_tokens": int, "bare_special_tokens": bool}
    for key, value in pf.items():
        if key not in known:
            raise PackError(f"pack metadata prompt_format has an unknown field {key!r} (known: {', '.join(known)})")
        if not isinstance(value, known[key]) or (known[key] is int and isinstance(value, bool)):
            raise PackError(f"pack metadata prompt_format.{key} has the wrong type ({type(value).__name__})")
    if pf.get("max_prompt_tokens", 1) < 1:
        raise PackError(f"pack metadata prompt_format.max_prompt_tokens must be >= 1, got {pf['max_prompt_tokens']}")
    if "monitor" in meta and not isinstance(meta["monitor"], dict):
        raise PackError(f"pack metadata 'monitor' must be an object, got {type(meta['monitor']).__name__}")


def _validate_layers(meta: dict) -> None:
    """``meta["layers"]``: 1 to :data:`MAX_PROBE_LAYERS` distinct layer numbers, strictly ascending (the
    order of the probe's concatenated input), each in ``0..num_layers-1``, the first equal to ``meta["layer"]``."""
    layers, n = meta["layers"], meta["num_layers"]
    if (not isinstance(layers, list) or not layers
            or any(isinstance(v, bool) or not isinstance(v, int) for v in layers)):
        raise PackError(f"pack metadata 'layers' must be a non-empty list of layer numbers, got {layers!r}")
    if len(layers) > MAX_PROBE_LAYERS:
        raise PackError(f"pack metadata 'layers' lists {len(layers)} layers {layers}: a probe reads at most {MAX_PROBE_LAYERS}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise PackError(f"pack metadata 'layers' {layers} must be strictly ascending (distinct layers, lowest first: "
                        "the order of the probe's concatenated input)")
    bad = [v for v in layers if not 0 <= v < n]
    if bad:
        raise PackError(f"pack layers {layers}: layer {bad[0]} is outside 0..{n - 1}")
    if meta["layer"] != layers[0]:
        raise PackError(f"pack metadata is inconsistent: 'layer' is {meta['layer']} but the first of 'layers' "
                        f"{layers} is {layers[0]}")


def load_pack(path: str | os.PathLike) -> SteerPack:
    """Read and validate a pack with safetensors (no pickle). Raises :class:`PackError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise PackError(f"pack file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(_META_KEY)
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PackError(f"{path} is not a readable safetensors pack (truncated or malformed file?): {exc}") from exc
    if meta_raw is None:
        raise PackError(f"{path} has no autosteer metadata: not a steer pack")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as exc:
        raise PackError(f"{path}: pack metadata is not valid JSON ({exc})") from exc
    missing = [k for k in _TENSORS if k not in names]
    if missing:
        raise PackError(f"{path}: pack lacks tensors {missing}")
    extra = sorted(names - set(_TENSORS) - set(_MONITOR_TENSORS) - set(_POOL_TENSORS))
    if extra:
        raise PackError(f"{path}: pack has unexpected tensors {extra}")
    optional = {}
    for what, keys in (("monitor", _MONITOR_TENSORS), ("pool", _POOL_TENSORS)):
        got = [k for k in keys if k in names]
        if got and len(got) != len(keys):
            raise PackError(f"{path}: pack has an incomplete {'monitor' if what == 'monitor' else 'pooled-gate'} probe "
                            f"(lacks {sorted(set(keys) - set(got))})")
        optional[what] = {k[len(what) + 1:]: tensors[k] for k in keys} if got else None
    pack = SteerPack(tensors["probe.W1"], tensors["probe.b1"], tensors["probe.w2"], tensors["probe.b2"],
                     tensors["head.A"], tensors["head.B"], meta, optional["monitor"], optional["pool"])
    try:
        pack.validate()
    except PackError as exc:
        raise PackError(f"{path}: {exc}") from None
    return pack
