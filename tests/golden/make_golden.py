#!/usr/bin/env python3
"""Builds the golden-parity data of tests/golden/data/.

For every case: a tiny random checkpoint in exactly the layout of deepseek-ai/DeepSeek-R1 on
Hugging Face (config.json, sharded model-0000k-of-0000N.safetensors, model.safetensors.index.json,
BF16 or FP8 e4m3 weights with 128x128 block `weight_scale_inv`), prompts (input.jsonl) and the
greedy continuations of Hugging Face transformers' DeepseekV3ForCausalLM run in float32 on the CPU
(expected.jsonl, with the top-5 logprobs of every generated token).

Every case is checked against reference_f64.py (an independent float64 implementation): same greedy
tokens, logprobs within tolerance, top-1/top-2 margin and router decision gaps far above float32
error.  A case that is too close to a tie is regenerated with another seed.

Run it where torch, transformers, safetensors and numpy exist (see README.md):
    python3 make_golden.py --out DIR [--notes FILE] [--cases a,b]
Without transformers (`--no-hf`) the float64 reference stands in for it (a dry run of the plumbing).
"""
import argparse
import inspect
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_f64 as ref64  # noqa: E402

MARGIN_MIN = 5e-3        # top-1 minus top-2 logprob along every greedy path
ROUTING_GAP_MIN = 5e-5   # k-th minus (k+1)-th biased router score (and group score)
LOGPROB_TOL = 1e-3       # HF float32 vs float64 reference, hard limit (expect ~1e-5)
ATTEMPTS = 8

R1_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 4096, "type": "yarn"}


