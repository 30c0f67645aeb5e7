"""Latency of the model backends' parsing: what runs on every answer after the model is done.

- concepts: ``parse_proposal`` (JSON object found in the answer, 0-1000 geometry to pixels) and
  ``clean_proposal`` (lower-case, singular, no repeats; what ConceptsCore applies to every
  backend), on answers of 2, 20 and 40 phrases, bare and wrapped in a code fence with prose;
- verifier: ``first_token_scores`` + ``softmax`` over an endpoint's 20 top logprobs (one check).

Prints per-answer latency (p50, p99 in microseconds) and a JSON line. Model time is not included:
it is the model's, and a tiny random model's would say nothing.

    .venv/bin/python bench/bench_parse.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from services.common.mllm.endpoint import first_token_scores  # noqa: E402
from services.concepts.model_backends import parse_proposal  # noqa: E402
from services.concepts.ontology import Taxonomy  # noqa: E402
from services.concepts.phrases import clean_proposal  # noqa: E402
from services.verifier.model_backends import CHOICES, softmax  # noqa: E402


def answer(n: int, rng: random.Random, names: list[str]) -> str:
    """A model's answer with n phrases and n // 2 hard negatives, as prompts/propose.txt asks."""
    def box() -> list[int]:
        x0, y0 = rng.randint(0, 800), rng.randint(0, 800)
        return [x0, y0, x0 + rng.randint(10, 200), y0 + rng.randint(10, 200)]
    phrases = [{"text": f"{rng.choice(('Red', 'small', 'two'))} {name}s", "box": box(), "point": None,
                "score": round(rng.random(), 2)} for name in rng.sample(names, n)]
    negatives = [{"text": name, "reason": "model", "score": 0.5} for name in rng.sample(names, n // 2)]
    return json.dumps({"phrases": phrases, "hard_negatives": negatives}, indent=1)


def timed(fn, repeat: int) -> dict[str, float]:
    for _ in range(min(200, repeat)):  # warm-up: inflect's and the parser's caches
        fn()
    us = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        us.append(1e6 * (time.perf_counter() - start))
    a = np.asarray(us)
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "n": repeat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(0)
    names = sorted(node for node in Taxonomy.load().nodes if " " not in node)
    results = {}
    for n in (2, 20, 40):
        text = answer(n, rng, names)
        for wrapped in (False, True):
            body = f"Here is the JSON you asked for:\n```json\n{text}\n```\nDone." if wrapped else text

            def run(body=body) -> None:
                clean_proposal(parse_proposal(body, (480, 640), "bench"), 100, 100)
            key = f"concepts_{n}_phrases" + ("_fenced" if wrapped else "")
            results[key] = {**timed(run, args.repeat), "chars": len(body)}
    top = [(f" {c}" if i % 2 else c, math.log(p)) for i, (c, p) in
           enumerate(zip("ABCDEFGHIJKLMNOPQRST", np.random.default_rng(0).dirichlet(np.ones(20))))]
    letters = [letter for _, letter in CHOICES["exhaustivity"]]
    results["verifier_choice_scores"] = timed(
        lambda: softmax(first_token_scores(top, letters), letters, "bench"), args.repeat)
    for key, r in results.items():
        size = f"{r['chars']:>6} chars" if "chars" in r else " " * 12
        print(f"{key:<32} {size}   p50 {r['p50_us']:8.1f} us   p99 {r['p99_us']:8.1f} us")
    print(json.dumps({"bench": "model_parsing", **results}))


if __name__ == "__main__":
    main()
