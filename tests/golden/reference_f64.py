#!/usr/bin/env python3
"""Independent float64 reference of DeepSeek-V3 inference, in numpy only.

Written from the published model (deepseek-ai/DeepSeek-V3, inference/model.py):
MLA attention (optional q LoRA), YaRN rope on interleaved pairs, RMSNorm, dense
SwiGLU MLP for the first `first_k_dense_replace` layers, then MoE layers with
sigmoid scores, `e_score_correction_bias` used only to choose groups
(sum of each group's top-2) and experts, unbiased scores normalised and scaled
by `routed_scaling_factor` to weight them, plus shared experts.

It reads a checkpoint directory in the Hugging Face layout of DeepSeek-R1
(config.json, model.safetensors.index.json, sharded *.safetensors, optional
FP8 block-scaled weights) with its own safetensors parser, so it shares no code
with the safetensors or transformers libraries.  Layers at index >=
num_hidden_layers (the MTP layer) are ignored.

Library use:   m = Reference(model_dir); logits = m.logits(token_ids)  # [T, vocab] float64
Command line:  reference_f64.py MODEL_DIR INPUT.jsonl OUTPUT.jsonl
               (greedy generation, output lines in dilu's format)
"""
import json
import math
import os
import struct
import sys

import numpy as np


# ----------------------------------------------------------------------------- checkpoint reading

def _e4m3fn_table():
    """float32 value of every float8_e4m3fn byte (bias 7, no infinities, 0x7f/0xff are NaN)."""
    t = np.zeros(256, dtype=np.float64)
    for b in range(256):
        s = -1.0 if b & 0x80 else 1.0
        e = (b >> 3) & 0xF
        m = b & 0x7
        if e == 0xF and m == 0x7:
            t[b] = np.nan
        elif e == 0:
            t[b] = s * (m / 8.0) * 2.0 ** -6
        else:
            t[b] = s * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t.astype(np.float32)


E4M3FN = _e4m3fn_table()


def read_safetensors(path):
    """Returns {name: (dtype_string, shape, numpy array)}; values decoded to float32 (FP8 as uint8 codes)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        raw = data[base + b: base + e]
        if dt == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dt == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "F8_E4M3":
            a = np.frombuffer(raw, dtype=np.uint8).copy()
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dt}")
        count = int(np.prod(shape)) if shape else 1
        if a.size != count:
            raise ValueError(f"{path}: tensor {name} has {a.size} values, shape says {shape}")
        out[name] = (dt, list(shape), a.reshape(shape))
    return out


def load_checkpoint(model_dir):
    """Returns (config dict, {name: float64 array}) with FP8 weights dequantized block-wise.

    Dequantization follows DeepSeek's weight_dequant: w = fp8_value * scale_inv, computed in
    float32 (exactly what an FP32 engine gets), for each block of block_size rows x columns."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    raw = {}
    for fn in files:
        raw.update(read_safetensors(os.path.join(model_dir, fn)))
    qc = cfg.get("quantization_config") or {}
    br, bc = qc.get("weight_block_size", [128, 128])
    tensors = {}
    for name, (dt, shape, a) in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if dt == "F8_E4M3":
            s = raw[name + "_scale_inv"][2].astype(np.float32)
            rows, cols = shape
            if list(s.shape) != [-(-rows // br), -(-cols // bc)]:
                raise ValueError(f"{name}_scale_inv has shape {list(s.shape)} for weight {shape}")
            s_full = np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:rows, :cols]
            w = E4M3FN[a] * s_full  # float32 * float32 -> float32
            tensors[name] = w.astype(np.float64)
        else:
            tensors[name] = a.astype(np.float64)
    return cfg, tensors


# ----------------------------------------------------------------------------- model pieces

def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def yarn_mscale(scale, mscale):
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg):
    """Per-pair inverse frequencies (length qk_rope_head_dim/2) and cos/sin multiplier."""
    dim = cfg["qk_rope_head_dim"]
    base = float(cfg.get("rope_theta", 10000.0))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = cfg.get("rope_scaling")
    cos_mult = 1.0
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise ValueError(f"unsupported rope_scaling type {kind}")
        factor = float(rs["factor"])
        orig = rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

        def correction_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        smooth = 1.0 - ramp  # 1: keep the original frequency, 0: divide it by factor
        freqs = freqs / factor * (1.0 - smooth) + freqs * smooth
        # transformers scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim): 1.0 for every
        # DeepSeek config (mscale == mscale_all_dim); DeepSeek's own model.py has no such factor at all.
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            cos_mult = yarn_mscale(factor, float(rs["mscale"])) / yarn_mscale(factor, float(rs["mscale_all_dim"]))
    return freqs, cos_mult


def softmax_scale(cfg):
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_scaling")
    if rs and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale = scale * m * m
    return scale