def yarn(factor, original):
    return {"beta_fast": 32, "beta_slow": 1, "factor": factor, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": original, "type": "yarn"}


# Prompts: (prompt length, max_tokens, ignore_eos).  The "eos" prompt gets ignore_eos false and an
# eos_token_id chosen so that it stops mid-way.
BASE_PROMPTS = [(1, 24, True), (5, 32, True), (40, 16, True), (17, 1, True)]

CASES = [
    dict(name="r1_fp8", about="R1 layout in FP8 (block-scaled e4m3, partial blocks: hidden 144, kv_a 144 rows), q LoRA, grouped noaux_tc "
                             "routing (4 groups, top-2 groups), R1 YaRN (factor 40, original 4096), MTP layer 3 present",
         dtype="fp8", seed=101, shards=3, mtp=True,
         cfg=dict(vocab_size=256, hidden_size=144, intermediate_size=200, moe_intermediate_size=32,
                  num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=136, kv_lora_rank=112,
                  qk_rope_head_dim=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                  rope_scaling=R1_YARN, max_position_embeddings=163840)),
    dict(name="r1_bf16_eos", about="R1 layout in BF16, q LoRA, grouped routing (4 groups of 4, top-2 groups, 4 experts "
                                  "per token), R1 YaRN; prompt p4 stops on eos_token_id",
         dtype="bf16", seed=202, shards=2, eos_prompt=(12, 24),
         cfg=dict(vocab_size=384, hidden_size=96, intermediate_size=192, moe_intermediate_size=16,
                  num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=64,
                  qk_rope_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                  rope_scaling=R1_YARN, max_position_embeddings=163840)),
    dict(name="v2lite_bf16", about="V2-Lite style attention (q_lora_rank null, q_proj) in BF16, ungrouped routing "
                                  "(n_group 1), 2 shared experts, no rope scaling",
         dtype="bf16", seed=303, shards=2,
         cfg=dict(vocab_size=320, hidden_size=96, intermediate_size=160, moe_intermediate_size=32,
                  num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64,
                  qk_rope_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                  n_shared_experts=2, rope_scaling=None, max_position_embeddings=4096)),
    dict(name="v2lite_fp8", about="q_lora_rank null (q_proj) in FP8 with partial blocks (hidden 200, kv_a 96 rows), "
                                 "ungrouped routing, no rope scaling",
         dtype="fp8", seed=404, shards=2,
         cfg=dict(vocab_size=256, hidden_size=200, intermediate_size=264, moe_intermediate_size=40,
                  num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=80,
                  qk_rope_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                  rope_scaling=None, max_position_embeddings=2048)),
    dict(name="fp8_ungrouped_yarn", about="FP8, q LoRA (rank 136), ungrouped routing over 12 experts, 2 dense layers of 3, "
                                         "YaRN factor 8 on original 128 (ramp inside the rope dims)",
         dtype="fp8", seed=505, shards=4,
         cfg=dict(vocab_size=320, hidden_size=144, intermediate_size=272, moe_intermediate_size=40,
                  num_hidden_layers=3, first_k_dense_replace=2, q_lora_rank=136, kv_lora_rank=144,
                  qk_rope_head_dim=16, n_routed_experts=12, num_experts_per_tok=3, n_group=1, topk_group=1,
                  rope_scaling=yarn(8, 128), max_position_embeddings=1024)),
    dict(name="fp8_w256", about="FP8 with every width a multiple of 128 (hidden 256, q LoRA 256, kv_a 256 rows, "
                               "MLP 512, experts 128), so that the block-scaled FP8 GEMM of the CUDA backend runs "
                               "q_a, q_b, kv_a, o_proj and the MLPs; grouped routing, R1 YaRN",
         dtype="fp8", seed=707, shards=2,
         cfg=dict(vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=224,
                  qk_rope_head_dim=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                  rope_scaling=R1_YARN, max_position_embeddings=163840)),
    dict(name="bf16_grouped_yarn", about="BF16, q_lora_rank null, grouped routing with 8 groups of 2 (top-3 groups), "
                                        "YaRN factor 4 on original 64",
         dtype="bf16", seed=606, shards=2,
         cfg=dict(vocab_size=320, hidden_size=96, intermediate_size=192, moe_intermediate_size=16,
                  num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=48,
                  qk_rope_head_dim=16, n_routed_experts=16, num_experts_per_tok=3, n_group=8, topk_group=3,
                  rope_scaling=yarn(4, 64), max_position_embeddings=256)),
]


# ----------------------------------------------------------------------------- config

def make_config(case):
    c = case["cfg"]
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": c["first_k_dense_replace"],
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "kv_lora_rank": c["kv_lora_rank"],
        "max_position_embeddings": c["max_position_embeddings"],
        "model_type": "deepseek_v3",
        "moe_intermediate_size": c["moe_intermediate_size"],
        "moe_layer_freq": 1,
        "n_group": c["n_group"],
        "n_routed_experts": c["n_routed_experts"],
        "n_shared_experts": c.get("n_shared_experts", 1),
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": c["num_experts_per_tok"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 1 if case.get("mtp") else 0,
        "pretraining_tp": 1,
        "q_lora_rank": c["q_lora_rank"],
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": c["qk_rope_head_dim"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": c["rope_scaling"],
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": c["topk_group"],
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": c["vocab_size"],
    }
    if case["dtype"] == "fp8":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    rs = cfg["rope_scaling"]
    if rs:
        assert cfg["max_position_embeddings"] == rs["factor"] * rs["original_max_position_embeddings"]
    return cfg


# ----------------------------------------------------------------------------- tensors

