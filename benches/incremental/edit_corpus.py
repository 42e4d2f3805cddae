#!/usr/bin/env python3
"""Changes a fraction of a BEIR corpus, as a user's corpus changes between two runs.

Of the passages, a seeded choice of FRACTION/3 is removed, FRACTION/3 has its text
edited (a sentence appended), and FRACTION/3 new passages are added at the end (texts of
other passages with their words reversed, so they are new texts). The same arguments give
the same bytes.

    usage: edit_corpus.py IN.jsonl OUT.jsonl FRACTION [SEED]
    e.g.   edit_corpus.py corpus.jsonl corpus-edited.jsonl 0.01
"""
import json
import random
import sys


def main():
    src, dst, fraction = sys.argv[1], sys.argv[2], float(sys.argv[3])
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 7)
    records = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    each = max(1, round(len(records) * fraction / 3))
    chosen = rng.sample(range(len(records)), 2 * each)
    removed, edited = set(chosen[:each]), set(chosen[each:])
    donors = rng.sample(range(len(records)), each)
    with open(dst, "w", encoding="utf-8") as out:
        for i, r in enumerate(records):
            if i in removed:
                continue
            if i in edited:
                r = dict(r, text=r["text"] + " This passage was revised.")
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
        for n, d in enumerate(donors):
            r = records[d]
            words = r["text"].split()
            out.write(json.dumps({"_id": f"added-{n}", "title": r.get("title", ""),
                                  "text": " ".join(reversed(words))}, ensure_ascii=False) + "\n")
    print(f"{len(records)} passages: removed {each}, edited {each}, added {each}")


if __name__ == "__main__":
    main()
