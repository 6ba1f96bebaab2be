"""moe-prepare-data and prepared-data training, measured side by side.

    python benchmarks/prepare_data.py                    # throughput and training read speed
    python benchmarks/prepare_data.py --memory-gb 1      # also: peak memory preparing a 1 GB corpus
    python benchmarks/prepare_data.py --smoke            # tiny sizes (checks the harness)

1. Throughput: a jsonl corpus (the stdlib's sources, repeated to --mb MB) prepared with a
   byte-level BPE (trained here on its first 4 MB), in tokens/s of the whole command
   (`python -m trainer.data.prepare`, start-up, reading and writing included), at 1 worker
   and at every core; against the limit, the tokenizer's own encode_batch on the same texts
   held in memory in one process (RAYON_NUM_THREADS=1, then every core), in batches of
   about 1 MiB of text as the workers use.
2. Memory (--memory-gb): the peak resident memory of the preparing process tree (sampled
   every 0.2 s) while it prepares a generated jsonl corpus of that size, at every core.
3. Training read speed: tokens/s of a short single-process training run (the cpu_bpe model)
   reading the prepared shards, against the same run on the in-memory byte corpus (stdlib);
   and of the samplers alone (batches of 8 x 128).

Each measurement runs --repeat times, interleaved, and the best is shown (the machine may be
shared). Prints a table per part; --out adds the run to OUT.txt and OUT.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data.inputs import stdlib_files  # noqa: E402
from trainer.metrics import text_table  # noqa: E402

# The limit: encode_batch on texts already in memory, in batches of about the size the
# preparation's workers use (one batch of everything is slower: it holds every Encoding).
ENCODE = """
import json, sys, time
from tokenizers import Tokenizer
from trainer.data.worker import BATCH_BYTES
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
batches, size = [[]], 0
for t in texts:
    batches[-1].append(t)
    size += len(t)
    if size >= BATCH_BYTES:
        batches.append([])
        size = 0
start = time.perf_counter()
tokens = sum(len(e.ids) for b in batches for e in tok.encode_batch_fast(b, add_special_tokens=False))
print(json.dumps({"tokens": tokens + len(texts), "seconds": time.perf_counter() - start}))
"""


def write_corpus(path: Path, megabytes: float) -> int:
    """jsonl of the stdlib's files, repeated (a copy number first, so copies differ) to the size."""
    sources = [Path(p).read_text(errors="replace") for p, _ in stdlib_files()]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for text in sources:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= megabytes * 1e6:
                    break
            copy += 1
    return written


def run_prepare(args: list[str], sample_memory: bool = False) -> dict:
    """`python -m trainer.data.prepare ARGS` (niced); wall time and, optionally, the peak
    resident memory of its process tree."""
    import psutil

    cmd = ["nice", "-n", "10", sys.executable, "-m", "trainer.data.prepare", *args, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_total = peak_one = 0
    while proc.poll() is None:
        if sample_memory:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                rss = [p.memory_info().rss for p in tree if p.is_running()]
                peak_total, peak_one = max(peak_total, sum(rss)), max(peak_one, max(rss, default=0))
            except psutil.Error:
                pass
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": seconds, "peak_rss_total": peak_total or None, "peak_rss_process": peak_one or None,
            "stdout": out.strip()}