def tensor_specs(cfg, with_mtp):
    """[(name, shape, kind)] in checkpoint order; kind: embed, norm, linear (FP8-able), router, bias, head, proj."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    specs = [("model.embed_tokens.weight", [V, H], "embed")]

    def layer(i):
        p = f"model.layers.{i}."
        out = [(p + "input_layernorm.weight", [H], "norm")]
        a = p + "self_attn."
        if cfg["q_lora_rank"]:
            r = cfg["q_lora_rank"]
            out += [(a + "q_a_proj.weight", [r, H], "linear"), (a + "q_a_layernorm.weight", [r], "norm"),
                    (a + "q_b_proj.weight", [nh * (dn + dr), r], "linear")]
        else:
            out += [(a + "q_proj.weight", [nh * (dn + dr), H], "linear")]
        kvr = cfg["kv_lora_rank"]
        out += [(a + "kv_a_proj_with_mqa.weight", [kvr + dr, H], "linear"), (a + "kv_a_layernorm.weight", [kvr], "norm"),
                (a + "kv_b_proj.weight", [nh * (dn + dv), kvr], "linear"), (a + "o_proj.weight", [H, nh * dv], "linear"),
                (p + "post_attention_layernorm.weight", [H], "norm")]

        def mlp(q, inter):
            return [(q + "gate_proj.weight", [inter, H], "linear"), (q + "up_proj.weight", [inter, H], "linear"),
                    (q + "down_proj.weight", [H, inter], "linear")]
        if i < cfg["first_k_dense_replace"]:
            out += mlp(p + "mlp.", cfg["intermediate_size"])
        else:
            E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            out += [(p + "mlp.gate.weight", [E, H], "router"), (p + "mlp.gate.e_score_correction_bias", [E], "bias")]
            for e in range(E):
                out += mlp(f"{p}mlp.experts.{e}.", I)
            out += mlp(p + "mlp.shared_experts.", I * cfg["n_shared_experts"])
        return out

    for i in range(cfg["num_hidden_layers"]):
        specs += layer(i)
    specs += [("model.norm.weight", [H], "norm"), ("lm_head.weight", [V, H], "head")]
    if with_mtp:  # DeepSeek-R1 stores its MTP module as layer num_hidden_layers with these extra tensors
        n = cfg["num_hidden_layers"]
        p = f"model.layers.{n}."
        specs += [(p + "embed_tokens.weight", [V, H], "embed"), (p + "enorm.weight", [H], "norm"),
                  (p + "hnorm.weight", [H], "norm"), (p + "eh_proj.weight", [H, 2 * H], "proj")]
        specs += layer(n)
        specs += [(p + "shared_head.norm.weight", [H], "norm"), (p + "shared_head.head.weight", [V, H], "head")]
    return specs


def master_weights(specs, seed):
    """float32 master weights; scales chosen so that activations stay O(1) and logits are well spread."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape, kind in specs:
        if kind == "embed":
            t = torch.randn(shape, generator=g)
        elif kind == "norm":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif kind in ("linear", "router", "proj"):
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif kind == "head":
            t = torch.randn(shape, generator=g) * (5.0 / math.sqrt(shape[1]))
        elif kind == "bias":
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            raise ValueError(kind)
        w[name] = t.float()
    return w


# FP8 e4m3fn ------------------------------------------------------------------------------------------

HAVE_FP8 = hasattr(torch, "float8_e4m3fn")
_POS_CODES = np.array([c for c in range(0x7f)], dtype=np.uint8)        # 0x00..0x7e: finite non-negative
_POS_VALUES = ref64.E4M3FN[_POS_CODES].astype(np.float64)              # increasing


def fp8_codes(x):
    """float32 tensor (|x| <= 448) -> uint8 e4m3fn codes, round to nearest even."""
    if HAVE_FP8:
        return x.to(torch.float8_e4m3fn).view(torch.uint8)
    a = x.double().numpy()  # fallback for old torch (local dry runs only)
    mag = np.abs(a)
    hi = np.clip(np.searchsorted(_POS_VALUES, mag), 1, len(_POS_VALUES) - 1)
    lo = hi - 1
    dlo, dhi = mag - _POS_VALUES[lo], _POS_VALUES[hi] - mag
    pick = np.where((dhi < dlo) | ((dhi == dlo) & (_POS_CODES[hi] % 2 == 0)), hi, lo)
    codes = _POS_CODES[pick] | np.where(a < 0, 0x80, 0).astype(np.uint8)
    return torch.from_numpy(codes.astype(np.uint8))


def quantize_block_fp8(w, block=128):
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scale = torch.zeros(br, bc, dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            amax = w[i * block:(i + 1) * block, j * block:(j + 1) * block].abs().max().item()
            scale[i, j] = max(amax, 1e-12) / 448.0
    s_full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    codes = fp8_codes((w / s_full).clamp(-448.0, 448.0))
    return codes, scale


def checkpoint_tensors(specs, master, dtype):
    """{name: (safetensors dtype, torch tensor)}: BF16 (bias F32) or, for fp8, linear weights as F8_E4M3 + F32 scale_inv."""
    out = {}
    for name, shape, kind in specs:
        t = master[name]
        if kind == "bias":
            out[name] = ("F32", t.float())
        elif dtype == "fp8" and kind == "linear":
            codes, scale = quantize_block_fp8(t)
            out[name] = ("F8_E4M3", codes)
            out[name + "_scale_inv"] = ("F32", scale)
        else:
            out[name] = ("BF16", t.to(torch.bfloat16))
    return out


def nbytes(dt, t):
    return t.numel() * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dt]


