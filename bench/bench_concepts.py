"""Proposals per second of the ``ontology`` concepts backend, through ConceptsCore.propose.

Each request: a small PNG given inline (the ontology never decodes it) and 1 to --max-labels
known labels drawn from the shipped taxonomy (names and synonyms, some with a colour in front,
some plural or capitalised so cleaning has work to do), a --unknown fraction of them made-up
phrases the taxonomy does not know. Caps: the settings' defaults unless given. After warm-up,
prints throughput and per-request latency (p50, p90, p99 in ms), then a JSON line.

    .venv/bin/python bench/bench_concepts.py --requests 5000 [--max-labels 5] [--unknown 0.2]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import inflect  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from services.common.settings import Settings  # noqa: E402
from services.concepts.core import ConceptsCore  # noqa: E402
from services.concepts.ontology import Taxonomy  # noqa: E402

UNKNOWN_WORDS = ("zorb", "flumph", "gizmo", "quux", "wibble", "sprocket")


def label_sets(taxonomy: Taxonomy, n: int, max_labels: int, unknown: float, seed: int) -> list[list[str]]:
    """n lists of 1..max_labels raw labels (not yet cleaned)."""
    rng, engine = random.Random(seed), inflect.engine()
    surfaces = sorted(taxonomy.index)
    out = []
    for _ in range(n):
        labels = []
        for _ in range(rng.randint(1, max_labels)):
            if rng.random() < unknown:
                labels.append(f"{rng.choice(('shiny', 'old', 'tiny'))} {rng.choice(UNKNOWN_WORDS)}")
                continue
            text = rng.choice(surfaces)
            colours = taxonomy.index[text].attributes.get("colour", ())
            if colours and rng.random() < 0.3:
                text = f"{rng.choice(colours)} {text}"
            if rng.random() < 0.2:
                text = f"The {engine.plural_noun(text)}".title()  # "The Red Cars": cleaned back to "red car"
            labels.append(text)
        out.append(labels)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-labels", type=int, default=5, help="known labels per request: 1 to this")
    parser.add_argument("--unknown", type=float, default=0.2, help="fraction of labels the taxonomy does not know")
    parser.add_argument("--max-negatives", type=int, default=0, help="0: the settings' default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    settings = Settings()
    core = ConceptsCore("ontology", None, settings=settings)  # loads and indexes the taxonomy
    load_ms = 1000 * (time.perf_counter() - t0)
    taxonomy = core.backend.taxonomy
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    image = buffer.getvalue()
    requests = label_sets(taxonomy, args.warmup + args.requests, args.max_labels, args.unknown, args.seed)

    latencies, negatives, positives = [], [], []
    for i, labels in enumerate(requests):
        start = time.perf_counter()
        proposal = core.propose(image, labels, max_negatives=args.max_negatives)
        elapsed = 1000 * (time.perf_counter() - start)
        if i >= args.warmup:  # the first requests fill the parse and inflect caches
            latencies.append(elapsed)
            negatives.append(len(proposal.hard_negatives))
            positives.append(len(proposal.phrases))
    ms = np.asarray(latencies)
    stats = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
             "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "n": len(ms)}
    rate = 1000 * len(ms) / float(ms.sum())
    cap = args.max_negatives or settings.concepts_max_negatives
    print(f"ontology backend via ConceptsCore.propose: {len(taxonomy.nodes)} categories, {stats['n']} requests "
          f"after {args.warmup} warm-up, 1-{args.max_labels} labels each ({args.unknown:.0%} unknown), "
          f"at most {cap} negatives")
    print(f"  {rate:,.0f} proposals/s   p50 {stats['p50']:.3f} ms   p90 {stats['p90']:.3f} ms   "
          f"p99 {stats['p99']:.3f} ms   (taxonomy load {load_ms:.0f} ms, once)")
    print(f"  per proposal: {np.mean(positives):.2f} phrases, {np.mean(negatives):.2f} hard negatives")
    print(json.dumps({"bench": "concepts_ontology", "categories": len(taxonomy.nodes), "requests": stats["n"],
                      "max_labels": args.max_labels, "unknown": args.unknown, "max_negatives": cap,
                      "proposals_per_s": rate, "latency_ms": stats, "load_ms": load_ms,
                      "phrases_mean": float(np.mean(positives)), "negatives_mean": float(np.mean(negatives))}))


if __name__ == "__main__":
    main()
