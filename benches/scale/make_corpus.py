#!/usr/bin/env python3
"""A synthetic BEIR corpus of N passages for the engine's scale benchmark.

Each passage is a title of 3 words and a text of 40-120 words drawn from a fixed
vocabulary of 20,000 made-up words with a Zipf-like frequency, from a seeded generator:
the same N gives the same bytes on every machine. The words are not language; the
benchmark measures the engine (reading, preparation, embedding, retrieval), not quality.

    usage: make_corpus.py N OUT.jsonl [SEED]
"""
import json
import random
import sys


def main():
    n = int(sys.argv[1])
    out = sys.argv[2]
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 42)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "po", "qua", "len"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
                    for _ in range(30000)})[:20000]
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    with open(out, "w") as f:
        for i in range(n):
            title = " ".join(rng.choices(vocab, weights, k=3))
            words = rng.choices(vocab, weights, k=rng.randint(40, 120))
            text = " ".join(words).capitalize() + "."
            f.write(json.dumps({"_id": f"p{i}", "title": title, "text": text}) + "\n")


if __name__ == "__main__":
    main()
