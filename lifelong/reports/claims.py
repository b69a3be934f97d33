"""Each paper's claimed ordering checked against a benchmark table (issue 22 item 5).

The claims are the orderings ../shared/spec/METHODS.md quotes from each paper's result
tables, written as pairwise relations between registered models (or config names):
``a > b`` (a's metric above b's) and ``a ≈ b`` (the paper calls them equal). Used by
``lifelong bench accuracy`` (:mod:`lifelong.bench.accuracy`); not a report command.

**Noise** (how "within noise" is decided). Per model the table has the mean and the
sample standard deviation (ddof = 1) of the metric over n seeds. The noise margin of a
difference of two means is two standard errors of that difference::

    margin = 2 * sqrt(std_a**2 / n_a + std_b**2 / n_b)

(about a 95% interval for normal noise; with 3 seeds a t-interval would be wider:
this is a rule of thumb, not a significance test). Then for ``a > b`` with
``diff = mean_a - mean_b``:

* ``diff > margin``: **holds**; ``diff < -margin``: **does not hold**;
  otherwise **within noise**;

and for ``a ≈ b``: ``|diff| <= margin``: **holds** (the table cannot tell them apart),
else **does not hold**. A relation whose model is missing from the table, or has fewer
than 2 seeds (no estimate of its noise), is **untested**.

A claim (several relations) **does not hold** when any tested relation does not hold,
**holds** when every tested relation holds, is **within noise** otherwise, and is
**untested** when no relation could be tested; the untested relations are listed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

HOLDS, FAILS, NOISE, UNTESTED = "holds", "does not hold", "within noise", "untested"
GREATER, SIMILAR = ">", "≈"
#: how many standard errors of the difference count as noise
NOISE_SE = 2.0


@dataclasses.dataclass(frozen=True)
class Relation:
    a: str
    op: str          # GREATER or SIMILAR
    b: str

    def __post_init__(self):
        if self.op not in (GREATER, SIMILAR):
            raise ValueError(f"op must be {GREATER!r} or {SIMILAR!r}, got {self.op!r}")

    def __str__(self):
        return f"{self.a} {self.op} {self.b}"


@dataclasses.dataclass(frozen=True)
class Claim:
    paper: str
    source: str                      # METHODS.md section and the paper's table
    text: str                        # the claim in words
    relations: Tuple[Relation, ...]
    metric: str = "auc"


def _gt(*pairs: Tuple[str, str]) -> Tuple[Relation, ...]:
    return tuple(Relation(a, GREATER, b) for a, b in pairs)


def _chain(*models: str) -> Tuple[Relation, ...]:
    """``a > b > c`` as the adjacent pairs ``a > b``, ``b > c``."""
    return _gt(*zip(models[:-1], models[1:]))


_TWO_STAGE = ("sim_hard", "sim_soft", "eta", "sdim", "twin")

#: METHODS.md's expected orderings, as registered model names. A claim about a model
#: the table lacks is reported untested, never dropped silently.
CLAIMS: Tuple[Claim, ...] = (
    Claim("C-Former", "METHODS 2.1, Table 3",
          "lifelong (C-Former > TWIN V2) > long (SIM soft, TWIN, ETA) > short (DIN)",
          _gt(("cformer", "twin_v2"),
              *[(x, y) for x in ("cformer", "twin_v2") for y in ("sim_soft", "twin", "eta")],
              *[(y, "din") for y in ("sim_soft", "twin", "eta")])),
    Claim("C-Former", "METHODS 2.1, Table 4 (ablations)",
          "the full model above w/o denoise, w/o reconstruction loss, w/o orthogonality loss",
          _gt(("cformer", "cformer_wo_denoise"), ("cformer", "cformer_wo_recon"),
              ("cformer", "cformer_wo_orth"))),
    Claim("ENCODE", "METHODS 2.2, Table 2",
          "ENCODE ≈ DIN-L (the upper bound), above every search/sampling baseline",
          (Relation("encode", SIMILAR, "din_l"),
           *_gt(*[("encode", y) for y in ("sim_hard", "eta", "twin", "sdim")]))),
    Claim("ENCODE", "METHODS 2.2, ablations (metric loss)",
          "dynamic-margin triplet loss above no metric loss and above a fixed margin",
          _gt(("encode", "encode_no_loss"), ("encode", "encode_fixed_margin"))),
    Claim("LREA", "METHODS 2.3, Table 2",
          "LREA ≈ DIN-L, above every two-stage method; DIN-L above DIN (short only)",
          (Relation("lrea", SIMILAR, "din_l"),
           *_gt(*[("lrea", y) for y in _TWO_STAGE]), *_gt(("din_l", "din")))),
    Claim("TWIN V2", "METHODS 2.4, Table 3",
          "TWIN V2 > TWIN > SIM soft > SDIM > ETA > SIM hard > DIN > Avg-Pooling",
          _chain("twin_v2", "twin", "sim_soft", "sdim", "eta", "sim_hard", "din", "avg_pool")),
    Claim("TWIN V2", "METHODS 2.4, Fig. 4 (ablations)",
          "removing ln n from the GSU or from the ESU lowers AUC",
          _gt(("twin_v2", "twin_v2_no_ln_gsu"), ("twin_v2", "twin_v2_no_ln_esu"))),
    Claim("LCN", "METHODS 2.5, Table 4 (single domain, no CRP)",
          "LCN > TWIN > SIM soft > ETA > SDIM",
          _chain("lcn", "twin", "sim_soft", "eta", "sdim")),
    Claim("LCN", "METHODS 2.5, Table 3 (LAP sizes; the paper's rows are with CRP)",
          "LCN-200-50 above 'K1 = 50 only'; 'K2 = 50 only' ≈ LCN-200-50",
          (*_gt(("lcn", "lcn_k1_only")), Relation("lcn_k2_only", SIMILAR, "lcn"))),
    Claim("search baselines", "METHODS 3 (as ENCODE T2, LREA T2, C-Former T3, TWIN V2 T3 "
          "report them)",
          "DIN-L above every search baseline; SIM soft > SIM hard; every search baseline "
          "above DIN (short only)",
          _gt(*[("din_l", y) for y in ("sim_hard", "sim_soft", "eta", "sdim")],
              ("sim_soft", "sim_hard"),
              *[(y, "din") for y in ("sim_hard", "sim_soft", "eta", "sdim")])),
)


# ---- the verdicts ------------------------------------------------------------------------------
def noise_margin(std_a: float, n_a: int, std_b: float, n_b: int,
                 k: float = NOISE_SE) -> Optional[float]:
    """``k`` standard errors of the difference of two means; None with fewer than 2 seeds
    on either side (one seed says nothing about the noise)."""
    if n_a < 2 or n_b < 2:
        return None
    return k * math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)


def relation_verdict(rel: Relation, stats: Mapping[str, Mapping]) -> Dict:
    """``{"relation", "verdict", "diff", "margin", "why"}`` of one relation; ``stats``
    maps a model to ``{"mean", "std", "n"}`` (mean None: the metric is undefined)."""
    out = {"relation": str(rel), "diff": None, "margin": None}
    missing = [m for m in (rel.a, rel.b)
               if m not in stats or stats[m].get("mean") is None]
    if missing:
        return {**out, "verdict": UNTESTED, "missing": missing,
                "why": f"not in the table: {', '.join(missing)}"}
    a, b = stats[rel.a], stats[rel.b]
    diff = float(a["mean"]) - float(b["mean"])
    margin = noise_margin(float(a.get("std") or 0.0), int(a["n"]),
                          float(b.get("std") or 0.0), int(b["n"]))
    out["diff"] = diff
    if margin is None:
        return {**out, "verdict": UNTESTED, "why": "fewer than 2 seeds: no noise estimate"}
    out["margin"] = margin
    if rel.op == SIMILAR:
        verdict = HOLDS if abs(diff) <= margin else FAILS
    elif diff > margin:
        verdict = HOLDS
    elif diff < -margin:
        verdict = FAILS
    else:
        verdict = NOISE
    return {**out, "verdict": verdict, "why": f"diff {diff:+.4f}, noise ±{margin:.4f}"}


def combine(verdicts: Sequence[str]) -> str:
    """One claim's verdict from its relations' (see the module doc)."""
    tested = [v for v in verdicts if v != UNTESTED]
    if not tested:
        return UNTESTED
    if FAILS in tested:
        return FAILS
    if all(v == HOLDS for v in tested):
        return HOLDS
    return NOISE


def check_claim(claim: Claim, stats: Mapping[str, Mapping]) -> Dict:
    rels = [relation_verdict(r, stats) for r in claim.relations]
    return {"paper": claim.paper, "source": claim.source, "claim": claim.text,
            "metric": claim.metric, "verdict": combine([r["verdict"] for r in rels]),
            "relations": rels}


def stats_from_summary(summary: Mapping[str, Mapping], metric: str = "auc"
                       ) -> Dict[str, Dict]:
    """``{model: {"mean", "std", "n"}}`` from :func:`lifelong.compare.summarize`'s output
    (n = the seeds where the metric is defined)."""
    out = {}
    for model, agg in summary.items():
        m = agg.get(metric) or {}
        n = m.get("seeds_defined", len(agg.get("seeds") or []))
        out[model] = {"mean": m.get("mean"), "std": m.get("std"), "n": int(n)}
    return out


def check_all(summary: Mapping[str, Mapping], claims: Sequence[Claim] = CLAIMS) -> List[Dict]:
    return [check_claim(c, stats_from_summary(summary, c.metric)) for c in claims]


def format_claims(results: Sequence[Dict]) -> str:
    """Markdown: one row per claim with its verdict (and how many of its relations could
    be tested), each tested relation's numbers, then the untested ones and why."""
    lines = ["| paper | claim (source) | verdict | tested relations (diff of the means, "
             "noise) | untested |", "|---|---|---|---|---|"]
    for r in results:
        tested = [x for x in r["relations"] if x["verdict"] != UNTESTED]
        untested = [x for x in r["relations"] if x["verdict"] == UNTESTED]
        cell = "; ".join(f"{x['relation']}: {x['verdict']} ({x['why']})" for x in tested)
        why: Dict[str, List[str]] = {}
        absent: List[str] = []
        for x in untested:
            key = "not in the table" if x.get("missing") else x["why"]
            why.setdefault(key, []).append(x["relation"])
            absent += [m for m in x.get("missing") or () if m not in absent]
        skipped = "; ".join(
            f"{', '.join(rels)} ({w}{': ' + ', '.join(absent) if w == 'not in the table' else ''})"
            for w, rels in why.items())
        lines.append(f"| {r['paper']} | {r['claim']} ({r['source']}) | **{r['verdict']}** "
                     f"({len(tested)} of {len(r['relations'])} tested) | {cell or '-'} | "
                     f"{skipped or '-'} |")
    lines += ["", f"Noise: a relation a > b holds when the difference of the mean "
              f"{', '.join(sorted({r['metric'].upper() for r in results}))} over seeds exceeds "
              f"{NOISE_SE:g} standard errors of that difference, "
              "sqrt(std_a²/n_a + std_b²/n_b) with the sample std over seeds; it does not hold "
              "when it is below minus that margin, and is within noise in between. a ≈ b "
              "holds when the difference is within the margin. With fewer than 2 seeds a "
              "relation is untested (lifelong/reports/claims.py)."]
    return "\n".join(lines)
