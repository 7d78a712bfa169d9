#!/usr/bin/env python3
"""Hugging Face transformers baseline for `qwen-cli bench`, on the same shapes and workloads.

Two parts, each printing one JSON line per result on stdout (progress goes to
stderr):

latency     batch 1, a 128-token prompt, 256 new tokens, greedy: the workload of
            `qwen-cli bench` (default mode), with the same prompt ids. Tried in
            several settings, all bf16 with SDPA attention: the default dynamic
            cache; a static cache; a static cache with generate's automatic
            torch.compile (mode reduce-overhead: CUDA graphs). Each reports
            decode tok/s from per-token timestamps (prefill excluded), and a
            final line names the best. An untimed eager generate runs before
            them all, so that no figure depends on the variants' order.

throughput  the offline workload of `qwen-cli bench --mode throughput`: 256
            sequences, prompt and output lengths uniform in [100, 1024], random
            token ids, every sequence generating exactly its output length (EOS
            ignored), sampled at temperature 0.6. The lengths and ids are drawn
            from the same seeded stream as qwen-cli's (splitmix64), so both
            engines run the identical workload. Two paths:
              padded  model.generate on left-padded batches (--batch-size,
                      default 64), sequences sorted by output length so a batch
                      wastes little decoding past its shorter members; only each
                      sequence's own output tokens count.
              cb      transformers' continuous batching (init_continuous_batching,
                      paged attention), every request with its own max_new_tokens.
            Output tok/s and total (prompt + output) tok/s over the wall time.

The model is built from a Qwen3Config with random weights (no download, no
internet needed): --shape names a published size as qwen-cli's --dummy-weights
does. Random weights decode at the same speed as trained ones, since EOS is
ignored. --model DIR loads a local checkpoint instead.

A part that runs past --time-limit seconds (default 240) stops early and
reports the rate over what it finished, with "complete": false. On an H100 the
latency part takes about 2-3 minutes (most of it compiling); the throughput
part at full size may hit the limit in the padded path: --num-seqs 64 gives a
quick, smaller run (say so when quoting it).

Usage (needs torch and transformers; one CUDA GPU):

    python3 scripts/hf_bench.py --part latency --shape qwen3-0.6b
    python3 scripts/hf_bench.py --part throughput --shape qwen3-0.6b [--num-seqs 64]
    python3 scripts/hf_bench.py --part all
"""

import argparse
import json
import sys
import time

# The published dense Qwen3 shapes: hidden, intermediate, layers, query heads,
# tied embeddings (as `dummy_config` in crates/model-qwen3/src/dummy.rs).
PRESETS = {
    "qwen3-0.6b": (1024, 3072, 28, 16, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, True),
    "qwen3-4b": (2560, 9728, 36, 32, True),
    "qwen3-8b": (4096, 12288, 36, 32, False),
    "qwen3-14b": (5120, 17408, 40, 40, False),
    "qwen3-32b": (5120, 25600, 64, 64, False),
}

MASK64 = (1 << 64) - 1


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def emit(obj):
    """One result: a JSON line on stdout."""
    print(json.dumps(obj), flush=True)


