#!/usr/bin/env python3
"""Where a throughput run's time goes, from a kernel trace of the whole run.

Run `qwen-cli bench --mode throughput --tensor-core-decode` with
QWEN_CUDA_TRACE=FILE (crates/kernels-cuda/src/trace.rs), then
`scripts/trace-steps.py FILE`. Each record is the time a kernel got past its
wait for the kernel before (when that one completed), so the gap to the next
record is a kernel's share of the run's critical path. Steps are cut at the
vocabulary projection (the kernel with a grid of 500 or more column
blocks: 151,936 columns in tiles of at most 256); a decode step of the tensor-core layer is, after the vocabulary
projection, three sampling kernels, the next step's first kernels (the
token's download and the fed ids in overlapped steps, the embedding, the
first input norm), then 8
kernels a layer (qkv, RoPE, attention, o_proj, add + norm, gate/up + SiLU,
down, add + next norm; 7 where attention makes q itself, attn_tc_rope, or
in prompt steps the QKV projection does, gemm_wg_m128_n256_rope_d128, its
time then under "qkv"; the
last layer ends with the shares' sum, the final norm and the hi/lo split). The gap after the third sampling kernel is that
kernel plus any time until the next step's first kernel (the step
boundary: the host's, in plain steps). Steps with prompt tokens (a decode
step embeds as many rows as it samples; a prompt step more) run the same
8 kernels a layer and are tabled apart, by the tokens they embed (2,048-
token buckets). Prints the totals and a table of ms a step by batch size
(32-row buckets; a decode step's batch is its sampling kernels' grid
height), then the prompt steps' table.
Usage: scripts/trace-steps.py FILE [--layers N]
"""
import argparse, collections

import trace_records

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--layers", type=int, default=28)
a = ap.parse_args()

recs = trace_records.read(a.file)
gap = [(recs[i + 1][0] - recs[i][0]) / 1e3 for i in range(len(recs) - 1)] + [0.0]
lm = [i for i, r in enumerate(recs) if r[2] >= 500]
layer = ["qkv", "rope", "attention", "o_proj", "add+norm", "gate_up+silu", "down", "add+norm"]
# A decode step whose attention kernel makes q and the new rows itself
# (attn_tc_rope: small tensor-core decode grids) has no RoPE kernel.
fused = [k for k in layer if k != "rope"]
tail = ["shares sum", "final norm", "hi/lo split"]
after = ["lm_head", "sample 1", "sample 2", "sample 3 + boundary"]
total = collections.defaultdict(float)
by = collections.defaultdict(lambda: collections.defaultdict(float))
steps = collections.Counter()
p_by = collections.defaultdict(lambda: collections.defaultdict(float))
p_steps = collections.Counter()
prompt_us, prompt_steps = 0.0, 0
for a_i, b_i in zip(lm[:-1], lm[1:]):
    # A step: its first kernels after the step before's sampling (the fed
    # ids in overlapped steps, the embedding, the input norm), its layers
    # from qkv (`first`) on, its vocabulary projection (b_i) and sampling.
    if b_i + 4 >= len(recs):
        break
    rows = recs[b_i + 1][2]  # the sampling kernels' grid height
    # A decode step embeds as many rows as it samples; a prompt step more.
    # The layer's kernel count (8, or 7 where attention or, in prompt steps,
    # the QKV projection makes RoPE) is what puts the step's first kernels
    # 2 to 4 records after the step before's sampling in decode steps (the
    # overlapped steps' token download and small writes, the fed ids, the
    # embedding, the input norm), 1 to 5 around prompt steps (whose sampling
    # takes 2 to 4 kernels); the two counts differ by a kernel a layer, so
    # only one fits.
    for kl in (layer, fused):
        first = b_i - (a.layers * len(kl) - 1 + len(tail))
        emb = recs[first - 2]
        if first - (a_i + 4) in (1, 2, 3, 4, 5):
            break
    else:
        kl = layer
        first = b_i - (a.layers * len(kl) - 1 + len(tail))
        emb = recs[first - 2]
    names = [kl[j % len(kl)] for j in range(a.layers * len(kl) - 1)] + tail
    if first - (a_i + 4) not in (2, 3, 4) or emb[1] != rows:
        prompt_us += (recs[b_i + 4][0] - recs[a_i + 4][0]) / 1e3
        prompt_steps += 1
        # A step that embeds more tokens than it samples (not the run's
        # first few steps, which are shaped otherwise).
        if emb[1] > rows:
            p_bucket = (emb[1] - 1) // 2048
            for k, name in enumerate(names + after):
                p_by[p_bucket][name] += gap[first + k] if k < len(names) else gap[b_i + k - len(names)]
            for k in range(a_i + 4, first):
                p_by[p_bucket]["step start"] += gap[k]
            p_steps[p_bucket] += 1
        continue
    bucket = (rows - 1) // 32
    for k, name in enumerate(names):
        total[name] += gap[first + k]
        by[bucket][name] += gap[first + k]
    for k, name in enumerate(after):
        total[name] += gap[b_i + k]
        by[bucket][name] += gap[b_i + k]
    for k in range(a_i + 4, first):
        total["step start"] += gap[k]
        by[bucket]["step start"] += gap[k]
    steps[bucket] += 1
decode_us = sum(total.values())
print(f"decode steps {sum(steps.values())}: {decode_us / 1e6:.3f} s; "
      f"steps with prompt tokens {prompt_steps}: {prompt_us / 1e6:.3f} s")
for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"{name:>22} {us / 1e6:8.3f} s {100 * us / (decode_us + prompt_us):5.1f}%")
cols = ["attention", "qkv", "rope", "o_proj", "add+norm", "gate_up+silu", "down", "lm_head",
        "sample 1", "sample 2", "sample 3 + boundary", "step start"]

def table(label, width, steps, by):
    """Ms a step by kernel, one row per bucket of `width` (rows or tokens)."""
    print(f"\n| {label} | steps | " + " | ".join(cols) + " | all (ms a step) |")
    print("|" + "---|" * (len(cols) + 3))
    for bucket in sorted(steps):
        n = steps[bucket]
        row = [by[bucket][c] / n / 1e3 for c in cols]
        print(f"| {bucket * width + 1}-{bucket * width + width} | {n} | " + " | ".join(f"{v:.3f}" for v in row)
              + f" | {sum(by[bucket].values()) / n / 1e3:.3f} |")


table("seqs", 32, steps, by)
if p_steps:
    print("\nSteps with prompt tokens, ms a step by tokens embedded:")
    table("tokens", 2048, p_steps, p_by)
