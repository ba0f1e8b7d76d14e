"""Edit-quality report: markdown tables and plots from the evaluation harness's report dict.

Metrics follow SoLA ("Reversible Lifelong Model Editing via Semantic Routing-Based LoRA",
arXiv 2603.11239) and WISE's lifelong-editing convention: reliability, generality and locality
measured after the T-th edit over every edit made so far, averaged as (Rel. + Gen. + Loc.) / 3
on teacher-forced values. SoLA's reversibility claim is measured by the rollback block, the
router by the routing block. Any metric may be null (not measured for that method or engine);
it is rendered as "–".

    report = json.loads(Path("report.json").read_text())
    write_outputs(report, "out/")  # report.json, report.md, retention.png, distances.png
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["comparison_table", "plot_distances", "plot_retention", "render_markdown",
           "write_outputs"]

DASH = "–"
METRIC_HEADER = ["Rel. (TF / EM)", "Gen. (TF / EM)", "Loc.", "Avg.", "n"]
MISSING_MPL = "plots need matplotlib: pip install 'sola-vllm[eval]'"
RETENTION_PANELS = (("reliability_em", "Reliability (EM)"), ("generality_em", "Generality (EM)"),
                    ("locality", "Locality"))
DISTANCE_GROUPS = (("hit", "edit prompt"), ("paraphrase", "paraphrase"),
                   ("negative", "unrelated"))
DISTANCE_FLOOR = 1e-12  # the lowest value a zero distance is clamped to on a log axis

DEFINITIONS = """\
Every metric at checkpoint **T** is measured after the T-th edit, over the test edits among the
first T (n), with all T edits active; decoding is greedy.

- **Reliability (Rel.)**: the edited prompt yields the new answer. **TF** (teacher-forced): the
  share of the target's tokens that the model predicts as its argmax when fed the target's
  preceding tokens. **EM** (exact match): the share of edits whose greedy continuation starts
  with exactly the target's tokens.
- **Generality (Gen.)**: the same two measures on a paraphrase of the edited prompt, which is
  never stored as a key.
- **Locality (Loc.)**: the share of unrelated prompts whose greedy output is token-identical to
  the base model's.
- **Avg.**: the mean of Rel. TF, Gen. TF and Loc. (WISE's convention; EM stands in where TF was
  not measured).
- **Retention**: reliability of all earlier edits measured after the T-th edit; read along T,
  it shows whether later edits erode earlier ones.
- **Rollback**: after the T-th edit a random half of the edits is revoked. **Revoked exact**:
  the share of revoked edits' prompts whose output is token-identical to the base model's.
  **→ sibling**: the share that routes, once revoked, to a kept edit of the same subject (in
  zsRE, another record asking the same question with its own answer, which rightly answers
  it). **→ other kept**: the share that routes to a kept edit of another subject or relation
  (a false fire of that edit). **→ revoked**: the share that still routes to a revoked edit (a
  rollback bug: must be 0). **Exact, not to a sibling**: revoked exact over the prompts that do
  not route to a sibling.
  **Kept rel. EM**: reliability (EM) of the edits still active, before → after the revocation.
  **Loc.**: locality before → after.
- **Routing**: **prompt hit** / **paraphrase hit**: the share of edit prompts / paraphrases
  routed to their own edit. **False fire**: the share of unrelated prompts routed to any edit.
  **Hard false fire**: the share of not-yet-edited prompts of the same benchmark (the same
  kind of question about subjects not edited yet: the later edits' prompts, up to 500) routed
  to any edit; "–" once every record is edited.
  **Threshold** and **metric**: the router's distance cut-off and distance function.
- **Conflict ceiling**: the best generality any router can reach when records of one subject
  ask the same question with different answers (per subject, the share of its most common
  answer).
"""


def fmt(value, digits: int = 3) -> str:
    """A metric cell: 3 decimals, "–" for null or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pair(a, b) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def _arrow(before, after) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def _cell(text) -> str:
    """Escape what would break a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_num(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def average(cp: dict) -> float | None:
    """WISE's Avg.: mean of Rel. TF, Gen. TF and Loc.; EM where TF is null; null if any is."""
    rel = cp.get("reliability_tf")
    gen = cp.get("generality_tf")
    rel = rel if _is_num(rel) else cp.get("reliability_em")
    gen = gen if _is_num(gen) else cp.get("generality_em")
    parts = [rel, gen, cp.get("locality")]
    return sum(parts) / 3 if all(_is_num(p) for p in parts) else None


def _table(header: list[str], rows: list[list[str]], text_cols: int = 1,
           text_tail: int = 0) -> str:
    """A markdown table; the first `text_cols` and last `text_tail` columns left-aligned (text),
    the rest right-aligned (numbers)."""
    n = len(header)
    align = [":---" if i < text_cols or i >= n - text_tail else "---:" for i in range(n)]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines)