class SplitMix64:
    """The seeded stream of crates/cli/src/throughput.rs (`Stream`), bit for bit,
    so the workload is the one qwen-cli runs."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def between(self, lo, hi):
        """Uniform in lo..=hi."""
        return lo + self.next() % (hi - lo + 1)


def workload(n, max_len, vocab, seed):
    """qwen-cli's throughput workload: n prompts (ids in 0..=10000), then their
    output lengths, lengths uniform in [min(100, max_len), max_len].
    Returns a list of (prompt ids, max new tokens)."""
    rng = SplitMix64(seed)
    lo = min(100, max_len)
    top = min(10_000, vocab - 1)
    prompts = []
    for _ in range(n):
        length = rng.between(lo, max_len)
        prompts.append([rng.between(0, top) for _ in range(length)])
    return [(p, rng.between(lo, max_len)) for p in prompts]


def latency_prompt(n, vocab, seed):
    """The prompt of `qwen-cli bench` (default mode): ids (i * 2654435761 ^ seed) mod vocab."""
    return [(((i * 2_654_435_761) & MASK64) ^ seed) % vocab for i in range(n)]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shape", default="qwen3-0.6b", choices=sorted(PRESETS), help="random weights of this size")
    src.add_argument("--model", help="a local checkpoint directory instead of random weights")
    ap.add_argument("--part", default="all", choices=["latency", "throughput", "all"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts, workload and sampling (default 0)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds per timed path before stopping early")
    lat = ap.add_argument_group("latency")
    lat.add_argument("--prompt-len", type=int, default=128)
    lat.add_argument("--gen-len", type=int, default=256)
    lat.add_argument(
        "--latency-variants",
        default="dynamic,static,static-compile",
        help="comma-separated: dynamic, static, static-compile, static-compile-max-autotune (slow to compile)",
    )
    lat.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best counts (default 3)")
    thr = ap.add_argument_group("throughput")
    thr.add_argument("--num-seqs", type=int, default=256)
    thr.add_argument("--max-len", type=int, default=1024)
    thr.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6, as nano-vllm)")
    thr.add_argument("--throughput-variants", default="padded,cb", help="comma-separated: padded, cb")
    thr.add_argument("--batch-size", type=int, default=64, help="sequences per generate call in the padded path")
    a = ap.parse_args()
    for name in ("prompt_len", "gen_len", "repeats", "num_seqs", "max_len", "batch_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.gen_len < 2:
        ap.error("--gen-len must be at least 2 (decode speed needs a token after the first)")
    if a.temperature < 0:
        ap.error("--temperature must be >= 0")
    return a


def build_model(a, torch):
    """The model in bf16 on the GPU, with random weights of --shape or the
    checkpoint in --model."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    def with_dtype(fn, *args, **kw):
        # transformers 5 renamed torch_dtype to dtype; accept either release.
        try:
            return fn(*args, dtype=torch.bfloat16, **kw)
        except TypeError:
            return fn(*args, torch_dtype=torch.bfloat16, **kw)

    if a.model:
        model = with_dtype(
            AutoModelForCausalLM.from_pretrained, a.model, attn_implementation=a.attn, local_files_only=True
        )
        return model.to("cuda").eval(), a.model
    h, i, layers, heads, tied = PRESETS[a.shape]
    kw = dict(
        vocab_size=151_936,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        use_sliding_window=False,
        bos_token_id=151_643,
        eos_token_id=151_645,
    )
    try:
        cfg = Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    except TypeError:
        # Releases before rope_parameters take rope_theta.
        cfg = Qwen3Config(rope_theta=1e6, **kw)
    torch.manual_seed(a.seed)
    # Initialised on the GPU: a CPU init of billions of parameters takes minutes.
    with torch.device("cuda"):
        model = with_dtype(AutoModelForCausalLM.from_config, cfg, attn_implementation=a.attn)
    return model.eval(), f"{a.shape} (random weights)"