def save_shard(path, tensors):
    """tensors: {name: (dtype, tensor)} -> .safetensors via the safetensors library (own writer if it is absent)."""
    try:
        from safetensors.torch import save_file
        conv = {}
        for n, (dt, t) in tensors.items():
            conv[n] = t.view(torch.float8_e4m3fn) if dt == "F8_E4M3" else t.contiguous()
        save_file(conv, path, metadata={"format": "pt"})
        return
    except ImportError:
        pass
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for n, (dt, t) in tensors.items():
        if dt == "BF16":
            b = t.view(torch.int16).numpy().astype("<i2").tobytes()
        elif dt == "F32":
            b = t.numpy().astype("<f4").tobytes()
        else:
            b = t.numpy().astype(np.uint8).tobytes()
        header[n] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_checkpoint(model_dir, cfg, specs, tensors, n_shards):
    os.makedirs(model_dir, exist_ok=True)
    order = []
    for name, _, _ in specs:
        order.append(name)
        if name + "_scale_inv" in tensors:
            order.append(name + "_scale_inv")
    total = sum(nbytes(*tensors[n]) for n in order)
    shards, cur, acc = [], [], 0
    for n in order:
        cur.append(n)
        acc += nbytes(*tensors[n])
        if acc >= total * (len(shards) + 1) / n_shards and len(shards) < n_shards - 1:
            shards.append(cur)
            cur = []
    if cur:
        shards.append(cur)
    assert len(shards) == n_shards, (len(shards), n_shards)
    weight_map = {}
    for k, names in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_shard(os.path.join(model_dir, fn), {n: tensors[n] for n in names})
        for n in names:
            weight_map[n] = fn
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    write_config(model_dir, cfg)
    return total


def write_config(model_dir, cfg):
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def dequantized_fp32(tensors, num_layers):
    """What HF loads: float32 weights (FP8 dequantized per block exactly as the reference does), no MTP layer."""
    out = {}
    for n, (dt, t) in tensors.items():
        if n.endswith("_scale_inv"):
            continue
        if n.startswith("model.layers.") and int(n.split(".")[2]) >= num_layers:
            continue
        if dt == "F8_E4M3":
            s = tensors[n + "_scale_inv"][1]
            rows, cols = t.shape
            s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
            vals = torch.from_numpy(ref64.E4M3FN[t.numpy()])
            out[n] = (vals * s_full).float().contiguous()
        else:
            out[n] = t.float().contiguous()
    return out


# ----------------------------------------------------------------------------- running the models

class HFRunner:
    def __init__(self, model_dir, notes):
        from transformers import DeepseekV3ForCausalLM
        kw = dict(attn_implementation="eager", output_loading_info=True)
        try:
            model, info = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
        except TypeError:
            model, info = DeepseekV3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kw)
        self.model = model.eval().float()
        self.info = {k: (list(v) if isinstance(v, (set, list, tuple)) else v) for k, v in dict(info).items()}
        self.problems = [f"loading info {k}: {v}" for k, v in self.info.items() if v]
        notes.append(f"  loading info: {self.info}")

    def next_logprobs(self, ids):
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1).numpy().astype(np.float64)


class RefRunner:  # --no-hf: the float64 reference stands in for HF
    problems = []

    def __init__(self, ref):
        self.ref = ref

    def next_logprobs(self, ids):
        return ref64.log_softmax(self.ref.logits(ids)[-1])


def greedy(runner, prompt, max_tokens):
    """Plain loop, full recompute every step.  Returns tokens and the full logprob vector of every step."""
    seq, toks, lps = list(prompt), [], []
    for _ in range(max_tokens):
        lp = runner.next_logprobs(seq)
        t = int(np.argmax(lp))
        toks.append(t)
        lps.append(lp)
        seq.append(t)
    return toks, lps


