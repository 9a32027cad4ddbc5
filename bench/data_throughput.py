"""Shard building throughput (tokens/s) with 1 and 2 workers against tiktoken's own batch encoder.

`encode_ordinary_batch` on the same documents, with no shard writing, is the practical ceiling.
Usage: python bench/data_throughput.py [--copies 4] [--repeats 3]
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from common import median_time, report

from nbgpt.shards import prepare
from nbgpt.sources import Source, get_source
from nbgpt.tokenizer import GPT2Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4, help="times the Shakespeare corpus is repeated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    documents = list(get_source("shakespeare")) * args.copies
    source = Source("shakespeare-x%d" % args.copies, lambda: iter(documents))
    tokenizer = GPT2Tokenizer()
    total = sum(len(ids) + 1 for ids in tokenizer.encode_batch(documents))
    rows = []
    for threads in (1, 2):
        seconds, _ = median_time(lambda: tokenizer.encoding.encode_ordinary_batch(documents, num_threads=threads),
                                 args.repeats)
        rows.append({"method": f"tiktoken encode_ordinary_batch, {threads} thread(s)", "seconds": seconds,
                     "tokens_per_s": total / seconds})
    for workers in (1, 2):
        def build():
            out = Path(tempfile.mkdtemp())
            try:
                prepare(source, tokenizer, out / "ds", shard_tokens=1_000_000, workers=workers, progress=False)
            finally:
                shutil.rmtree(out)
        seconds, _ = median_time(build, args.repeats, warmup=0)
        rows.append({"method": f"nbgpt prepare, {workers} worker(s)", "seconds": seconds,
                     "tokens_per_s": total / seconds})
    report("data_throughput", rows, {"documents": len(documents), "tokens": total})


if __name__ == "__main__":
    main()