def encode_limit(tokenizer: Path, corpus: Path, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run(["nice", "-n", "10", sys.executable, "-c", ENCODE, str(tokenizer), str(corpus)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def best(runs: list[dict], key: str) -> dict:
    """The run with the highest `key`: on a machine shared with others, the least disturbed."""
    return max(runs, key=lambda r: r[key])


def throughput(work: Path, megabytes: float, cores: int, repeat: int) -> tuple[list[dict], Path]:
    corpus = work / "corpus.jsonl"
    size = write_corpus(corpus, megabytes)
    sample = work / "sample.jsonl"
    write_corpus(sample, min(4.0, megabytes))
    run_prepare(["--input", str(sample), "--output", str(work / "tok"), "--train-tokenizer", "bpe",
                 "--vocab-size", "4096", "--workers", str(cores)])
    tokenizer = work / "tok" / "tokenizer.json"
    runs: dict[int, dict[str, list[dict]]] = {w: {"limit": [], "ours": []} for w in sorted({1, cores})}
    for _ in range(repeat):  # interleaved, so a burst of load from others hits both sides alike
        for workers, got in runs.items():
            limit = encode_limit(tokenizer, corpus, workers)
            got["limit"].append({"tokens_per_s": limit["tokens"] / limit["seconds"]})
            shutil.rmtree(work / f"w{workers}", ignore_errors=True)
            ours = run_prepare(["--input", str(corpus), "--output", str(work / f"w{workers}"), "--tokenizer",
                                str(tokenizer), "--workers", str(workers)])
            meta = json.loads((work / f"w{workers}" / "meta.json").read_text())
            tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
            got["ours"].append({"tokens": tokens, "seconds": ours["seconds"], "tokens_per_s": tokens / ours["seconds"]})
    rows = []
    for workers, got in runs.items():
        limit, ours = best(got["limit"], "tokens_per_s"), best(got["ours"], "tokens_per_s")
        rows.append({"cores": workers, "corpus_mb": size / 1e6, "tokens": ours["tokens"],
                     "limit_tokens_per_s": limit["tokens_per_s"], "prepare_tokens_per_s": ours["tokens_per_s"],
                     "prepare_s": ours["seconds"], "ratio": ours["tokens_per_s"] / limit["tokens_per_s"],
                     "runs": got})
    return rows, tokenizer


def memory(work: Path, gigabytes: float, cores: int, tokenizer: Path) -> dict:
    corpus = work / "big.jsonl"
    size = write_corpus(corpus, gigabytes * 1000)
    result = run_prepare(["--input", str(corpus), "--output", str(work / "big"), "--tokenizer", str(tokenizer),
                          "--workers", str(cores)], sample_memory=True)
    meta = json.loads((work / "big" / "meta.json").read_text())
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    corpus.unlink()
    return {"corpus_bytes": size, "tokens": tokens, "seconds": result["seconds"], "cores": cores,
            "tokens_per_s": tokens / result["seconds"], "peak_rss_total": result["peak_rss_total"],
            "peak_rss_process": result["peak_rss_process"]}


def sampler_speed(dataset: Path, steps: int, repeat: int) -> list[dict]:
    """Batches of 8 x 128 from the stdlib bytes in memory and from the prepared shards."""
    from trainer.config import DataConfig
    from trainer.data import ShardedSampler, load_corpus

    configs = {"stdlib bytes, in memory": DataConfig(source="stdlib"),
               "prepared shards (memmap)": DataConfig(source="prepared", path=str(dataset)),
               "mixture of 2 prepared": DataConfig(source="prepared", path=f"{dataset},{dataset}", weights="3,1")}
    samplers = {name: ShardedSampler(load_corpus(cfg).train, 128, 8, 0, 1, seed=1) for name, cfg in configs.items()}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(repeat):
        for name, sampler in samplers.items():
            start = time.perf_counter()
            for m in range(r * steps, (r + 1) * steps):  # batches not read before (no page cache help)
                sampler.batch(m)
            runs[name].append({"tokens_per_s": steps * 8 * 128 / (time.perf_counter() - start)})
    return [{"data": name, **best(got, "tokens_per_s"), "runs": got} for name, got in runs.items()]


def training_speed(dataset: Path, steps: int, smoke: bool, repeat: int) -> list[dict]:
    """One process, the cpu_bpe model (vocab 4096 either way), `steps` steps; the summary's
    steady training tokens/s."""
    small = ["--model.dim=32", "--model.n_layers=1", "--train.seq_len=32"] if smoke else []
    sources = {"stdlib bytes, in memory": ["--data.source=stdlib"],
               "prepared shards (memmap)": ["--data.source=prepared", f"--data.path={dataset}"]}
    runs: dict[str, list[dict]] = {name: [] for name in sources}
    for _ in range(repeat):
        for name, data in sources.items():
            with tempfile.TemporaryDirectory() as run_dir:
                cmd = ["nice", "-n", "10", sys.executable, "-m", "launcher.train", "--config", "configs/cpu_bpe.yaml",
                       "--parallel.dp=null", "--parallel.ep=1", f"--train.steps={steps}", "--train.eval_interval=0",
                       "--train.eval_batches=1", "--checkpoint.save_final=false", "--logging.tensorboard=false",
                       "--logging.progress=false", f"--logging.run_dir={run_dir}", *small, *data]
                subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
                summary = json.loads(Path(run_dir, "summary.json").read_text())
            runs[name].append({"tokens_per_s": summary["train_tokens_per_s"]})
    return [{"data": name, **best(got, "tokens_per_s"), "runs": got} for name, got in runs.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=32, help="corpus size of the throughput part")
    p.add_argument("--memory-gb", type=float, default=0, help="corpus size of the memory part (0: skip)")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement, interleaved; the best is shown")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--out", default=None, help="add this run to OUT.txt and OUT.json (a list of runs)")
    args = p.parse_args()
    if args.smoke:
        args.mb, args.train_steps, args.repeat = 1, 3, 1
    cores = os.cpu_count() or 1
    report, lines = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cores": cores,
                     "python": platform.python_version()}, []
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        work = Path(tmp)
        report["throughput"], tokenizer = throughput(work, args.mb, cores, args.repeat)
        lines += [f"1. Preparation throughput, {args.mb:g} MB of jsonl, byte-level BPE of 4096 (tokens/s, "
                  f"best of {args.repeat})",
                  text_table(report["throughput"], [("cores", "cores", "{}", 6),
                                                    ("encode_batch (limit)", "limit_tokens_per_s", "{:,.0f}", 22),
                                                    ("moe-prepare-data", "prepare_tokens_per_s", "{:,.0f}", 18),
                                                    ("ratio", "ratio", "{:.2f}", 8),
                                                    ("wall s", "prepare_s", "{:.1f}", 8)]), ""]
        if args.memory_gb:
            m = report["memory"] = memory(work, args.memory_gb, cores, tokenizer)
            lines += [f"2. Peak resident memory preparing {m['corpus_bytes'] / 1e9:.2f} GB of jsonl at {cores} cores: "
                      f"{m['peak_rss_total'] / 2**20:,.0f} MiB for the whole process tree (largest process "
                      f"{m['peak_rss_process'] / 2**20:,.0f} MiB); {m['tokens']:,} tokens in {m['seconds']:.0f} s "
                      f"({m['tokens_per_s']:,.0f} tokens/s)", ""]
        dataset = work / f"w{cores}"
        report["sampler"] = sampler_speed(dataset, 20 if args.smoke else 300, args.repeat)
        report["training"] = training_speed(dataset, args.train_steps, args.smoke, args.repeat)
        lines += ["3. Reading training batches (tokens/s, best of {}): the sampler alone (8 x 128), and steady "
                  "training steps of the cpu_bpe model in one process ({} steps)".format(args.repeat, args.train_steps),
                  text_table([{"data": s["data"], "sampler": s["tokens_per_s"],
                               "train": next((t["tokens_per_s"] for t in report["training"] if t["data"] == s["data"]), None)}
                              for s in report["sampler"]],
                             [("data", "data", "{}", 28), ("sampler", "sampler", "{:,.0f}", 14),
                              ("training", "train", "{:,.0f}", 12)])]
    text = "\n".join(lines)
    print(text)
    if args.out:
        save(Path(args.out), report, text)


def save(out: Path, report: dict, text: str) -> None:
    """Add this run to OUT.txt (the command, the machine's load, the tables) and OUT.json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report["command"] = f"python benchmarks/prepare_data.py {' '.join(sys.argv[1:])}"
    report["load_average"] = os.getloadavg()
    header = (f"{report['command']}\n{time.strftime('%Y-%m-%d %H:%M')}, {report['cores']} cores shared with "
              f"others (load average {report['load_average'][0]:.1f} at the end), Python {report['python']}")
    txt, js = Path(f"{out}.txt"), Path(f"{out}.json")
    before = txt.read_text() + "\n\n" if txt.is_file() else ""
    txt.write_text(f"{before}{header}\n\n{text}\n")
    runs = json.loads(js.read_text())["runs"] if js.is_file() else []
    js.write_text(json.dumps({"runs": [*runs, report]}, indent=1))


if __name__ == "__main__":
    main()