def apply_rope_interleaved(x, pos, freqs, mult):
    """x [..., T, (H,) dim] with pairs (x[2i], x[2i+1]) rotated by angle pos*freqs[i] (complex multiply)."""
    ang = np.outer(pos.astype(np.float64), freqs)  # [T, dim/2]
    cos, sin = np.cos(ang) * mult, np.sin(ang) * mult
    if x.ndim == 3:  # [T, H, dim]
        cos, sin = cos[:, None, :], sin[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


class Reference:
    def __init__(self, model_dir):
        self.cfg, self.w = load_checkpoint(model_dir)
        c = self.cfg
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.freqs, self.cos_mult = rope_frequencies(c)
        self.scale = softmax_scale(c)
        self.routing_stats = []  # filled by logits(): per MoE decision (expert gap, group gap, hf_fill_agrees)

    # --- blocks
    def _mlp(self, x, p):
        w = self.w
        return (silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T

    def _attention(self, x, i):
        c, w, p = self.cfg, self.w, f"model.layers.{i}.self_attn."
        T = x.shape[0]
        nh, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        kvr = c["kv_lora_rank"]
        if c.get("q_lora_rank"):
            q = rms_norm(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"], self.eps) @ w[p + "q_b_proj.weight"].T
        else:
            q = x @ w[p + "q_proj.weight"].T
        q = q.reshape(T, nh, dn + dr)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        kv = x @ w[p + "kv_a_proj_with_mqa.weight"].T
        latent, k_pe = kv[:, :kvr], kv[:, kvr:]
        pos = np.arange(T)
        q_pe = apply_rope_interleaved(q_pe, pos, self.freqs, self.cos_mult)
        k_pe = apply_rope_interleaved(k_pe, pos, self.freqs, self.cos_mult)  # [T, dr], shared by all heads
        kvb = (rms_norm(latent, w[p + "kv_a_layernorm.weight"], self.eps) @ w[p + "kv_b_proj.weight"].T).reshape(T, nh, dn + dv)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        scores = (np.einsum("thd,shd->hts", q_nope, k_nope) + np.einsum("thd,sd->hts", q_pe, k_pe)) * self.scale
        scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        prob = np.exp(scores)
        prob /= prob.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", prob, v).reshape(T, nh * dv)
        return o @ w[p + "o_proj.weight"].T

    def _moe(self, x, i):
        c, w, p = self.cfg, self.w, f"model.layers.{i}.mlp."
        E, k = c["n_routed_experts"], c["num_experts_per_tok"]
        G, kg = c.get("n_group", 1) or 1, c.get("topk_group", 1) or 1
        if c.get("scoring_func", "sigmoid") != "sigmoid" or c.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError("only scoring_func sigmoid with topk_method noaux_tc is implemented")
        scores = sigmoid(x @ w[p + "gate.weight"].T)  # [T, E] unbiased
        biased = scores + w[p + "gate.e_score_correction_bias"][None, :]
        y = np.zeros_like(x)
        for t in range(x.shape[0]):
            b = biased[t].copy()
            group_gap = float("inf")
            if G > 1:
                gs = np.sort(b.reshape(G, E // G), axis=1)[:, -2:].sum(axis=1)
                order = np.argsort(-gs, kind="stable")
                keep = order[:kg]
                if kg < G:
                    group_gap = float(gs[order[kg - 1]] - gs[order[kg]])
                allowed = np.zeros(G, dtype=bool)
                allowed[keep] = True
                allowed = np.repeat(allowed, E // G)
            else:
                allowed = np.ones(E, dtype=bool)
            masked = np.where(allowed, b, -np.inf)  # DeepSeek's model.py masks with -inf
            order = np.argsort(-masked, kind="stable")
            idx = order[:k]
            expert_gap = float(masked[order[k - 1]] - masked[order[k]]) if k < E else float("inf")
            # transformers fills the dropped groups with 0.0 instead of -inf: note whether that changes the choice
            hf_idx = np.argsort(-np.where(allowed, b, 0.0), kind="stable")[:k]
            agrees = set(idx.tolist()) == set(hf_idx.tolist())
            self.routing_stats.append((expert_gap, group_gap, agrees))
            wt = scores[t, idx]
            if c.get("norm_topk_prob", True):
                wt = wt / wt.sum()
            wt = wt * float(c.get("routed_scaling_factor", 1.0))
            for e, we in zip(idx, wt):
                y[t] += we * self._mlp(x[t:t + 1], f"{p}experts.{e}.")[0]
        if c.get("n_shared_experts"):
            y += self._mlp(x, p + "shared_experts.")
        return y

    def _is_moe(self, i):
        c = self.cfg
        return bool(c.get("n_routed_experts")) and i >= c.get("first_k_dense_replace", 0) \
            and i % c.get("moe_layer_freq", 1) == 0

    def logits(self, tokens):
        """Full causal forward of one sequence; returns [len(tokens), vocab] float64 logits."""
        c, w = self.cfg, self.w
        h = w["model.embed_tokens.weight"][np.asarray(tokens, dtype=np.int64)]
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            h = h + self._attention(rms_norm(h, w[pre + "input_layernorm.weight"], self.eps), i)
            x = rms_norm(h, w[pre + "post_attention_layernorm.weight"], self.eps)
            h = h + (self._moe(x, i) if self._is_moe(i) else self._mlp(x, pre + "mlp."))
        h = rms_norm(h, w["model.norm.weight"], self.eps)
        return h @ w["lm_head.weight"].T


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def generate(ref, prompt, max_tokens, eos_id=None, ignore_eos=True):
    """Greedy decoding that recomputes the whole sequence each step."""
    seq, out = list(prompt), []
    finish = "length"
    for _ in range(max_tokens):
        nxt = int(np.argmax(ref.logits(seq)[-1]))
        out.append(nxt)
        seq.append(nxt)
        if not ignore_eos and eos_id is not None and nxt == eos_id:
            finish = "stop"
            break
    return out, finish


def main(argv):
    if len(argv) != 4:
        print(__doc__)
        return 2
    ref = Reference(argv[1])
    eos = ref.cfg.get("eos_token_id")
    with open(argv[2]) as f, open(argv[3], "w") as g:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            toks, finish = generate(ref, r["prompt_token_ids"], r.get("max_tokens", 16), eos, r.get("ignore_eos", False))
            g.write(json.dumps({"id": r["id"], "token_ids": toks, "finish_reason": finish,
                                "usage": {"prompt_tokens": len(r["prompt_token_ids"]), "completion_tokens": len(toks)}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