def checkpoint_ts(report: dict) -> list[int]:
    """Every checkpoint T present in any method, ascending."""
    return sorted({cp["T"] for m in report.get("methods", []) for cp in m.get("checkpoints") or []})


def _checkpoint(method: dict, T: int) -> dict | None:
    return next((cp for cp in method.get("checkpoints") or [] if cp["T"] == T), None)


def _metric_cells(cp: dict | None) -> list[str]:
    """Rel. (TF / EM) | Gen. (TF / EM) | Loc. | Avg. | n for one checkpoint."""
    if cp is None:
        return [_pair(None, None), _pair(None, None), DASH, DASH, DASH]
    return [_pair(cp.get("reliability_tf"), cp.get("reliability_em")),
            _pair(cp.get("generality_tf"), cp.get("generality_em")),
            fmt(cp.get("locality")), fmt(average(cp)), fmt(cp.get("n_eval"))]


def comparison_table(report: dict, T: int | None = None) -> str:
    """One row per method at checkpoint T (default: the largest T present)."""
    ts = checkpoint_ts(report)
    if not ts:
        raise ValueError("the report has no checkpoints")
    T = ts[-1] if T is None else T
    if T not in ts:
        raise ValueError(f"no checkpoint T={T} in the report (it has {ts})")
    rows = [[m["name"], *_metric_cells(_checkpoint(m, T))] for m in report["methods"]]
    return _table(["Method", *METRIC_HEADER], rows)


def results_table(report: dict) -> str:
    """Every checkpoint of every method, grouped by T ascending, methods in report order."""
    rows = [[str(T), m["name"], *_metric_cells(cp)]
            for T in checkpoint_ts(report) for m in report["methods"]
            if (cp := _checkpoint(m, T)) is not None]
    return _table(["T", "Method", *METRIC_HEADER], rows, text_cols=2)


def retention_table(report: dict) -> str:
    """Rows method x metric, one column per T: how each metric holds up as edits accumulate."""
    ts = checkpoint_ts(report)
    rows = []
    for m in report["methods"]:
        cps = [_checkpoint(m, T) or {} for T in ts]
        rows.append([m["name"], "Rel. (TF / EM)",
                     *[_pair(c.get("reliability_tf"), c.get("reliability_em")) for c in cps]])
        rows.append(["", "Gen. (TF / EM)",
                     *[_pair(c.get("generality_tf"), c.get("generality_em")) for c in cps]])
        rows.append(["", "Loc.", *[fmt(c.get("locality")) for c in cps]])
    return _table(["Method", "Metric", *[f"T={T}" for T in ts]], rows, text_cols=2)


def rollback_table(report: dict) -> str | None:
    """One row per method with a rollback block; None when no method has one."""
    rows = [[m["name"], fmt(rb.get("T")), fmt(rb.get("revoked")), fmt(rb.get("revoked_exact")),
             *[fmt((rb.get("revoked_routes") or {}).get(w))
               for w in ("kept_sibling", "kept_other", "revoked")],
             fmt(rb.get("revoked_exact_unshadowed")), fmt(rb.get("kept")),
             _arrow(rb.get("kept_reliability_em_before"), rb.get("kept_reliability_em")),
             _arrow(rb.get("locality_before"), rb.get("locality"))]
            for m in report["methods"] if (rb := m.get("rollback"))]
    header = ["Method", "T", "Revoked", "Revoked exact", "→ sibling", "→ other kept",
              "→ revoked", "Exact, not to a sibling", "Kept", "Kept rel. EM (before → after)",
              "Loc. (before → after)"]
    return _table(header, rows) if rows else None


