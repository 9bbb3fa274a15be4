"""Caption metrics as the COCO caption evaluation computes them: BLEU-1…4, ROUGE-L, CIDEr-D.

Written from the definitions (Papineni et al. 2002; Lin 2004; Vedantam et al. 2015) with the
choices of the coco-caption code, so the figures are comparable with published ones: corpus-level
BLEU with the closest reference length and its 1e-9 / 1e-15 smoothing; ROUGE-L with β = 1.2 on
the best precision and best recall over references; CIDEr-D with document frequencies from the
evaluated references, clipped hypothesis weights, a Gaussian length penalty (σ = 6) and ×10.
Inputs are token lists, or raw caption strings that `tokenize` splits as the COCO scorer does
(`mmtune.caption_tokenize`: its PTB tokenisation and punctuation removal, in pure Python), so
scores on raw captions equal pycocoevalcap's. METEOR needs Java and the pycocoevalcap jar:
`meteor()` returns None when either is missing.
"""

from __future__ import annotations

import math
from collections import Counter

from mmtune.caption_tokenize import tokenize

__all__ = ["bleu", "caption_metrics", "cider_d", "meteor", "rouge_l", "tokenize"]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _as_tokens(x) -> list[str]:
    return tokenize(x) if isinstance(x, str) else list(x)


def bleu(hyps: list, refs: list[list], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1…max_n: clipped n-gram counts summed over the corpus, brevity penalty from
    the summed closest reference lengths (ties → the shorter reference)."""
    small, tiny = 1e-9, 1e-15  # coco-caption's guards: no zero division, 0 matches → ~0
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        h = _as_tokens(hyp)
        rs = [_as_tokens(r) for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(h, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)  # per n-gram, the most any one reference holds
            correct[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            guess[n - 1] += max(0, len(h) - n + 1)
    scores, prod = [], 1.0
    for n in range(max_n):
        prod *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(prod ** (1.0 / (n + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: list, refs: list[list], beta: float = 1.2) -> float:
    """Mean over captions of the LCS F-measure (β = 1.2) of the best precision and best recall."""
    total = 0.0
    for hyp, rs in zip(hyps, refs, strict=True):
        h = _as_tokens(hyp)
        precs, recs = [], []
        for r in rs:
            r = _as_tokens(r)
            lcs = _lcs(r, h)
            precs.append(lcs / len(h) if h else 0.0)
            recs.append(lcs / len(r) if r else 0.0)
        p, r = max(precs), max(recs)
        if p and r:
            total += (1 + beta**2) * p * r / (r + beta**2 * p)
    return total / max(1, len(hyps))


def _tfidf(tokens: list[str], df: Counter, log_n: float, max_n: int):
    """Per n: {ngram: tf · idf}, the vector norm, and the token count (for the length penalty)."""
    vecs, norms = [], []
    for n in range(1, max_n + 1):
        v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(tokens, n).items()}
        vecs.append(v)
        norms.append(math.sqrt(sum(x * x for x in v.values())))
    return vecs, norms, len(tokens)


def cider_d(hyps: list, refs: list[list], max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: mean over captions of 10 × the mean over references and n of the clipped tf-idf
    cosine, times exp(−Δlen² / 2σ²); document frequencies come from these references."""
    refs = [[_as_tokens(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(refs)))
    total = 0.0
    for hyp, rs in zip(hyps, refs, strict=True):
        hv, hn, hl = _tfidf(_as_tokens(hyp), df, log_n, max_n)
        score = 0.0
        for r in rs:
            rv, rn, rl = _tfidf(r, df, log_n, max_n)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                val = sum(min(w, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, w in hv[n].items())
                if hn[n] and rn[n]:
                    val /= hn[n] * rn[n]
                score += val * penalty
        total += score / max_n / len(rs) * 10.0
    return total / max(1, len(hyps))


def meteor(hyps: list, refs: list[list]) -> float | None:
    """METEOR 1.5 through pycocoevalcap's jar; None without Java or pycocoevalcap."""
    import shutil

    if shutil.which("java") is None:
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    gts = {i: [" ".join(_as_tokens(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(_as_tokens(h))] for i, h in enumerate(hyps)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:  # the scorer keeps a Java process open and has no close()
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def caption_metrics(hyps: list, refs: list[list], with_meteor: bool = False) -> dict[str, float]:
    """{bleu1…bleu4, rouge_l, cider} (and meteor when asked and available)."""
    hyps = [_as_tokens(h) for h in hyps]
    refs = [[_as_tokens(r) for r in rs] for rs in refs]
    out = {f"bleu{n + 1}": s for n, s in enumerate(bleu(hyps, refs))}
    out["rouge_l"] = rouge_l(hyps, refs)
    out["cider"] = cider_d(hyps, refs)
    if with_meteor:
        m = meteor(hyps, refs)
        if m is not None:
            out["meteor"] = m
    return out
