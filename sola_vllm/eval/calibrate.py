"""Calibrate the routing threshold of an edit store on a probe set (SoLA, arXiv 2603.11239).

A probe is a prompt and the edit it should route to: a positive (a paraphrase of an edit's
prompt, say) names an active edit, a negative (`null`, or a bare string) must stay unrouted.
Every probe's nearest active key and its distance are read with `RoutedEngine.nearest` (no
threshold). The router routes when distance < threshold, strictly, so the suggested threshold
is the largest one under which at most a share 1 - keep of the negatives would route:

    k = floor((1 - keep) * num_negatives);  threshold = sorted(negative_distances)[k]

Hit, wrong-edit, miss and false-fire rates are reported at that threshold and at the
configured one, with distance quantiles and the margin between positives and negatives.
A store with chat-form keys (`Edit.key_forms`) routes each key under its form's threshold, so
probes are also analysed per form of their nearest key (`by_key_form`), each against its own
configured threshold, and a threshold is suggested for each form.

    sola-vllm calibrate --store edits --probes probes.jsonl [--keep 0.99] [--out DIR] [--json]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Probe", "calibrate", "load_probes", "suggest_threshold", "summarize"]

QUANTILES = (("min", 0.0), ("p1", 0.01), ("p5", 0.05), ("p50", 0.5), ("p95", 0.95),
             ("p99", 0.99), ("max", 1.0))
BATCH_SIZE = 32
_PROBE_FIELDS = ("prompt", "edit")


class ProbeError(ValueError):
    """The probe file is missing, malformed, or cannot calibrate a threshold."""


@dataclass(frozen=True)
class Probe:
    prompt: str
    edit: str | None  # the edit it must route to; None: it must stay unrouted
    where: str = ""  # "probes.jsonl:3" / "probes.json[2]", for messages


@dataclass(frozen=True)
class Outcome:
    """A probe's nearest active key: the edit owning it and the distance (no threshold)."""

    prompt: str
    expected: str | None
    nearest: str | None
    distance: float
    key_form: str = "raw"  # the nearest key's form (`config.KEY_FORMS`)