def routing_table(report: dict) -> str | None:
    """One row per method and checkpoint with routing numbers; None when there are none."""
    rows = []
    for T in checkpoint_ts(report):
        for m in report["methods"]:
            cp = _checkpoint(m, T)
            if not cp or not cp.get("routing"):
                continue
            r, router = cp["routing"], m.get("router") or {}
            threshold = router.get("threshold")
            rows.append([str(T), m["name"], fmt(r.get("prompt_hit")), fmt(r.get("paraphrase_hit")),
                         fmt(r.get("false_fire")), fmt(r.get("hard_false_fire")),
                         f"{threshold:.4g}" if _is_num(threshold) else DASH,
                         router.get("metric") or DASH, router.get("keys") or DASH])
    header = ["T", "Method", "Prompt hit", "Paraphrase hit", "False fire", "Hard false fire",
              "Threshold", "Metric", "Keys"]
    return _table(header, rows, text_cols=2, text_tail=2) if rows else None


def calibration_notes(report: dict) -> list[str]:
    """One sentence per method whose threshold was calibrated on its store
    (`eval --threshold-keep`): what it read and what it kept unrouted."""
    notes = []
    for m in report["methods"]:
        c = (m.get("router") or {}).get("calibration")
        if not c:
            continue
        groups = ", ".join(f"{n} {name} ({fmt(c['routed'].get(name))} routed)"
                           for name, n in c["negatives"].items() if n)
        notes.append(f"{m['name']}: threshold {c['threshold']:.4g} calibrated on its store "
                     f"({c['keys']} keys of the reported split) so that {c['keep']} of each "
                     f"group of the {c['split']} split's negatives stays unrouted: {groups}. "
                     "No reported record's paraphrase or locality prompt was read for it.")
    return notes