def make_timer(torch):
    from transformers import LogitsProcessor

    class StepTimer(LogitsProcessor):
        """Timestamps every generated token: generate calls logits processors
        once per token, right after the forward pass that produced it. The
        synchronize makes the stamp the end of that pass on the GPU (generate
        synchronizes every step anyway to check its stopping criteria)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    return StepTimer


def latency_config(variant, n):
    """Greedy, exactly n new tokens (no EOS), and the cache/compile settings of
    the variant."""
    from transformers import GenerationConfig

    kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    if variant == "dynamic":
        return GenerationConfig(**kw)
    if variant == "static":
        return GenerationConfig(cache_implementation="static", disable_compile=True, **kw)
    if variant == "static-compile":
        # generate compiles the decoding forward itself when the cache is
        # static (its default CompileConfig: mode reduce-overhead, CUDA graphs).
        return GenerationConfig(cache_implementation="static", **kw)
    if variant == "static-compile-max-autotune":
        from transformers import CompileConfig

        return GenerationConfig(
            cache_implementation="static", compile_config=CompileConfig(mode="max-autotune"), **kw
        )
    raise ValueError(f"unknown latency variant '{variant}'")


def run_latency(model, label, a, torch):
    from transformers import LogitsProcessorList

    StepTimer = make_timer(torch)
    vocab = model.config.vocab_size
    ids = torch.tensor([latency_prompt(a.prompt_len, vocab, a.seed)], device="cuda")
    mask = torch.ones_like(ids)
    # One untimed eager generate first, so that no variant's figure depends
    # on which ran before it: the compiled variant measured 4.52 ms a token
    # when it ran first in the process and 3.52 after the static one, on the
    # same H100 (BENCHMARKS.md, 2026-11-27).
    log("latency: warm-up (static cache, eager, untimed)")
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=latency_config("static", a.gen_len))
        torch.cuda.synchronize()
    except Exception as e:  # the variants still run, each reporting its own error
        log(f"latency: warm-up failed ({type(e).__name__}: {e})")
    torch.cuda.empty_cache()
    best = None
    for variant in [v.strip() for v in a.latency_variants.split(",") if v.strip()]:
        base = {
            "impl": "hf-transformers",
            "part": "latency",
            "variant": variant,
            "shape": label,
            "prompt_len": a.prompt_len,
            "gen_len": a.gen_len,
        }
        try:
            gc = latency_config(variant, a.gen_len)
            started = time.perf_counter()
            runs = []
            # The first run compiles (where the variant compiles) and warms the
            # allocator; it is never timed. Further warm-ups are cheap.
            for r in range(a.repeats + 1):
                if time.perf_counter() - started > a.time_limit and runs:
                    break
                timer = StepTimer()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=gc,
                        logits_processor=LogitsProcessorList([timer]),
                    )
                new = out.shape[1] - ids.shape[1]
                if new != a.gen_len or len(timer.times) != a.gen_len:
                    raise RuntimeError(f"generated {new} tokens ({len(timer.times)} stamps), wanted {a.gen_len}")
                decode_s = timer.times[-1] - timer.times[0]
                if r > 0:
                    runs.append((decode_s, timer.times[0] - t0))
                log(f"latency {variant}: run {r} decode {decode_s * 1e3 / (a.gen_len - 1):.3f} ms/token")
            decode_s, ttft = min(runs)
            ms = decode_s * 1e3 / (a.gen_len - 1)
            res = dict(
                base,
                # Where generate keeps its compiled forward (a hint that the
                # automatic compile did happen; absent in eager variants).
                compiled=getattr(model, "_compiled_call", None) is not None,
                ttft_ms=ttft * 1e3,
                ms_per_token=ms,
                decode_tok_s=1e3 / ms,
                runs=len(runs),
                complete=len(runs) == a.repeats,
            )
            emit(res)
            if best is None or res["decode_tok_s"] > best["decode_tok_s"]:
                best = res
        except Exception as e:  # one failing setting must not hide the others
            emit(dict(base, error=f"{type(e).__name__}: {e}"))
        torch.cuda.empty_cache()
    if best is not None:
        emit(dict(best, variant="best", best_variant=best["variant"]))


def sampling_kwargs(a):
    """Plain temperature sampling (top-k and top-p off, unlike generate's
    default top-k 50), or greedy."""
    if a.temperature == 0:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0)


def throughput_result(label, a, variant, prompt_tokens, output_tokens, wall, done, **extra):
    return dict(
        impl="hf-transformers",
        part="throughput",
        variant=variant,
        shape=label,
        num_seqs=a.num_seqs,
        max_len=a.max_len,
        finished_seqs=done,
        complete=done == a.num_seqs,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        wall_s=wall,
        output_tok_s=output_tokens / wall,
        total_tok_s=(prompt_tokens + output_tokens) / wall,
        temperature=a.temperature,
        **extra,
    )


def run_padded(model, label, a, reqs, torch):
    """generate on left-padded batches of similar output length."""
    from transformers import GenerationConfig

    order = sorted(range(len(reqs)), key=lambda k: -reqs[k][1])
    batches = [order[s : s + a.batch_size] for s in range(0, len(order), a.batch_size)]

    def run_batch(members, limit_new=None):
        prompts = [reqs[k][0] for k in members]
        width = max(len(p) for p in prompts)
        # Left padding, so every sequence's next token comes at the same column.
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
        n = max(reqs[k][1] for k in members) if limit_new is None else limit_new
        gc = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, **sampling_kwargs(a)
        )
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        if out.shape[1] - width != n:
            raise RuntimeError(f"generated {out.shape[1] - width} tokens, wanted {n}")
        return len(members) * n

    # Warm-up on a short batch (kernel selection, allocator).
    run_batch(batches[0][: min(4, len(batches[0]))], limit_new=8)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prompt_tokens = output_tokens = generated = done = 0
    for b, members in enumerate(batches):
        if time.perf_counter() - t0 > a.time_limit:
            log(f"padded: time limit reached after {b} of {len(batches)} batches")
            break
        generated += run_batch(members)
        done += len(members)
        prompt_tokens += sum(len(reqs[k][0]) for k in members)
        output_tokens += sum(reqs[k][1] for k in members)
        torch.cuda.synchronize()
        log(f"padded: batch {b + 1}/{len(batches)}, {output_tokens / (time.perf_counter() - t0):.0f} tok/s out")
    wall = time.perf_counter() - t0
    return throughput_result(
        label,
        a,
        "padded",
        prompt_tokens,
        output_tokens,
        wall,
        done,
        batch_size=a.batch_size,
        generated_tokens_incl_padding_waste=generated,
    )


def run_cb(model, label, a, reqs, torch):
    """transformers' continuous batching, each request with its own length."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max(n for _, n in reqs), eos_token_id=None, pad_token_id=0, **sampling_kwargs(a))
    manager = model.init_continuous_batching(generation_config=gc)
    if hasattr(manager, "warmup"):
        log("cb: warming up (captures CUDA graphs)")
        manager.warmup()
    manager.start()
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k, (prompt, n) in enumerate(reqs):
            manager.add_request(input_ids=prompt, request_id=f"r{k}", max_new_tokens=n)
        done = output_tokens = prompt_tokens = 0
        last = t0
        while done < len(reqs):
            if time.perf_counter() - t0 > a.time_limit:
                log(f"cb: time limit reached with {done} of {len(reqs)} finished")
                break
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching thread stopped")
                continue
            finished = res.is_finished() if hasattr(res, "is_finished") else str(res.status).endswith("FINISHED")
            if not finished:
                continue
            if getattr(res, "error", None):
                raise RuntimeError(f"request {res.request_id}: {res.error}")
            k = int(str(res.request_id)[1:])
            done += 1
            output_tokens += len(res.generated_tokens)
            prompt_tokens += len(reqs[k][0])
            if time.perf_counter() - last > 5:
                last = time.perf_counter()
                log(f"cb: {done}/{len(reqs)} done, {output_tokens / (last - t0):.0f} tok/s out")
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True, timeout=30)
    return throughput_result(label, a, "cb", prompt_tokens, output_tokens, wall, done)


