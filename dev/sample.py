"""
Sample from a GPT-2 model file after a prompt, with a KV cache (NumPy, CPU only).

  python dev/sample.py --model gpt2_d12.bin --prompt "The king said" --max_new_tokens 64
  python dev/sample.py --prompt "Once upon a time" --temperature 0.8 --top_k 40 --seed 7
  python dev/sample.py --prompt_ids 1,2,3 --model tiny.bin      # token ids: any vocabulary, no tiktoken
  python dev/sample.py --kv_cache 0 ...                         # one full forward per token, as train_gpt2.py's generate()

The model is any llm.c model file (version 3 fp32 or version 5 bf16; ours or llm.c's: the same format).
The prompt is encoded with tiktoken's GPT-2 encoding (offline: TIKTOKEN_CACHE_DIR); an empty prompt
starts from <|endoftext|>, as llm.c's samples do. With --prompt_ids tiktoken is never imported: the
tokens are decoded with llm.c's tokenizer file (--tokenizer, gpt2_tokenizer.bin, which train_gpt2_torch.py
writes) when it holds the model's V tokens, as the trainers decode their samples, else printed as ids.
The text is printed as it is generated, then the speed: the prefill (the whole prompt in one forward
pass) and the generated tokens per second.

The KV cache. Without one, every new token runs the whole context through the model again (the
trainers' generate() does, as llm.c: O(t) work per token). The keys and values of a position never
change once computed (attention is causal), so we keep them, per layer, in K and V arrays of shape
(L, B, NH, maxT, hs): the prompt runs once (the prefill, T = prompt length), then each new token runs
alone (T = 1), its query attending to the cached keys of every earlier position. The layers other than
attention treat each position on its own, so train_gpt2.py's layers serve as they are; only the
attention is written here (attention_forward_cached).

Sampling. The logits of the real vocabulary (V of the Vp columns) are divided by --temperature, all but
the --top_k largest set to -inf (0 = keep all), and softmaxed in float32; llm.c's sampler then draws:
sample_mult(probs, random_f32(state)) with the xorshift state seeded by --seed. With llm.c's settings
(temperature 1, no top-k, seed 1337) that is exactly train_gpt2.py's generate() given the same context.
--temperature 0 takes the most likely token (greedy). The model's context is maxT positions: a prompt
that leaves no room for --max_new_tokens is cut to its last tokens, and the script says so.

On a GPU (--device cuda, with CuPy): the same cached forward pass written with array operations that
NumPy and CuPy share (gpt2_forward_cached_xp: LayerNorm, GELU and attention as formulas, the products
as xp.matmul, which CuPy hands to cuBLAS), the parameters and the cache in GPU memory; only the logits
of the last position come back to the host for the sampler. The tests run that very function with NumPy
as xp against the CPU path (train_gpt2.py's layers), so on a GPU only the array module changes.
"""

import argparse
import codecs
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import llmc  # noqa: E402,F401  (first: it picks NumPy's BLAS kernels before NumPy loads)
import numpy as np  # noqa: E402

import train_gpt2 as tg  # noqa: E402
from llmc import run  # noqa: E402
from llmc.formats import read_model_file, read_tokenizer_file  # noqa: E402
from llmc.sampler import random_f32, sample_mult  # noqa: E402
from llmc.utils import ConfigError, FormatError  # noqa: E402

GPT2_VOCAB = 50257
EOT = 50256


# ----------------------------------------------------------------------------
# the cached forward pass