def describe_hf_internals(runner, ref, cfg, hf_weights, notes, dump_sources):
    """Notes what transformers does (rope, scaling, module layout) and flags differences from the reference."""
    problems = []
    m = runner.model

    def note(label, fn):
        try:
            notes.append(f"  {label}: {fn()}")
        except Exception as e:  # noqa: BLE001 - a missing attribute must not stop the data generation
            notes.append(f"  {label}: <{type(e).__name__}: {e}>")

    note("HF rope type", lambda: getattr(m.model.rotary_emb, "rope_type", "?"))
    note("HF inv_freq", lambda: m.model.rotary_emb.inv_freq.tolist())
    note("ref freqs", lambda: ref.freqs.tolist())
    note("HF rotary attention_scaling (cos/sin multiplier)", lambda: (m.model.rotary_emb.attention_scaling, ref.cos_mult))
    note("HF attn.scaling vs ref softmax scale", lambda: (m.model.layers[0].self_attn.scaling, ref.scale))
    note("HF config.rope_interleave", lambda: getattr(m.config, "rope_interleave", "<absent>"))
    note("HF config.rope_parameters", lambda: getattr(m.config, "rope_parameters", "<absent>"))
    note("HF config.rope_scaling", lambda: getattr(m.config, "rope_scaling", "<absent>"))
    note("HF mlp classes", lambda: (type(m.model.layers[0].mlp).__name__, type(m.model.layers[-1].mlp).__name__,
                                    type(getattr(m.model.layers[-1].mlp, "experts", None)).__name__))
    last = ".layers.%d." % (cfg["num_hidden_layers"] - 1)
    note("HF last-layer parameters", lambda: [f"{n}{list(p.shape)}" for n, p in m.named_parameters() if last in n])
    note("HF last-layer buffers", lambda: [f"{n}{list(b.shape)}" for n, b in m.named_buffers() if last in n])

    def same_named():
        sd = m.state_dict()
        diff = max((float((sd[n].float() - t).abs().max()) for n, t in hf_weights.items() if n in sd), default=0.0)
        return (f"{sum(n in sd for n in hf_weights)} checkpoint tensors under the same name, max abs diff {diff}; "
                f"{len([n for n in hf_weights if n not in sd])} renamed/fused, e.g. "
                f"{[n for n in hf_weights if n not in sd][:3]} -> {[n for n in sd if n not in hf_weights][:6]}")
    note("HF state_dict vs checkpoint", same_named)
    try:
        inv = m.model.rotary_emb.inv_freq.double().numpy()
        rel = float(np.max(np.abs(inv - ref.freqs) / ref.freqs))
        notes.append(f"  HF inv_freq max rel diff vs reference: {rel:.2e}")
        if rel > 1e-6:
            problems.append(f"HF inv_freq differs from the reference (max rel {rel:.2e})")
        sc = float(m.model.layers[0].self_attn.scaling)
        if abs(sc - ref.scale) > 1e-9 * ref.scale:
            problems.append(f"HF attention scaling {sc} != reference {ref.scale}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"could not compare rope/scaling: {type(e).__name__}: {e}")
    if dump_sources:
        import transformers
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mdv3
        from transformers import modeling_rope_utils as mru
        src = [f"# transformers {transformers.__version__}, torch {torch.__version__}"]
        objs = [getattr(mru, "ROPE_INIT_FUNCTIONS", {}).get("yarn"), getattr(mdv3, "DeepseekV3RotaryEmbedding", None),
                getattr(mdv3, "DeepseekV3Attention", None), getattr(mdv3, "DeepseekV3TopkRouter", None),
                getattr(mdv3, "DeepseekV3MoE", None), getattr(mdv3, "DeepseekV3NaiveMoe", None),
                type(getattr(m.model.layers[-1].mlp, "experts", None)),
                getattr(mdv3, "apply_rotary_pos_emb_interleave", None), getattr(mdv3, "yarn_get_mscale", None)]
        seen = set()
        for obj in objs:
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            try:
                src.append(inspect.getsource(obj))
            except (TypeError, OSError) as e:
                src.append(f"# no source for {obj}: {e}")
        dump_sources.write("\n\n".join(src))
    return problems


def build_case(case, seed):
    cfg = make_config(case)
    specs = tensor_specs(cfg, case.get("mtp", False))
    master = master_weights(specs, seed)
    tensors = checkpoint_tensors(specs, master, case["dtype"])
    return cfg, specs, tensors


def make_prompts(case, seed, vocab):
    rng = np.random.default_rng(seed)
    prompts = [(f"p{k}", [int(x) for x in rng.integers(0, vocab, n)], mt, ie)
               for k, (n, mt, ie) in enumerate(BASE_PROMPTS)]
    if case.get("eos_prompt"):
        n, mt = case["eos_prompt"]
        prompts.append((f"p{len(prompts)}", [int(x) for x in rng.integers(0, vocab, n)], mt, False))
    return prompts


def run_case(case, out_root, use_hf, notes, sources_file):
    name = case["name"]
    case_dir = os.path.join(out_root, name)
    for attempt in range(ATTEMPTS):
        seed = case["seed"] + 7919 * attempt
        t0 = time.time()
        if os.path.exists(case_dir):
            shutil.rmtree(case_dir)
        model_dir = os.path.join(case_dir, "model")
        cfg, specs, tensors = build_case(case, seed)
        total = write_checkpoint(model_dir, cfg, specs, tensors, case["shards"])
        ref = ref64.Reference(model_dir)  # reads the files just written, with its own parser
        prompts = make_prompts(case, seed, cfg["vocab_size"])
        problems = []
        if use_hf:
            tmp = tempfile.mkdtemp(prefix=f"hf_{name}_")
            try:
                from safetensors.torch import save_file
                save_file(dequantized_fp32(tensors, cfg["num_hidden_layers"]), os.path.join(tmp, "model.safetensors"),
                          metadata={"format": "pt"})
                hf_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
                hf_cfg["torch_dtype"] = "float32"
                write_config(tmp, hf_cfg)
                t1 = time.time()
                runner = HFRunner(tmp, notes if attempt == 0 else [])
                print(f"  HF loaded in {time.time() - t1:.1f}s", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            problems += runner.problems
            problems += describe_hf_internals(runner, ref, cfg, dequantized_fp32(tensors, cfg["num_hidden_layers"]),
                                              notes if attempt == 0 else [], sources_file if attempt == 0 else None)
            sources_file = None
        else:
            runner = RefRunner(ref)

        results, stats = [], dict(max_diff=0.0, min_margin=float("inf"), min_expert_gap=float("inf"),
                                  min_group_gap=float("inf"), hf_fill_disagree=0, token_mismatch=0)
        for pid, prompt, max_tokens, ignore_eos in prompts:
            toks, lps = greedy(runner, prompt, max_tokens)
            ref.routing_stats = []
            full = ref.logits(prompt + toks)
            for j, t in enumerate(toks):
                rl = ref64.log_softmax(full[len(prompt) - 1 + j])
                srt = np.sort(rl)
                stats["max_diff"] = max(stats["max_diff"], float(np.max(np.abs(rl - lps[j]))))
                stats["min_margin"] = min(stats["min_margin"], float(srt[-1] - srt[-2]))
                if int(np.argmax(rl)) != t:
                    stats["token_mismatch"] += 1
            for eg, gg, agrees in ref.routing_stats:
                stats["min_expert_gap"] = min(stats["min_expert_gap"], eg)
                stats["min_group_gap"] = min(stats["min_group_gap"], gg)
                stats["hf_fill_disagree"] += (not agrees)
            results.append((pid, prompt, max_tokens, ignore_eos, toks, lps))

        reason = None
        if stats["token_mismatch"] or stats["min_margin"] < MARGIN_MIN:
            reason = f"margin {stats['min_margin']:.2e}, {stats['token_mismatch']} token mismatches"
        elif stats["min_expert_gap"] < ROUTING_GAP_MIN or stats["min_group_gap"] < ROUTING_GAP_MIN:
            reason = f"routing gap expert {stats['min_expert_gap']:.2e} group {stats['min_group_gap']:.2e}"
        elif stats["hf_fill_disagree"]:
            reason = f"{stats['hf_fill_disagree']} router decisions depend on the masked_fill value"
        if stats["max_diff"] > 1e-2 or (stats["max_diff"] > LOGPROB_TOL and not reason):
            problems.append(f"logprob difference HF vs f64 {stats['max_diff']:.2e}")
        msg = (f"{name} seed {seed}: {total} bytes, max|dlogprob| {stats['max_diff']:.2e}, min margin "
               f"{stats['min_margin']:.3e}, min gaps expert {stats['min_expert_gap']:.2e} group {stats['min_group_gap']:.2e}, "
               f"{time.time() - t0:.1f}s")
        print(msg, flush=True)
        if reason and attempt + 1 < ATTEMPTS and stats["max_diff"] < 1e-2:
            print(f"  retry: {reason}", flush=True)
            continue
        if reason:
            problems.append(f"gave up: {reason}")
        break

    # EOS: pick the token greedy emits at step >= 5 that it did not emit before; the request stops there.
    eos_id = None
    for r in results:
        if not r[3]:
            toks = r[4]
            for j in range(5, len(toks) - 2):
                if toks[j] not in toks[:j] and toks[j] not in (cfg["bos_token_id"],):
                    eos_id = toks[j]
                    break
            assert eos_id is not None, "no fresh token for EOS"
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
        write_config(model_dir, cfg)
    eos = cfg["eos_token_id"]

    with open(os.path.join(case_dir, "input.jsonl"), "w") as fi, open(os.path.join(case_dir, "expected.jsonl"), "w") as fe:
        for pid, prompt, max_tokens, ignore_eos, toks, lps in results:
            fi.write(json.dumps({"id": pid, "prompt_token_ids": prompt, "max_tokens": max_tokens, "temperature": 0,
                                 "ignore_eos": ignore_eos}) + "\n")
            finish, n = "length", len(toks)
            if not ignore_eos and eos in toks:
                n, finish = toks.index(eos) + 1, "stop"  # like vLLM, the EOS id is the last token
            top = []
            for lp in lps[:n]:
                idx = np.argsort(-lp, kind="stable")[:5]
                top.append([[int(i), round(float(lp[i]), 6)] for i in idx])
            fe.write(json.dumps({"id": pid, "token_ids": toks[:n], "finish_reason": finish, "top_logprobs": top}) + "\n")

    with open(os.path.join(case_dir, "README"), "w") as f:
        f.write(f"{name}: {case['about']}; {case['dtype']}, seed {seed}; expected.jsonl from {versions()} "
                f"(DeepseekV3ForCausalLM, float32, CPU, eager attention, greedy, full recompute).\n")
    stats.update(name=name, seed=seed, bytes=total, eos_token_id=eos, problems=problems)
    return stats, sources_file


def versions():
    v = f"torch {torch.__version__}"
    try:
        import transformers
        v += f", transformers {transformers.__version__}"
    except ImportError:
        v += ", no transformers (float64 reference stood in)"
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per case)")
    ap.add_argument("--notes", help="file for what transformers does internally (sources of the relevant code)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--no-hf", action="store_true", help="dry run: float64 reference instead of transformers")
    ap.add_argument("--sizes", action="store_true", help="print the checkpoint sizes and exit")
    ap.add_argument("--threads", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cases = [c for c in CASES if not a.cases or c["name"] in a.cases.split(",")]
    if a.sizes:
        for c in cases:
            cfg = make_config(c)
            specs = tensor_specs(cfg, c.get("mtp", False))
            n = 0
            for name, shape, kind in specs:
                k = int(np.prod(shape))
                if kind == "bias":
                    n += 4 * k
                elif c["dtype"] == "fp8" and kind == "linear":
                    n += k + 4 * (-(-shape[0] // 128)) * (-(-shape[1] // 128))
                else:
                    n += 2 * k
            print(f"{c['name']}: {n} bytes")
        return 0
    os.makedirs(a.out, exist_ok=True)
    print(versions(), flush=True)
    if HAVE_FP8:  # our e4m3fn decoding table must agree with torch's
        dec = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
        ok = np.isnan(dec) == np.isnan(ref64.E4M3FN)
        ok &= np.where(np.isnan(dec), True, dec == ref64.E4M3FN)
        assert ok.all(), "e4m3fn table mismatch"
    notes = [versions()]
    src_file = open(a.notes + ".src.py", "w") if a.notes else None
    sources = src_file
    summary, bad = [], False
    for c in cases:
        notes.append(f"case {c['name']}:")
        try:
            stats, sources = run_case(c, a.out, not a.no_hf, notes, sources)
        except Exception:  # noqa: BLE001 - report and go on with the other cases
            stats = {"name": c["name"], "problems": ["exception:\n" + traceback.format_exc()]}
        summary.append(stats)
        for p in stats["problems"]:
            print(f"PROBLEM {c['name']}: {p}", flush=True)
            bad = True
    if src_file:
        src_file.close()
    notes.append(json.dumps(summary, indent=1))
    if a.notes:
        with open(a.notes, "w") as f:
            f.write("\n".join(notes) + "\n")
    print("\n".join(notes))
    print("FAILED" if bad else "OK", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