def meta_block(report: dict) -> str:
    """A short bullet list: what was evaluated, on what, by which command."""
    meta = report.get("meta", {})
    g = meta.get
    lines = [
        f"- **data**: {g('data', DASH)}, split {g('split', DASH)}, view {g('view', DASH)}"
        + (", every prompt sent as a chat message" if g("prompt_form") == "chat" else "")
        + (f" (`{g('data_path')}`)" if g("data_path") else ""),
        f"- **engine**: {g('engine', DASH)}; **model**: {g('model', DASH)}"
        + (f" (fingerprint `{g('model_fingerprint')}`)" if g("model_fingerprint") else ""),
        f"- **edits**: {fmt(g('edits'))}; checkpoints "
        + ", ".join(str(t) for t in g("checkpoints") or checkpoint_ts(report))
        + (" (quick run)" if g("quick") else ""),
    ]
    if _is_num(g("conflict_ceiling")):
        lines.append(f"- **conflict ceiling**: {fmt(g('conflict_ceiling'))}")
    lines.append(f"- **machine**: {g('machine', DASH)}")
    if g("versions"):
        lines.append("- **versions**: " + ", ".join(f"{k} {v}" for k, v in g("versions").items()))
    lines.append(f"- **command**: `{g('command', DASH)}`")
    seconds = g("seconds")
    took = f"{seconds:.1f} s" if _is_num(seconds) else DASH
    lines.append(f"- **took**: {took}" + (f"; created {g('created')}" if g("created") else ""))
    for extra in g("merged") or []:
        lines.append(f"- **{', '.join(extra['methods']) or 'nothing'}** from `{extra['from']}` "
                     f"(checkpoints {', '.join(str(t) for t in extra['checkpoints'] or [])}): "
                     f"`{extra.get('command') or DASH}`")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The full report: meta, results per T, rollback, routing and metric definitions."""
    meta = report.get("meta", {})
    title = f"# Edit quality: {meta.get('data', DASH)} ({meta.get('split', DASH)} split)"
    parts = [title, meta_block(report), "## Results", results_table(report)]
    if (rollback := rollback_table(report)) is not None:
        parts += ["## Rollback", rollback]
    if (routing := routing_table(report)) is not None:
        parts += ["## Routing", routing, *calibration_notes(report)]
    parts += ["## Definitions", DEFINITIONS.rstrip()]
    return "\n\n".join(parts) + "\n"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported only when a plot is drawn."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(MISSING_MPL) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_title(report: dict) -> str:
    meta = report.get("meta", {})
    return f"{meta.get('data', '?')} ({meta.get('split', '?')}) · {meta.get('model', '?')}"


def plot_retention(report: dict, path) -> None:
    """Reliability EM, generality EM and locality against T (log x), one line per method."""
    plt = _pyplot()
    ts = checkpoint_ts(report)
    fig, axes = plt.subplots(1, len(RETENTION_PANELS), figsize=(13, 4), sharey=True)
    for ax, (key, label) in zip(axes, RETENTION_PANELS, strict=True):
        for i, m in enumerate(report["methods"]):
            cps = sorted(m.get("checkpoints") or [], key=lambda c: c["T"])
            points = [(cp["T"], cp[key]) for cp in cps if _is_num(cp.get(key))]
            if points:  # a fixed colour per method, even where another method has no points
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=m["name"])
        ax.set_xscale("log")
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("T (edits made)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles = {}  # every method once, even one drawn only in a later panel
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    names = [m["name"] for m in report["methods"] if m["name"] in handles]
    if names:
        axes[0].legend([handles[n] for n in names], names, loc="best", fontsize="small")
    fig.suptitle(_plot_title(report))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _with_distances(report: dict) -> list[dict]:
    return [m for m in report["methods"]
            if m.get("distances") and any(m["distances"].get(k) for k, _ in DISTANCE_GROUPS)]


def _bins(groups: dict[str, list[float]], count: int = 40):
    """(groups, bins, log_x). Log-spaced bins when the positive values span more than 2 decades;
    then zeros (an exact key match) are clamped to half the smallest positive value, so they land
    in the first bin instead of vanishing from a log axis."""
    import numpy as np

    values = [v for vs in groups.values() for v in vs]
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        floor = max(min(positive) / 2, DISTANCE_FLOOR)
        groups = {k: [max(v, floor) for v in vs] for k, vs in groups.items()}
        return groups, np.geomspace(floor, max(positive), count + 1), True
    low, high = min(values), max(values)
    return groups, np.linspace(low, max(high, low + 1e-9), count + 1), False


def _draw_distances(ax, method: dict) -> None:
    """Histograms of one method's distance groups (shares of each group) and its threshold."""
    groups, bins, log_x = _bins({k: v for k, v in method["distances"].items() if v})
    for key, label in DISTANCE_GROUPS:
        if key in groups:
            vs = groups[key]
            ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, weights=[1 / len(vs)] * len(vs),
                    label=f"{label} (n={len(vs)})")
    threshold = (method.get("router") or {}).get("threshold")
    if _is_num(threshold):
        x = max(threshold, bins[0]) if log_x else threshold
        ax.axvline(x, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
    if log_x:
        ax.set_xscale("log")
    metric = (method.get("router") or {}).get("metric") or "distance"
    ax.set_xlabel(f"{metric} to the nearest key")
    ax.set_ylabel("share of group")
    ax.set_title(method["name"])
    ax.legend(fontsize="small")


def plot_distances(report: dict, path) -> None:
    """Per method with distances: histograms of hit / paraphrase / negative nearest-key
    distances and the router's threshold. Writes nothing when no method has distances."""
    methods = _with_distances(report)
    if not methods:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        _draw_distances(ax, m)
    fig.suptitle(_plot_title(report))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _atomic(path: Path, write: Callable[[str], None]) -> bool:
    """Run `write(tmp)` on a temp file beside `path`, then os.replace it into place. Returns
    False (and leaves no file) when `write` wrote nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        if os.path.getsize(tmp) == 0:
            os.unlink(tmp)
            return False
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are meant to be read by others
        os.replace(tmp, path)
        return True
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write text (UTF-8) through a temp file and os.replace, so readers never see half."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_outputs(report: dict, out_dir) -> dict[str, str]:
    """report.json, report.md, retention.png and (if any method has distances) distances.png in
    `out_dir` (created). Returns {"json"|"markdown"|"retention"|"distances": path}. A stale
    distances.png from an earlier report is removed when this one has no distances."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "report.json", "markdown": out / "report.md",
               "retention": out / "retention.png", "distances": out / "distances.png"}
    write_text_atomic(written["json"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(written["markdown"], render_markdown(report))
    _atomic(written["retention"], lambda tmp: plot_retention(report, tmp))
    if not _atomic(written["distances"], lambda tmp: plot_distances(report, tmp)):
        written.pop("distances").unlink(missing_ok=True)
    return {kind: str(p) for kind, p in written.items()}
