#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from scratch.

The seeds are committed; this script is how they were made (run it again after changing a
target's input format). Each seed is one valid or nearly valid input of the target's format, so
that the fuzzer starts from the shapes dilu really reads: every request format of the README, small
safetensors files of every dtype, the index of the fixed shards that checkpoint_index_fuzz writes,
DeepSeek text and token ids, the shipped run config, resumable output files, golden config.json files.
Usage: fuzz/make_seeds.py
"""
import hashlib
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")


def write(target, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False)


# ---- request_fuzz: a knobs byte, then one input line ------------------------------------------
def requests():
    ids = [0, 17, 250, 1, 2]
    lines = [
        {"id": "a", "prompt": "The capital of France is", "max_tokens": 64},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "temperature": 0.6, "n": 4},
        {"id": "c", "prompt_token_ids": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True},
        {"id": 7, "prompt_token_ids": [3], "top_p": 0.9, "top_k": -1, "min_p": 0.05, "seed": -3,
         "stop": ["\n\n", "END"], "stop_token_ids": [1], "include_stop_str_in_output": True,
         "logprobs": True, "top_logprobs": 5},
        {"id": "d", "prompt": "x", "logprobs": 3},
        {"id": "e", "messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                              {"type": "text", "text": "part two"}]},
                                 {"role": "assistant", "content": None,
                                  "tool_calls": [{"type": "function",
                                                  "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                                 {"role": "tool", "content": "42"},
                                 {"role": "assistant", "content": "<think>hmm</think>The answer is 42."},
                                 {"role": "user", "content": "Thanks"}]},
        {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "r1", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 512,
                  "max_completion_tokens": 100, "logprobs": True, "top_logprobs": 2, "stream": False,
                  "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}},
        {"custom_id": "f", "method": "POST", "url": "/v1/completions",
         "body": {"model": "r1", "prompt": "Once upon", "max_tokens": 16, "logprobs": 2, "best_of": 1,
                  "echo": False, "frequency_penalty": 0}},
        {"custom_id": "g", "method": "POST", "url": "/v1/completions", "body": {"prompt": [[1, 2, 3]]}},
        {"custom_id": "h", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["one", "two"]}},
        {"id": "dup", "prompt_token_ids": [999999]},
        {"id": "bad", "prompt": "", "stream": True},
    ]
    for i, line in enumerate(lines):
        write("request", bytes([i % 16 | 3]) + dumps(line).encode())
    for raw in ['{"id": "x", "prompt": "\\ud800"}', "[1, 2]", "{not json", "{" * 70 + "}" * 70,
                '{"id": 1e400, "prompt_token_ids": [18446744073709551615]}', '{"custom_id": null}']:
        write("request", b"\x03" + raw.encode())


# ---- safetensors_fuzz: whole .safetensors files ------------------------------------------------
def safetensors(tensors, metadata=None, pad=0):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    f32 = struct.pack("<4f", 1, -2, 3.5, 0)
    write("safetensors", safetensors({"w": ("F32", [2, 2], f32)}, {"format": "pt"}))
    write("safetensors", safetensors({"a": ("BF16", [3], b"\x80\x3f" * 3), "b": ("F16", [1], b"\x00\x3c"),
                                      "c": ("I32", [2], struct.pack("<2i", -1, 7)), "d": ("I64", [1], struct.pack("<q", 5)),
                                      "e": ("U8", [4], b"\x01\x02\x03\x04"), "z": ("F32", [0, 3], b"")}, pad=3))
    write("safetensors", safetensors({"w": ("F8_E4M3", [2, 3], bytes(range(6))),
                                      "w_scale_inv": ("F32", [1, 1], struct.pack("<f", 0.5))}, pad=1))
    write("safetensors", safetensors({}, {"format": "pt"}))


# ---- checkpoint_index_fuzz: model.safetensors.index.json beside the target's fixed shards -------
def index_seeds():
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    full = {"a.weight": s1, "b.bias": s1, "c.weight": s2, "empty": s2}
    write("checkpoint_index", dumps({"metadata": {"total_size": 26}, "weight_map": full}))
    write("checkpoint_index", dumps({"weight_map": {**full, "d": "model-00003-of-00003.safetensors"}}))
    write("checkpoint_index", dumps({"weight_map": {**full, "c.weight": s1}}))
    write("checkpoint_index", dumps({"weight_map": {"a.weight": s1, "b.bias": s1}}))
    write("checkpoint_index", dumps({"weight_map": {**full, "x": "../config.json", "y": "subdir", "z": "notes.txt"}}))


# ---- tokenizer_fuzz: a flags byte, then text (or 3-byte token ids) -----------------------------
def tokenizer_seeds():
    texts = ["Hello, world! The year 2025 has 365 days.", "  leading spaces\n\n\ttabs\r\n",
             "北京是中国的首都。ひらがな カタカナ", "emoji 👍🏽 and accents: café naïve",
             "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\nok</think>",
             "def f(x):\n    return x**2  # comment", "1234567890 3.14159 -42", "a" * 200]
    for i, t in enumerate(texts):
        write("tokenizer", bytes([i % 4]) + t.encode())
    write("tokenizer", b"\x00" + b"\xff\xfe invalid \xc3")
    write("tokenizer", b"\x04" + bytes(range(60)))
    write("tokenizer", b"\x1e" + bytes(range(255, 195, -1)))


# ---- run_config_fuzz: YAML, NUL, one override per line -----------------------------------------
def run_config_seeds():
    with open(os.path.join(ROOT, "configs", "runs", "default.yaml"), "rb") as f:
        default = f.read()
    write("run_config", default)
    write("run_config", default + b"\0batch.max_seqs=8\nparallel.tp=auto\nsampling.temperature=0.6")
    write("run_config", b"parallel: {tp: 2, pp: 2, layer_split: \"30,31\"}\nkv:\n  block_size: 16\n"
                        b"\0output.split_reasoning=yes\nbackend=cpu\ncuda.fp8_gemm=soft")
    write("run_config", b"batch:\n  max_seqs: 0x10\n  max_tokens: +8\nsampling:\n  seed: 18446744073709551615\n")
    write("run_config", b"\0parallel.dp=0\nparallel.ep=auto\nkv.memory_fraction=0.5\nmodel.max_seq_len=4096")


# ---- output_resume_fuzz: output files a run left behind ----------------------------------------
def output_seeds():
    recs = [
        {"id": "a", "text": "x", "token_ids": [1, 2], "finish_reason": "length",
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        {"id": 7, "choices": [{"index": 0, "text": "", "token_ids": [1], "finish_reason": "stop"}]},
        {"id": "batch_req_1", "custom_id": "d", "response": {"status_code": 200, "body": {}}, "error": None},
        {"id": None, "error": {"message": "line 4: not valid JSON", "line": 4}},
        {"id": "batch_req_2", "custom_id": None, "response": {"status_code": 400, "body": None},
         "error": {"code": "invalid_request", "message": "line 5: ...", "param": None, "line": 5}},
    ]
    text = "".join(dumps(r) + "\n" for r in recs)
    write("output_resume", text)
    write("output_resume", text + '{"id": "torn", "text": "hal')
    write("output_resume", text[:-1])
    write("output_resume", "")
    write("output_resume", '{"id": "a"}\nnot json\n{"id": "b"}\n')


# ---- model_config_fuzz: a checkpoint selector byte, then config.json ----------------------------
def model_config_seeds():
    for sel, case in [(0, "r1_fp8"), (1, "v2lite_bf16")]:
        with open(os.path.join(ROOT, "tests", "golden", "data", case, "model", "config.json"), "rb") as f:
            cfg = f.read()
        write("model_config", bytes([sel]) + cfg)
        c = json.loads(cfg)
        c["num_hidden_layers"] += 1  # a tensor missing
        write("model_config", bytes([sel]) + dumps(c).encode())
        c = json.loads(cfg)
        c["hidden_size"] = 1 << 40  # absurd
        write("model_config", bytes([sel]) + dumps(c).encode())


def main():
    # Seeds are made afresh; inputs a fuzzer once crashed on (regress-*) stay, as regression tests.
    for d, _, files in os.walk(CORPUS):
        for f in files:
            if not f.startswith("regress-"):
                os.remove(os.path.join(d, f))
    requests()
    safetensors_seeds()
    index_seeds()
    tokenizer_seeds()
    run_config_seeds()
    output_seeds()
    model_config_seeds()
    for t in sorted(os.listdir(CORPUS)):
        print(f"{t}: {len(os.listdir(os.path.join(CORPUS, t)))} seeds")


if __name__ == "__main__":
    sys.exit(main())
