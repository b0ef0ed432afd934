"""The paper's claims as families of paired comparisons (:mod:`experiments.paired_stats`).

Each value is a run's test mAP in points (``100 * record[config.stats.metric]``); the arms of a
comparison are paired by the student's seed. Four families, each Holm-adjusted on its own:

* ``kd`` - "distillation improves every student-teacher pair": ``KD - scratch`` per pair;
* ``teacher_size`` - "larger teachers give larger gains": per student, ``KD from the larger -
  KD from the next smaller teacher`` (the scratch baseline cancels in the difference of the gains);
* ``largest`` - "the largest model is still the most accurate": ``largest teacher - KD student`` per
  pair. The teacher is one run (seed-shared), so the test is a one-sample test of the students'
  seeds against its fixed mAP: it says whether *this* teacher beats the students, not whether the
  teacher's training is reliably better;
* ``ablation`` - "each part helps": on the ablation pair, ``<part> only - scratch`` per part, and
  ``all parts - scratch``.

A verdict ``better`` agrees with the claim, ``worse`` disagrees, ``equivalent`` (within
``config.stats.margin`` mAP points by TOST) is reported as such, ``inconclusive`` neither.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from experiments import paired_stats
from experiments.detection_kd.grid import larger, pairs

ANSWERS = {"better": "agree", "worse": "disagree", "equivalent": "equivalent",
           "inconclusive": "inconclusive"}
FAMILIES = {
    "kd": "Distillation improves every student-teacher pair",
    "teacher_size": "Larger teachers give larger gains",
    "largest": "The largest model is still the most accurate",
    "ablation": "Each distillation part helps on its own (and all together)",
}


def value(record: Mapping, metric: str) -> float:
    """A run's mAP in points."""
    return 100.0 * float(record[metric])


def by_arm(records: Sequence[Mapping], metric: str) -> dict[tuple[str, str], dict[int, float]]:
    """``(size, arm) -> {seed: mAP points}`` of the finished runs."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        if not r.get("preempted"):
            out.setdefault((r["size"], r["arm"]), {})[int(r["seed"])] = value(r, metric)
    return out


def _series(table, size: str, arm: str, seeds: Sequence[int]) -> list[float]:
    return [table[(size, arm)][s] for s in seeds]


def comparisons(config, records: Sequence[Mapping], seeds: Sequence[int]) -> dict[str, list[dict]]:
    """Every family's comparisons (``Comparison.to_dict()`` plus ``answer``), Holm within a family."""
    from kdjax.detection.distill import PARTS
    from kdjax.detection.model import SIZES

    g, table = config.grid, by_arm(records, config.stats.metric)
    fams: dict[str, dict[str, tuple]] = {k: {} for k in FAMILIES}
    names: dict[str, tuple[str, str]] = {}
    largest = max(g.teachers, key=list(SIZES).index)
    (teacher_value,) = table[(largest, "teacher")].values()  # one run, seed-shared
    for s, t in pairs(config):
        kd = _series(table, s, f"kd_{t}", seeds)
        name = f"{s} <- {t}: KD - scratch"
        fams["kd"][name] = (_series(table, s, "scratch", seeds), kd)
        names[name] = (f"{s} scratch", f"{s} <- {t}")
        name = f"{largest} teacher - {s} <- {t}"
        fams["largest"][name] = (kd, [teacher_value] * len(seeds))
        names[name] = (f"{s} <- {t}", f"{largest} teacher")
    for s in g.students:
        ts = sorted((t for t in g.teachers if larger(t, s)), key=list(SIZES).index)
        for a, b in zip(ts, ts[1:]):
            name = f"{s}: KD from {b} - KD from {a}"
            fams["teacher_size"][name] = (_series(table, s, f"kd_{a}", seeds),
                                          _series(table, s, f"kd_{b}", seeds))
            names[name] = (f"{s} <- {a}", f"{s} <- {b}")
    s, t = g.ablation_student, g.ablation_teacher
    scratch = _series(table, s, "scratch", seeds)
    for part in g.ablation_parts:
        name = f"{s} <- {t}: {part} only - scratch"
        fams["ablation"][name] = (scratch, _series(table, s, f"kd_{t}_{part}", seeds))
        names[name] = (f"{s} scratch", f"{s} <- {t}, {part} only")
    name = f"{s} <- {t}: all ({'+'.join(PARTS)}) - scratch"
    fams["ablation"][name] = (scratch, _series(table, s, f"kd_{t}", seeds))
    names[name] = (f"{s} scratch", f"{s} <- {t}")
    out = {}
    for fam, comps in fams.items():
        if not comps:
            out[fam] = []
            continue
        done = paired_stats.compare_family(comps, margin=float(config.stats.margin),
                                           names={k: names[k] for k in comps})
        out[fam] = [{**c.to_dict(), "answer": ANSWERS[c.verdict]} for c in done]
    return out


def overall(answers: Sequence[str]) -> str:
    """A family's answer: ``agree`` when every comparison agrees, ``disagree`` when any disagrees,
    ``equivalent`` when all are equivalent, else ``inconclusive`` (``mixed`` counts shown beside)."""
    if not answers:
        return "-"
    if all(a == "agree" for a in answers):
        return "agree"
    if any(a == "disagree" for a in answers):
        return "disagree"
    if all(a == "equivalent" for a in answers):
        return "equivalent"
    return "inconclusive"