# --- probe files --------------------------------------------------------------------------------
def load_probes(path: str | Path, known_ids: Iterable[str]) -> list[Probe]:
    """Read a JSON list or JSONL file of probes: {"prompt": str, "edit": str | null} objects
    or bare strings (negatives). `known_ids`: the active edits a positive may name. Raises
    `ProbeError` naming the line (JSONL, 1-based) or index (JSON list, 0-based) at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ProbeError(f"probe file {path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(f"cannot read probe file {path}: {exc}") from exc
    known = set(known_ids)
    probes = [_parse_probe(item, where, known) for where, item in _items(path, text)]
    if not probes:
        raise ProbeError(f"probe file {path} holds no probes")
    if all(p.edit is not None for p in probes):
        raise ProbeError(f"probe file {path} holds no negatives (probes with \"edit\": null): "
                         "a threshold cannot be suggested without them")
    return probes


def _items(path: Path, text: str) -> list[tuple[str, object]]:
    """(location, decoded item) pairs: a JSON list for `.json` files or text starting with
    `[`, else one JSON value per non-blank line."""
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProbeError(f"{path}: bad JSON: {exc}") from exc
        if not isinstance(data, list):
            raise ProbeError(f"{path}: expected a JSON list of probes, got "
                             f"{type(data).__name__}")
        return [(f"{path.name}[{i}]", item) for i, item in enumerate(data)]
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path.name}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ProbeError(f"{path.name}:{number}: bad JSON: {exc}") from exc
    return items


def _parse_probe(item: object, where: str, known: set[str]) -> Probe:
    if isinstance(item, str):
        item = {"prompt": item, "edit": None}
    if not isinstance(item, dict):
        raise ProbeError(f"{where}: a probe is an object {{\"prompt\": ..., \"edit\": ...}} or a "
                         f"string, got {type(item).__name__}")
    unknown = sorted(set(item) - set(_PROBE_FIELDS))
    if unknown:  # a typo such as "edit_id" would silently turn a positive into a negative
        raise ProbeError(f"{where}: unknown field(s) {unknown}; a probe has {list(_PROBE_FIELDS)}")
    prompt, edit = item.get("prompt"), item.get("edit")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProbeError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
    if edit is not None and not isinstance(edit, str):
        raise ProbeError(f"{where}: \"edit\" must be an edit id or null, got {edit!r}")
    if edit is not None and edit not in known:
        shown = ", ".join(sorted(known)[:8]) or "none"
        raise ProbeError(f"{where}: unknown edit {edit!r}: not an active edit of the store "
                         f"(active: {shown})")
    return Probe(prompt, edit, where)


# --- pure statistics ----------------------------------------------------------------------------
def suggest_threshold(negative_distances: Sequence[float], keep: float) -> float:
    """The largest threshold t with #{d < t} <= (1 - keep) * n over the n negative distances,
    i.e. at least `keep` of the negatives stay unrouted under strict `d < t` routing. keep=1.0
    gives the smallest negative distance (no negative routes)."""
    check_keep(keep)
    values = sorted(float(d) for d in negative_distances)
    if not values:
        raise ValueError("a threshold cannot be suggested without negative distances")
    if any(math.isnan(d) for d in values):
        raise ValueError("negative distances contain NaN")
    # every value before index `allowed` may be < t; values[allowed] itself must not be
    return values[min(allowed_false_fires(len(values), keep), len(values) - 1)]


def check_keep(keep: float) -> None:
    """`keep`, the share of negatives that must stay unrouted, is in (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {keep!r}")


def allowed_false_fires(num_negatives: int, keep: float) -> int:
    """floor((1 - keep) * n), rounded first: (1 - 0.9) * 10 is 0.9999999999999998 in binary,
    yet keep=0.9 of 10 negatives allows one to route."""
    return math.floor(round((1.0 - keep) * num_negatives, 9))


def quantiles(values: Sequence[float]) -> dict:
    """min, p1, p5, p50, p95, p99, max (linear interpolation, numpy's default) and count;
    the quantiles are None for no values."""
    ordered = sorted(float(v) for v in values)
    out: dict = {"count": len(ordered)}
    for name, q in QUANTILES:
        out[name] = _quantile(ordered, q) if ordered else None
    return out


def _quantile(ordered: list[float], q: float) -> float:
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(positives: Sequence[Outcome], negatives: Sequence[float],
              threshold: float) -> dict:
    """Rates at `threshold` (route iff distance < threshold): over positives, hit (routed to
    the expected edit), wrong edit (routed to another) and miss (unrouted); over negatives,
    false fire (routed at all). Rates are None when their group is empty."""
    routed = [p for p in positives if p.distance < threshold]
    hits = sum(p.nearest == p.expected for p in routed)
    counts = {"positives": len(positives), "hits": hits, "wrong_edit": len(routed) - hits,
              "misses": len(positives) - len(routed), "negatives": len(negatives),
              "false_fires": sum(d < threshold for d in negatives)}
    return {"threshold": threshold,
            "hit_rate": _rate(counts["hits"], len(positives)),
            "wrong_edit_rate": _rate(counts["wrong_edit"], len(positives)),
            "miss_rate": _rate(counts["misses"], len(positives)),
            "false_fire_rate": _rate(counts["false_fires"], len(negatives)),
            "counts": counts}


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def margin(positives: Sequence[Outcome], negatives: Sequence[float]) -> dict:
    """The smallest negative distance against the largest distance of a positive whose nearest
    key is its own edit: gap > 0 means a threshold in (max_positive_own, min_negative] routes
    all of them and no negative."""
    own = [p.distance for p in positives if p.nearest == p.expected]
    low_neg = min(negatives) if negatives else None
    high_pos = max(own) if own else None
    gap = None if low_neg is None or high_pos is None else low_neg - high_pos
    return {"min_negative": low_neg, "max_positive_own": high_pos, "gap": gap,
            "separable": None if gap is None else gap > 0}


def analyse(outcomes: Sequence[Outcome], current: float, keep: float) -> dict:
    """The calibration report (without per-probe rows) from each probe's nearest key."""
    positives = [o for o in outcomes if o.expected is not None]
    negatives = [o.distance for o in outcomes if o.expected is None]
    suggested = suggest_threshold(negatives, keep)
    return {
        "keep": keep,
        "num_positives": len(positives), "num_negatives": len(negatives),
        "suggested": summarize(positives, negatives, suggested),
        "current": summarize(positives, negatives, current),
        "distances": {
            "positive": quantiles([p.distance for p in positives]),
            "positive_own": quantiles([p.distance for p in positives
                                       if p.nearest == p.expected]),
            "negative": quantiles(negatives)},
        "margin": margin(positives, negatives),
    }


# --- with an engine -----------------------------------------------------------------------------
def nearest_outcomes(engine, probes: Sequence[Probe],
                     batch_size: int = BATCH_SIZE) -> list[Outcome]:
    """Each probe's nearest active key through `engine.nearest`, `batch_size` prompts at once."""
    missing = sorted({p.edit for p in probes if p.edit is not None} - set(engine.active))
    if missing:
        raise ProbeError(f"edit(s) {missing} named by probes are not routed by the engine "
                         "(revoked, or their artifact failed to load)")
    if not engine.active:
        raise ProbeError("the store has no active edit: there is no key to calibrate against")
    outcomes = []
    for start in range(0, len(probes), batch_size):
        chunk = probes[start:start + batch_size]
        routes = engine.nearest([p.prompt for p in chunk])
        outcomes += [Outcome(p.prompt, p.edit, r.edit_id, r.distance, r.key_form)
                     for p, r in zip(chunk, routes, strict=True)]
    return outcomes


def calibrate(engine, probes: Sequence[Probe], keep: float = 0.99) -> dict:
    """The full report for `engine`'s active edits and router: rates, distances, per-probe rows."""
    outcomes = nearest_outcomes(engine, probes)
    report = {"metric": engine.router.metric, "key_map": engine.router.key_map,
              "keys": engine.shape.describe_keys(), "active_edits": len(engine.active),
              **analyse(outcomes, engine.router.threshold, keep)}
    report["by_key_form"] = by_key_form(outcomes, engine.router.thresholds, keep)
    report["notes"] = _notes(report)
    report["files"] = None  # {"json": path, "png": path or None} once written (`write_outputs`)
    report["probes"] = [{"prompt": o.prompt, "expected": o.expected, "nearest": o.nearest,
                         "distance": o.distance, "key_form": o.key_form, "where": p.where}
                        for o, p in zip(outcomes, probes, strict=True)]
    return report


def by_key_form(outcomes: Sequence[Outcome], thresholds: dict[str, float],
                keep: float) -> dict | None:
    """The analysis of the probes nearest each key form's keys, against that form's configured
    threshold; None when every nearest key is raw (the whole report is then the raw one)."""
    forms = sorted({o.key_form for o in outcomes})
    if forms == ["raw"]:
        return None
    return {form: analyse([o for o in outcomes if o.key_form == form], thresholds[form], keep)
            for form in forms}


def _notes(report: dict) -> list[str]:
    notes = []
    if report["suggested"]["threshold"] <= 0:
        notes.append("the suggested threshold is 0: too many negatives sit exactly on a key, "
                     "so no positive threshold keeps the requested share unrouted")
    if report["keep"] < 1 and allowed_false_fires(report["num_negatives"], report["keep"]) == 0:
        notes.append(f"with {report['num_negatives']} negatives, keep={report['keep']} "
                     "allows no false fire: the threshold is the smallest negative distance")
    if report.get("by_key_form"):
        notes.append("the store holds chat-form keys, each routed under router.chat_threshold: "
                     "the rows per key form (by_key_form) measure each threshold on the probes "
                     "nearest that form's keys; the overall rows mix them")
    return notes


# --- output -------------------------------------------------------------------------------------
def write_outputs(report: dict, out_dir: str | Path) -> dict:
    """calibration.json and, when matplotlib imports, calibration.png under `out_dir`.
    -> {"json": path, "png": path or None}; a skipped plot adds a note to `report`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "calibration.json"), "png": None}
    try:
        files["png"] = str(plot(report, out / "calibration.png"))
    except ImportError:
        report["notes"].append("matplotlib is not installed: calibration.png was not written")
    report["files"] = files
    Path(files["json"]).write_text(json.dumps(report, indent=2) + "\n")
    return files


def plot(report: dict, path: Path) -> Path:
    """Histograms of positive and negative distances on a log axis, with the current and
    suggested thresholds; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["probes"]
    groups = {"positive": [r["distance"] for r in rows if r["expected"] is not None],
              "negative": [r["distance"] for r in rows if r["expected"] is None]}
    values = [d for g in groups.values() for d in g]
    nonzero = [d for d in values if d > 0]
    floor = min(nonzero) / 2 if nonzero else 1e-9  # a log axis: 0 is drawn at the floor
    top = max(values + [report["current"]["threshold"], report["suggested"]["threshold"]])
    bins = _log_bins(floor, max(top, floor * 10))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, color in (("positive", "tab:green"), ("negative", "tab:red")):
        if groups[name]:
            ax.hist([max(d, floor) for d in groups[name]], bins=bins, alpha=0.6, color=color,
                    label=f"{name} ({len(groups[name])})")
    for key, style in (("current", ":"), ("suggested", "--")):
        t = report[key]["threshold"]
        ax.axvline(max(t, floor), color="black", linestyle=style, label=f"{key} {t:.4g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"{report['metric']} distance to the nearest active key (0 drawn at {floor:.2g})")
    ax.set_ylabel("probes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_bins(low: float, high: float, count: int = 40) -> list[float]:
    step = (math.log10(high) - math.log10(low)) / count
    return [10 ** (math.log10(low) + i * step) for i in range(count + 1)]


def format_text(report: dict) -> str:
    """The human-readable summary."""
    lines = [f"{report['num_positives']} positive and {report['num_negatives']} negative probes "
             f"against {report['active_edits']} active edit(s), {report['metric']} distance",
             "distances      count " + " ".join(f"{n:>9}" for n, _ in QUANTILES)]
    for name, stats in report["distances"].items():
        cells = " ".join(f"{_num(stats[n]):>9}" for n, _ in QUANTILES)
        lines.append(f"  {name:<12} {stats['count']:>5} {cells}")
    m = report["margin"]
    lines.append(f"margin: min negative {_num(m['min_negative'])} - max positive (own edit) "
                 f"{_num(m['max_positive_own'])} = {_num(m['gap'])}"
                 + ("" if m["separable"] is None else
                    " (separable)" if m["separable"] else " (overlapping)"))
    lines.append(f"{'threshold':<22} {'hit':>8} {'wrong':>8} {'miss':>8} {'false-fire':>11}")
    for key in ("current", "suggested"):
        s = report[key]
        lines.append(f"  {key:<10} {_num(s['threshold']):>9} {_pct(s['hit_rate'])} "
                     f"{_pct(s['wrong_edit_rate'])} {_pct(s['miss_rate'])} "
                     f"{_pct(s['false_fire_rate']):>11}")
    router = {"threshold": report["suggested"]["threshold"]}
    for form, part in (report.get("by_key_form") or {}).items():
        for key in ("current", "suggested"):
            s = part[key]
            lines.append(f"  {form} keys, {key:<9} {_num(s['threshold']):>9} "
                         f"{_pct(s['hit_rate'])} {_pct(s['wrong_edit_rate'])} "
                         f"{_pct(s['miss_rate'])} {_pct(s['false_fire_rate']):>11}")
        name = "threshold" if form == "raw" else f"{form}_threshold"
        router[name] = part["suggested"]["threshold"]
    snippet = json.dumps({"router": router})
    lines.append(f"suggested: keeps >= {report['keep']:.2%} of negatives unrouted; "
                 f"to use it: --config with {snippet}")
    lines += [f"note: {n}" for n in report["notes"]]
    if report.get("files"):
        lines.append("wrote " + ", ".join(p for p in report["files"].values() if p))
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.1%}"
