#!/usr/bin/env python3
"""Dump Hugging Face transformers' Qwen3 activations for `qwen-cli verify --against`.

Runs a prompt (prefill, then greedy decode steps) through
AutoModelForCausalLM in float32 (the reference "truth"), and writes every
intermediate activation under the names and layouts `qwen-cli verify --dump`
uses, to one safetensors file:

    {step}.tokens                 int64 [T]        ids fed to this step
    {step}.embed                  [T, H]           embed_tokens output
    {step}.layers.{i}.qkv         [T, (Hq+2Hkv)D]  concat(q_proj, k_proj, v_proj) outputs
    {step}.layers.{i}.q           [T, Hq*D]        q after q_norm and RoPE
    {step}.layers.{i}.k_cache     [L, Hkv, D]      every key so far (after k_norm, RoPE)
    {step}.layers.{i}.v_cache     [L, Hkv, D]      every value so far
    {step}.layers.{i}.attn        [T, Hq*D]        attention output, before o_proj
    {step}.layers.{i}.attn_residual [T, H]         residual after attention (input of post_attention_layernorm)
    {step}.layers.{i}.gate_up     [T, 2I]          concat(gate_proj, up_proj) outputs
    {step}.layers.{i}.act         [T, I]           silu(gate) * up (input of down_proj)
    {step}.layers.{i}.out         [T, H]           decoder layer output
    {step}.logits                 [T, V]           logits of every position

with step = prefill, decode-1, decode-2, ...; T is the step's token count
and L the positions in the cache after it. Hugging Face has no fused QKV or
gate/up projection, so those are concatenated here in the engine's order.

q, k and v after RoPE are read where they enter attention: the script
loads the model with eager attention and wraps the modeling module's
`eager_attention_forward`, which receives the roped query and the whole
updated cache. Everything else comes from forward hooks.

Usage (needs torch, transformers and safetensors):

    python3 scripts/hf_dump.py --model Qwen3-0.6B --prompt "The quick brown fox" --out hf-dump
    qwen-cli verify --model Qwen3-0.6B --against hf-dump
"""

import argparse
import os
import sys


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (or hub id)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    ap.add_argument("--steps", type=int, default=3, help="greedy decode steps after the prefill (default 3)")
    ap.add_argument(
        "--out",
        required=True,
        help="output directory (gets activations.safetensors) or a path ending in .safetensors",
    )
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype (default float32: the reference verify's relative bounds assume)",
    )
    return ap.parse_args()


def main():
    args = parse_args()
    if args.steps < 0:
        sys.exit("error: --steps must be >= 0")
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = args.prompt

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers.models.qwen3.modeling_qwen3 as mq

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    # The reference must be true float32: no TF32 in matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    tok = AutoTokenizer.from_pretrained(args.model)
    # qwen-cli encodes prompts without added special tokens (Qwen3 adds none anyway).
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        sys.exit("error: the prompt encodes to no tokens")

    # Load straight into the compute dtype (the keyword was renamed in 4.56),
    # so that no buffer, such as RoPE's inverse frequencies, ever passes
    # through bf16 on the way.
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = {"dtype": dtype} if version >= (4, 56) else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", **dtype_kw)
    model.to(device)
    model.eval()
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        sys.exit("error: could not select eager attention, which this script hooks")

    cur = {}  # name -> tensor of the step being run

    def keep(name, t):
        cur[name] = t.detach().to(device="cpu", dtype=torch.float32).contiguous()

    def first_tensor(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    inner = model.model
    handles = []
    handles.append(inner.embed_tokens.register_forward_hook(lambda m, a, o: keep("embed", o[0])))

    parts = {}  # (layer, part) -> tensor, for the concatenated ones

    def out_hook(layer, part):
        def h(m, a, o):
            parts[(layer, part)] = first_tensor(o)[0]

        return h

    def in_hook(name):
        def h(m, a, kw):
            x = a[0] if a else next(iter(kw.values()))
            keep(name, x[0])

        return h

    for i, layer in enumerate(inner.layers):
        at, mlp = layer.self_attn, layer.mlp
        for part, mod in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj), ("gate", mlp.gate_proj), ("up", mlp.up_proj)):
            handles.append(mod.register_forward_hook(out_hook(i, part)))
        handles.append(at.o_proj.register_forward_pre_hook(in_hook(f"layers.{i}.attn"), with_kwargs=True))
        handles.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                in_hook(f"layers.{i}.attn_residual"), with_kwargs=True
            )
        )
        handles.append(mlp.down_proj.register_forward_pre_hook(in_hook(f"layers.{i}.act"), with_kwargs=True))
        handles.append(
            layer.register_forward_hook(lambda m, a, o, i=i: keep(f"layers.{i}.out", first_tensor(o)[0]))
        )

    orig_attention = mq.eager_attention_forward

    def recording_attention(module, query, key, value, *a, **kw):
        i = module.layer_idx
        # query [B, Hq, T, D] -> [T, Hq*D]; key/value [B, Hkv, L, D] -> [L, Hkv, D]
        q = query[0].transpose(0, 1)
        keep(f"layers.{i}.q", q.reshape(q.shape[0], -1))
        keep(f"layers.{i}.k_cache", key[0].transpose(0, 1))
        keep(f"layers.{i}.v_cache", value[0].transpose(0, 1))
        return orig_attention(module, query, key, value, *a, **kw)

    mq.eager_attention_forward = recording_attention

    tensors = {}
    n_layers = len(inner.layers)

    def finish_step(step, step_ids, logits):
        for i in range(n_layers):
            keep(f"layers.{i}.qkv", torch.cat([parts[(i, p)] for p in ("q", "k", "v")], dim=-1))
            keep(f"layers.{i}.gate_up", torch.cat([parts[(i, p)] for p in ("gate", "up")], dim=-1))
            if f"layers.{i}.q" not in cur:
                sys.exit(
                    f"error: layer {i}'s attention was not captured: this transformers version "
                    f"({transformers.__version__}) does not call modeling_qwen3.eager_attention_forward"
                )
        keep("logits", logits[0])
        for name, t in cur.items():
            tensors[f"{step}.{name}"] = t
        tensors[f"{step}.tokens"] = torch.tensor(step_ids, dtype=torch.int64)
        cur.clear()
        parts.clear()

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        finish_step("prefill", ids, out.logits)
        cache = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        for k in range(1, args.steps + 1):
            out = model(
                input_ids=torch.tensor([[nxt]], device=device),
                past_key_values=cache,
                use_cache=True,
            )
            finish_step(f"decode-{k}", [nxt], out.logits)
            cache = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())

    mq.eager_attention_forward = orig_attention
    for h in handles:
        h.remove()

    path = args.out
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "activations.safetensors")
    meta = {
        "format": "qwen-activations/1",
        "source": "hf-transformers",
        "backend": f"torch {torch.__version__} {device} {args.dtype}",
        "transformers": transformers.__version__,
        "tensor_cores": "false",
        "model": args.model,
        "steps": str(args.steps),
        "prompt": prompt,
    }
    save_file(tensors, path, metadata=meta)
    print(f"wrote {len(tensors)} tensors ({len(ids)} prompt tokens, {args.steps} decode steps) to {path}")


if __name__ == "__main__":
    main()