def run_throughput(model, label, a, torch):
    reqs = workload(a.num_seqs, a.max_len, model.config.vocab_size, a.seed)
    paths = {"padded": run_padded, "cb": run_cb}
    for variant in [v.strip() for v in a.throughput_variants.split(",") if v.strip()]:
        try:
            if variant not in paths:
                raise ValueError(f"unknown throughput variant '{variant}' (expected padded or cb)")
            torch.manual_seed(a.seed)
            emit(paths[variant](model, label, a, reqs, torch))
        except Exception as e:  # one failing path must not hide the other
            emit(
                {
                    "impl": "hf-transformers",
                    "part": "throughput",
                    "variant": variant,
                    "shape": label,
                    "error": f"{type(e).__name__}: {e}",
                }
            )
        torch.cuda.empty_cache()


def main():
    a = parse_args()
    import torch
    import transformers

    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU")
    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name(0)}"
    )
    model, label = build_model(a, torch)
    if 2 * a.max_len - 1 > model.config.max_position_embeddings:
        sys.exit(f"error: --max-len {a.max_len} exceeds the model's positions")
    if a.part in ("latency", "all"):
        run_latency(model, label, a, torch)
    if a.part in ("throughput", "all"):
        run_throughput(model, label, a, torch)


if __name__ == "__main__":
    main()