class KVCache:
    """Keys and values of the positions seen so far: k, v (L, B, NH, maxT, hs); `pos` of them are filled."""

    def __init__(self, config, B):
        L, NH, C, maxT = config.num_layers, config.num_heads, config.channels, config.max_seq_len
        self.k = np.zeros((L, B, NH, maxT, C // NH), dtype=np.float32)
        self.v = np.zeros((L, B, NH, maxT, C // NH), dtype=np.float32)
        self.pos = 0


def attention_forward_cached(out, inp, k_cache, v_cache, pos, B, T, C, NH):
    """Causal attention of T new positions pos..pos+T-1 on everything up to them.
    inp (B, T, 3C) = q|k|v of the new positions; k_cache, v_cache (B, NH, maxT, hs) hold positions < pos
    and get the new keys and values at pos..pos+T-1. Query i (position pos+i) attends to keys 0..pos+i.
    out (B, T, C): the heads side by side, as train_gpt2.attention_forward writes them."""
    hs = C // NH
    q, k, v = tg._qkv_heads(inp, B, T, C, NH)                 # 3 x (B, NH, T, hs)
    k_cache[:, :, pos:pos + T] = k
    v_cache[:, :, pos:pos + T] = v
    keys, values = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]        # (B, NH, pos+T, hs)
    preatt = np.matmul(q, keys.transpose(0, 1, 3, 2))        # (B,NH,T,hs) @ (B,NH,hs,pos+T) -> (B,NH,T,pos+T)
    preatt *= 1.0 / np.sqrt(hs)
    future = np.triu(np.ones((T, pos + T), dtype=bool), k=pos + 1)   # key j > pos+i: after query i
    preatt[:, :, future] = -np.inf
    e = np.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att = e / e.sum(axis=-1, keepdims=True)                   # (B, NH, T, pos+T)
    np.matmul(att, values, out=tg._split_heads(out, B, T, NH))   # (B,NH,T,pos+T) @ (B,NH,pos+T,hs) -> (B,T,NH,hs)


def matmul_forward_rows(out, inp, weight, bias, B, T, C, OC):
    """matmul_forward for a handful of rows (decoding: B*T = 1), as NumPy's own product, which OpenBLAS
    runs as a matrix-vector product (sgemv). train_gpt2.matmul_forward cuts the product into sgemm
    blocks, built for B*T in the hundreds: on one row it was several times slower here (d12, 2 busy
    cores: the products of one token took 231 ms that way, 55-110 ms through np.matmul)."""
    out2 = out.reshape(B * T, OC, copy=False)
    np.matmul(inp.reshape(B * T, C), weight.T, out=out2)     # (B*T, C) @ (C, OC) -> (B*T, OC)
    if bias is not None:
        out2 += bias


def gpt2_forward_cached(model, cache, tokens):
    """Logits (B, T, Vp) of the T new tokens (B, T) at positions cache.pos..cache.pos+T-1, the earlier
    positions read from the cache; their keys and values are added to it. train_gpt2.gpt2_forward's
    layers in its order, with fresh (not llm.c-preallocated) buffers, since T changes from call to call."""
    c, p = model.config, model.params
    L, NH, C, Vp = c.num_layers, c.num_heads, c.channels, c.padded_vocab_size
    tokens = np.asarray(tokens, dtype=np.int32)
    B, T = tokens.shape
    pos = cache.pos
    matmul_forward = tg.matmul_forward if B * T >= 8 else matmul_forward_rows
    if pos + T > c.max_seq_len:
        raise ConfigError(f"position {pos + T} is past the model's context of {c.max_seq_len} tokens")
    new = lambda *shape: np.empty(shape, dtype=np.float32)    # noqa: E731
    mean, rstd = new(B, T), new(B, T)                         # LayerNorm's statistics (not needed later)
    ln, qkv, atty, attproj = new(B, T, C), new(B, T, 3 * C), new(B, T, C), new(B, T, C)
    residual2, fch, fch_gelu, fcproj = new(B, T, C), new(B, T, 4 * C), new(B, T, 4 * C), new(B, T, C)
    x = p.wte[tokens] + p.wpe[pos:pos + T]                    # (B, T, C): the encoder at positions pos..
    for l in range(L):
        tg.layernorm_forward(ln, mean, rstd, x, p.ln1w[l], p.ln1b[l], B, T, C)
        matmul_forward(qkv, ln, p.qkvw[l], p.qkvb[l], B, T, C, 3 * C)
        attention_forward_cached(atty, qkv, cache.k[l], cache.v[l], pos, B, T, C, NH)
        matmul_forward(attproj, atty, p.attprojw[l], p.attprojb[l], B, T, C, C)
        tg.residual_forward(residual2, x, attproj, B * T * C)
        tg.layernorm_forward(ln, mean, rstd, residual2, p.ln2w[l], p.ln2b[l], B, T, C)
        matmul_forward(fch, ln, p.fcw[l], p.fcb[l], B, T, C, 4 * C)
        tg.gelu_forward(fch_gelu, fch, B * T * 4 * C)
        matmul_forward(fcproj, fch_gelu, p.fcprojw[l], p.fcprojb[l], B, T, 4 * C, C)
        tg.residual_forward(x, residual2, fcproj, B * T * C)  # x is this layer's residual3
    tg.layernorm_forward(ln, mean, rstd, x, p.lnfw, p.lnfb, B, T, C)
    logits = new(B, T, Vp)
    matmul_forward(logits, ln, p.wte, None, B, T, C, Vp)   # the classifier is wte (tied)
    cache.pos = pos + T
    return logits


# ---- the same on any array module (NumPy or CuPy): for the GPU, where train_gpt2.py's layers (OpenBLAS) cannot go

def layernorm_xp(xp, x, weight, bias):
    """LayerNorm over the last axis, eps 1e-5, biased variance (train_gpt2.layernorm_forward's formula)."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + 1e-5)
    return centered * rstd * weight + bias


def gelu_xp(xp, x):
    """GELU, tanh approximation (train_gpt2.gelu_forward's)."""
    return 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def attention_cached_xp(xp, qkv, k_cache, v_cache, pos, NH):
    """attention_forward_cached with xp: qkv (B, T, 3C) of the new positions -> (B, T, C)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)      # 3 x (B, NH, T, hs)
    k_cache[:, :, pos:pos + T] = k
    v_cache[:, :, pos:pos + T] = v
    keys, values = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]        # (B, NH, pos+T, hs)
    preatt = xp.matmul(q, keys.transpose(0, 1, 3, 2)) * (1.0 / float(np.sqrt(hs)))   # (B, NH, T, pos+T)
    future = xp.asarray(np.triu(np.ones((T, pos + T), dtype=bool), k=pos + 1))
    preatt = xp.where(future, -xp.inf, preatt)
    e = xp.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att = e / e.sum(axis=-1, keepdims=True)
    return xp.matmul(att, values).transpose(0, 2, 1, 3).reshape(B, T, C)   # (B, NH, T, hs) -> (B, T, C)


def gpt2_forward_cached_xp(xp, params, config, cache, tokens):
    """gpt2_forward_cached's logits (B, T, Vp) with the array module xp: params are train_gpt2.views of
    an xp array, cache a KVCache whose k, v are xp arrays, tokens (B, T) on the host."""
    L, NH = config.num_layers, config.num_heads
    tokens = np.asarray(tokens, dtype=np.int32)
    B, T = tokens.shape
    pos = cache.pos
    if pos + T > config.max_seq_len:
        raise ConfigError(f"position {pos + T} is past the model's context of {config.max_seq_len} tokens")
    p = params
    x = p.wte[xp.asarray(tokens)] + p.wpe[pos:pos + T]                       # (B, T, C)
    for l in range(L):
        qkv = xp.matmul(layernorm_xp(xp, x, p.ln1w[l], p.ln1b[l]), p.qkvw[l].T) + p.qkvb[l]
        atty = attention_cached_xp(xp, qkv, cache.k[l], cache.v[l], pos, NH)
        x = x + xp.matmul(atty, p.attprojw[l].T) + p.attprojb[l]             # residual2
        h = gelu_xp(xp, xp.matmul(layernorm_xp(xp, x, p.ln2w[l], p.ln2b[l]), p.fcw[l].T) + p.fcb[l])
        x = x + xp.matmul(h, p.fcprojw[l].T) + p.fcprojb[l]                  # residual3
    cache.pos = pos + T
    return xp.matmul(layernorm_xp(xp, x, p.lnfw, p.lnfb), p.wte.T)           # (B, T, Vp): wte is the classifier


class DeviceModel:
    """The model's parameters on xp's device (one copy of the flat array, with train_gpt2's named views)."""

    def __init__(self, model, xp):
        self.xp, self.config = xp, model.config
        self.params = tg.views(xp.asarray(model.params_memory), model.param_shapes)

    def new_cache(self, B):
        cache = KVCache(self.config, B)
        cache.k, cache.v = self.xp.asarray(cache.k), self.xp.asarray(cache.v)
        return cache

    def last_logits(self, cache, tokens):
        """The logits (Vp,) of the last new position, on the host."""
        logits = gpt2_forward_cached_xp(self.xp, self.params, self.config, cache, tokens)[0, -1]
        return logits if self.xp is np else self.xp.asnumpy(logits)


def uncached_last_logits(model, context):
    """Logits (Vp,) after `context` (a list of ids) by one full forward pass over it, as generate() does."""
    t = len(context)
    tg.gpt2_forward(model, np.asarray(context, dtype=np.int32)[None], None, 1, t)
    return model.acts.logits[0, t - 1]


# ----------------------------------------------------------------------------
# the sampler

def next_token_probs(logits, temperature=1.0, top_k=0):
    """float32 probabilities (V,) from the real vocabulary's logits (V,): divided by the temperature,
    all but the top_k largest dropped (0 = keep all), softmaxed as train_gpt2.softmax_forward does."""
    z = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    if 0 < top_k < z.size:
        dropped = np.argpartition(z, z.size - top_k)[:z.size - top_k]   # the V-k smallest
        z = z.copy()
        z[dropped] = -np.inf
    e = np.exp(z - z.max())
    return e / e.sum()


def sample_token(logits, temperature, top_k, rng_state):
    """The next token from the real vocabulary's logits (V,): greedy at temperature 0, else
    llm.c's sample_mult on next_token_probs with a coin from the xorshift state."""
    if temperature == 0:
        return int(np.argmax(logits))
    return sample_mult(next_token_probs(logits, temperature, top_k), random_f32(rng_state))


def fit_prompt(prompt, max_new_tokens, max_seq_len):
    """(prompt ids that leave room for max_new_tokens in the context, a message or None)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= max_seq_len:
        raise ConfigError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {max_seq_len} tokens: use at most {max_seq_len - 1}")
    room = max_seq_len - max_new_tokens
    if len(prompt) <= room:
        return list(prompt), None
    return list(prompt[-room:]), (f"the prompt has {len(prompt)} tokens and the context {max_seq_len} with "
                                  f"{max_new_tokens} to generate: keeping its last {room} tokens")


def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, seed=1337, kv_cache=True, on_token=None,
             device_model=None):
    """Sample max_new_tokens ids after `prompt` (ids, already fit to the context). on_token(id) is
    called as each one is drawn. device_model: a DeviceModel to run the cached passes on (the GPU).
    Returns (new ids, seconds of the prefill, seconds of the rest)."""
    V = model.config.vocab_size
    rng_state = [seed]
    context, new_tokens = list(prompt), []
    if device_model is not None:
        cache = device_model.new_cache(1)
        step = lambda tokens: device_model.last_logits(cache, [tokens])          # noqa: E731
    elif kv_cache:
        cache = KVCache(model.config, 1)
        step = lambda tokens: gpt2_forward_cached(model, cache, [tokens])[0, -1]  # noqa: E731
    else:
        step = lambda tokens: uncached_last_logits(model, context)                # noqa: E731
    t0 = time.perf_counter()
    logits = step(context)
    t_prefill = time.perf_counter() - t0
    for i in range(max_new_tokens):
        token = sample_token(logits[:V], temperature, top_k, rng_state)
        new_tokens.append(token)
        context.append(token)
        if on_token:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits = step([token])
    return new_tokens, t_prefill, time.perf_counter() - t0 - t_prefill


def token_bytes_from_file(path, V, explicit):
    """The bytes of each of the model's V tokens from llm.c's tokenizer file at `path`, or None (the ids are
    printed) when it is missing, bad or of another vocabulary, with a note when one was to be expected:
    an explicit --tokenizer, or a model with GPT-2's vocabulary."""
    try:
        tokens, _ = read_tokenizer_file(path)
    except (OSError, FormatError) as e:
        problem = f"cannot read it ({e})"
    else:
        if len(tokens) == V:
            return tokens
        problem = f"it has {len(tokens):,} tokens, the model {V:,}"
    if explicit or V == GPT2_VOCAB:
        print(f"note: --tokenizer {path}: {problem}; printing token ids")
    return None


def array_module(device):
    """NumPy for --device cpu, CuPy for cuda (a one-line error where it is missing or there is no GPU)."""
    if device == "cpu":
        return np
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CUDA reports 0 devices")
    except Exception as e:  # noqa: BLE001  (ImportError, no driver, no device: all the same to the user)
        raise ConfigError(f"--device cuda needs CuPy and an NVIDIA GPU ({type(e).__name__}: {str(e).strip()[:100]}); "
                          f"--device cpu samples with NumPy")
    return cupy


# ----------------------------------------------------------------------------
# the command line

def parse_args(argv):
    ap = argparse.ArgumentParser(description="Sample from a GPT-2 model file after a prompt, with a KV cache.")
    ap.add_argument("--model", default="gpt2_124M.bin", help="llm.c model file, fp32 or bf16 (gpt2_d12.bin if the default is missing)")
    ap.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    ap.add_argument("--prompt_ids", default=None,
                    help="the prompt as comma-separated token ids instead (any vocabulary; no tiktoken)")
    ap.add_argument("--tokenizer", default=None,
                    help="with --prompt_ids: llm.c's tokenizer file to decode with (default: gpt2_tokenizer.bin)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = all, as llm.c)")
    ap.add_argument("--seed", type=int, default=1337, help="the xorshift sampler's seed (llm.c: 1337)")
    ap.add_argument("--kv_cache", type=int, default=1, choices=(0, 1), help="0: one full forward per token (no cache)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the cached passes on the GPU with CuPy (always with the cache)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0, got {args.top_k}")
        if not 0 < args.seed < 2**64:                         # xorshift's state 0 stays 0 forever
            raise ConfigError(f"--seed must be in [1, 2^64), got {args.seed}")
        path = run.resolve_checkpoint(args.model)
        config, params = read_model_file(path)
        model = tg.GPT2(config, params)
        V = config.vocab_size
        enc = token_bytes = None
        if args.prompt_ids is not None:                       # ids in, llm.c's tokenizer file out: no tiktoken
            prompt = [int(s) for s in args.prompt_ids.replace(",", " ").split()]
            if any(not 0 <= t < V for t in prompt):
                raise ConfigError(f"--prompt_ids must lie in [0, {V})")
        elif V != GPT2_VOCAB and args.prompt:
            raise ConfigError(f"{path} has a vocabulary of {V} tokens, not GPT-2's {GPT2_VOCAB}: give --prompt_ids")
        elif V == GPT2_VOCAB:                                 # GPT-2's vocabulary: tiktoken encodes and decodes
            from llmc.tokenizer import gpt2_encoding
            try:
                enc = gpt2_encoding()
            except ImportError:
                raise ConfigError("--prompt needs tiktoken (pip install tiktoken); or give the prompt as "
                                  "--prompt_ids, decoded with gpt2_tokenizer.bin") from None
            prompt = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) if args.prompt else []
        else:
            prompt = []
        if not prompt:                                        # llm.c's samples start from <|endoftext|>
            prompt = [EOT if V > EOT else V - 1]              # (a tiny test vocabulary has none: its last id)
        prompt, message = fit_prompt(prompt, args.max_new_tokens, config.max_seq_len)
        xp = array_module(args.device)
        device_model = DeviceModel(model, xp) if xp is not np else None
    except (FormatError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{path}: L={config.num_layers} NH={config.num_heads} C={config.channels} maxT={config.max_seq_len} "
          f"V={V}; {'KV cache' if args.kv_cache or device_model else 'no cache (one full forward per token)'}"
          f"{', on the GPU (CuPy)' if device_model else ''}")
    if message:
        print(message)
    if args.prompt_ids is not None:
        token_bytes = token_bytes_from_file(args.tokenizer or "gpt2_tokenizer.bin", V, args.tokenizer is not None)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # keeps split characters whole
    def show(token):
        if enc is not None:
            print(decoder.decode(enc.decode_single_token_bytes(token)), end="", flush=True)
        elif token_bytes is not None:
            print(decoder.decode(token_bytes[token]), end="", flush=True)
        else:
            print(token, end=" ", flush=True)

    print("---")
    for token in prompt:
        show(token)
    new_tokens, t_prefill, t_gen = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                                            args.seed, bool(args.kv_cache), on_token=show, device_model=device_model)
    print(decoder.decode(b"", final=True) + "\n---")
    n = len(new_tokens)
    rate = (n - 1) / t_gen if n > 1 and t_gen > 0 else float("nan")
    print(f"prefill: {len(prompt)} tokens in {1e3 * t_prefill:.1f} ms; generated {n} tokens in "
          f"{t_prefill + t_gen:.2f} s: {rate:.1f} tokens/s after the first")


if __name__ == "__main__":
    main()
