"""
GPT-2 in PyTorch: the reference the NumPy and CUDA trainers are checked against,
as llm.c's train_gpt2.py is for llm.c's C and CUDA code.

It trains a few steps and writes the bridge files (llm.c's formats, through the
writers in llmc/formats.py) into the current directory:
  gpt2_tokenizer.bin            the GPT-2 vocabulary (tiktoken), for decoding samples
  gpt2_<size>.bin               the weights as loaded or initialised, fp32 (version 3)
  gpt2_<size>_bf16.bin          the same weights in bf16 (version 5)
  gpt2_<size>_debug_state.bin   x, y, logits, loss and all 16 gradients of step 0,
                                plus the loss of every training step and the optimizer settings

  python train_gpt2_torch.py --model gpt2    # OpenAI's GPT-2 124M (downloads via transformers)
  python train_gpt2_torch.py --model d12     # same shapes, random init, seeded: works offline
  python train_gpt2_torch.py --n_layer 2 --n_head 2 --n_embd 32 --block_size 32 \\
      --batch_size 2 --sequence_length 16 --total_batch_size 32    # a tiny shape for tests
  torchrun --standalone --nproc_per_node=2 train_gpt2_torch.py ...  # DDP (gloo on the CPU)
"""

import argparse
import math
import os
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from llmc import formats  # llm.c's file formats (readers and writers)
from llmc.model import (GPT2Config, GPT3_WIDTHS, MODEL_DEPTHS, descriptor_config, num_parameters, padded_vocab,
                         padding_note, param_shapes)
from llmc.dataloader import DataLoader
from llmc.logger import Logger
from llmc.schedulers import get_lr
from llmc.tokenizer import gpt2_encoding
from llmc.utils import ConfigError, FormatError, WriteError, has_magic, refuse_foreign_files

# ----------------------------------------------------------------------------
# the model, nanoGPT-style


class NewGELU(nn.Module):
    """GELU, tanh approximation: the one OpenAI's GPT-2 uses."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.LLMC_RESIDUAL_SCALE_FLAG = 1  # init std 0.02/sqrt(2L): it feeds the residual stream
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.flash = config.flash
        # the causal mask (a buffer, not a parameter; "bias" is the OpenAI/HF name for it)
        self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                             .view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        NH, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x)                                  # (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)               # 3 x (B, T, C)
        q = q.view(B, T, NH, hs).transpose(1, 2)              # (B, T, C) -> (B, NH, T, hs)
        k = k.view(B, T, NH, hs).transpose(1, 2)              # (B, T, C) -> (B, NH, T, hs)
        v = v.view(B, T, NH, hs).transpose(1, 2)              # (B, T, C) -> (B, NH, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, NH, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))       # (B, NH, T, T)
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v                                       # (B, NH, T, T) x (B, NH, T, hs) -> (B, NH, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)      # (B, NH, T, hs) -> (B, T, C): heads side by side
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = NewGELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.LLMC_RESIDUAL_SCALE_FLAG = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))           # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LN: normalise, transform, add back to the residual stream
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024  # maxT
    vocab_size: int = 50257  # V
    n_layer: int = 12       # L
    n_head: int = 12        # NH
    n_embd: int = 768       # C
    flash: int = 0          # attention through F.scaled_dot_product_attention


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),   # (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),   # (maxT, C)
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.LLMC_SKIP_INIT = 1  # tied to wte, which is initialised as an embedding
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one (V, C) tensor, two uses
        # llm.c's init, from a generator of its own so the weights do not depend on anything
        # else drawn from torch's global RNG. apply() visits modules children-first, in
        # definition order: wte, wpe, then each block's c_attn, c_proj, c_fc, c_proj.
        self.init_rng = torch.Generator()
        self.init_rng.manual_seed(42)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "LLMC_RESIDUAL_SCALE_FLAG"):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            if not hasattr(module, "LLMC_SKIP_INIT"):
                torch.nn.init.normal_(module.weight, mean=0.0, std=std, generator=self.init_rng)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=self.init_rng)
        # nn.LayerNorm keeps its own init: weight 1, bias 0

    def forward(self, idx, targets=None, return_logits=True):
        B, T = idx.size()
        assert T <= self.config.block_size, f"cannot forward T={T}, block size is {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)     # (B, T, C) + (T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)                                    # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:  # inference: only the last position is needed
            logits = self.lm_head(x[:, [-1], :])                        # (B, 1, V)
            loss = None
        if not return_logits:
            logits = None
        return logits, loss

    @classmethod
    def from_pretrained(cls, model_type, flash=0, shape=None):
        """OpenAI's GPT-2 weights through Hugging Face transformers (downloaded once, then cached), or a local
        transformers GPT-2 directory (e.g. dev/eval/export_hf.py's) when shape, its config's sizes, is given."""
        print(f"loading weights from pretrained gpt: {model_type}")
        if not hf_reachable():  # use the local cache only, instead of minutes of retries
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import GPT2LMHeadModel
            model_hf = GPT2LMHeadModel.from_pretrained(model_type)
        except Exception as e:  # offline, no cache, proxy, ...: all end the same way
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            same = SAME_SHAPE.get(model_type, "d12")
            raise SystemExit(f"could not load the {model_type} weights from Hugging Face ({type(e).__name__}: "
                             f"{reason}); offline? run python train_gpt2_torch.py --model {same} "
                             f"(same shapes, random init)")
        model = cls(GPTConfig(**(shape or PRETRAINED[model_type]), flash=flash))
        sd, sd_hf = model.state_dict(), model_hf.state_dict()
        keys = [k for k in sd if not k.endswith(".attn.bias")]
        keys_hf = [k for k in sd_hf if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        assert sorted(keys) == sorted(keys_hf), "transformers' GPT-2 has different parameter names"
        # OpenAI's checkpoints use a "Conv1D" module that stores (in, out): transpose to nn.Linear's (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert w.shape == sd[k].shape, f"{k}: {tuple(w.shape)} != {tuple(sd[k].shape)}"
                sd[k].copy_(w)
        return model

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Extend idx (B, t) by max_new_tokens sampled tokens (no KV cache: re-run the whole window)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature                   # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)       # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, zero_stage):
        # decay the 2-D tensors (matmul weights, embeddings), not the biases and LayerNorms
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": nodecay, "weight_decay": 0.0}]
        print0(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        print0(f"num non-decayed parameter tensors: {len(nodecay)}, with {sum(p.numel() for p in nodecay):,} "
               "parameters")
        use_fused = device_type == "cuda"
        print0(f"using fused AdamW: {use_fused}")
        if zero_stage == 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            print0("using ZeroRedundancyOptimizer")
            opt = ZeroRedundancyOptimizer(**groups[0], optimizer_class=torch.optim.AdamW,
                                          lr=learning_rate, betas=betas, eps=1e-8, fused=use_fused)
            opt.add_param_group(groups[1])
            return opt
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, fused=use_fused)


def hf_reachable(timeout=5):
    """Can we open a connection to the Hugging Face hub? (Assume yes behind a proxy.)"""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


# the shapes --model knows: llm.c's dN (random init; MODEL_DEPTHS, L: (NH, C)) and
# OpenAI's four (weights downloaded), each the shape of one dN
DEPTHS = {f"d{L}": dict(n_layer=L, n_head=NH, n_embd=C) for L, (NH, C) in MODEL_DEPTHS.items()}
# and llm.c's GPT-3 shapes by width (random init, maxT 2048), written as gpt2_gpt3_c768.bin ...: a GPT-2 of that shape
GPT3_SHAPES = {name: dict(n_layer=c.num_layers, n_head=c.num_heads, n_embd=c.channels, block_size=c.max_seq_len)
               for name, c in ((f"gpt3:c{C}", descriptor_config(f"gpt3:c{C}")) for C in GPT3_WIDTHS)}
SAME_SHAPE = {"gpt2": "d12", "gpt2-medium": "d24", "gpt2-large": "d36", "gpt2-xl": "d48"}
PRETRAINED = {name: dict(DEPTHS[same]) for name, same in SAME_SHAPE.items()}
# file names use the parameter count, as llm.c does ("355M", not "350M")
PRETRAINED_SIZE = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}

# ----------------------------------------------------------------------------
# the bridge to llm.c's files: parameters and gradients as one flat float32 buffer


def llmc_sources(model):
    """llm.c's 16 tensor names -> the torch tensors that make them up, stacked along L."""
    t, h = model.transformer, model.transformer.h
    return {
        "wte": [t.wte.weight], "wpe": [t.wpe.weight],
        "ln1w": [b.ln_1.weight for b in h], "ln1b": [b.ln_1.bias for b in h],
        "qkvw": [b.attn.c_attn.weight for b in h], "qkvb": [b.attn.c_attn.bias for b in h],
        "attprojw": [b.attn.c_proj.weight for b in h], "attprojb": [b.attn.c_proj.bias for b in h],
        "ln2w": [b.ln_2.weight for b in h], "ln2b": [b.ln_2.bias for b in h],
        "fcw": [b.mlp.c_fc.weight for b in h], "fcb": [b.mlp.c_fc.bias for b in h],
        "fcprojw": [b.mlp.c_proj.weight for b in h], "fcprojb": [b.mlp.c_proj.bias for b in h],
        "lnfw": [t.ln_f.weight], "lnfb": [t.ln_f.bias],
    }


def flat_views(model, flat):
    """Yield (torch tensor, its slice of `flat`) in llm.c's checkpoint order (param_shapes).
    wte's slice covers only its first V rows; rows V..Vp-1 are the zero padding."""
    sources = llmc_sources(model)
    offset = 0
    for name, shape in param_shapes(llmc_config(model.config)):
        pos = offset
        for p in sources[name]:
            yield p, flat[pos:pos + p.numel()]
            pos += p.numel()
        offset += int(np.prod(shape))
    assert offset == flat.size


def flat_tensors(model, grads=False):
    """The model's parameters (or their gradients) as one flat float32 array in llm.c's
    checkpoint order, wte zero-padded from V to Vp rows: what the .bin files hold."""
    flat = np.zeros(num_parameters(llmc_config(model.config)), dtype=np.float32)
    for p, view in flat_views(model, flat):
        x = p.grad if grads else p
        if x is not None:  # no gradient yet: zeros
            view[:] = x.detach().float().cpu().reshape(-1).numpy()
    return flat


@torch.no_grad()
def load_flat_tensors(model, flat):
    """The inverse of flat_tensors: copy llm.c's flat parameters (e.g. from
    formats.read_model_file) into the model; the padding rows of wte are dropped."""
    for p, view in flat_views(model, flat):
        p.copy_(torch.from_numpy(np.ascontiguousarray(view)).view_as(p))


def model_from_file(path, flash=0):
    """A GPT with the weights of an llm.c model file (fp32 v3 or bf16 v5)."""
    lc, flat = formats.read_model_file(path)
    model = GPT(GPTConfig(block_size=lc.max_seq_len, vocab_size=lc.vocab_size, n_layer=lc.num_layers,
                          n_head=lc.num_heads, n_embd=lc.channels, flash=flash))
    load_flat_tensors(model, flat)
    return model


def llmc_config(c):
    return GPT2Config(max_seq_len=c.block_size, vocab_size=c.vocab_size, num_layers=c.n_layer,
                      num_heads=c.n_head, channels=c.n_embd,
                      padded_vocab_size=padded_vocab(c.vocab_size))


def write_tokenizer(enc, filename):
    """gpt2_tokenizer.bin: the bytes of every GPT-2 token (not always valid UTF-8), EOT 50256."""
    n = enc.max_token_value + 1
    tokens = [enc.decode_bytes([i]) for i in range(n)]
    formats.write_tokenizer_file(filename, tokens, enc.eot_token)
    print(f"wrote {filename}")


# ----------------------------------------------------------------------------
# data: llm.c's shards (magic 20240520) through DataLoader, read strictly in order


def data_loader(pattern, B, T, process_rank, num_processes, vocab_size):
    """DataLoader without shuffling (llm.c's train_gpt2.py does not shuffle), after
    checking that every token of every shard lies inside the model's vocabulary."""
    try:
        loader = DataLoader(pattern, B, T, process_rank, num_processes, should_shuffle=False)
    except ConfigError as e:  # its message names the trainers' -b/-t; here they are spelled out
        raise SystemExit(str(e).replace("-b/-t", "--batch_size/--sequence_length"))
    if vocab_size < 2**16:
        for fname in loader.files:
            tokens = formats.read_data_shard(fname)
            if len(tokens) and int(tokens.max()) >= vocab_size:
                raise SystemExit(f"{fname}: token {int(tokens.max())} is outside the model's vocabulary "
                                 f"(V={vocab_size}); use a data file made for it or a bigger --vocab_size")
    print0(f"DataLoader: total number of tokens: {loader.num_tokens:,} across {len(loader.files)} files")
    return loader


def next_batch(loader, device):
    """The loader's next (inputs, targets), each (B, T), as torch int64 tensors on `device`."""
    x, y = loader.next_batch()
    return torch.from_numpy(x).long().to(device), torch.from_numpy(y).long().to(device)


# ----------------------------------------------------------------------------
# main


master_process = True


def print0(*args, **kwargs):
    """Print on rank 0 only (the master process), as every DDP-aware script does."""
    if master_process:
        print(*args, **kwargs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPT-2 in PyTorch; writes llm.c's .bin files")
    # file system input / output
    p.add_argument("--input_bin", type=str, default="data/tinyshakespeare/tiny_shakespeare_val.bin",
                   help="input .bin (glob) to train on")
    p.add_argument("--input_val_bin", type=str, default="", help="input .bin (glob) to eval validation loss on")
    p.add_argument("--output_dir", type=str, default="",
                   help="output directory for main.log (the .bin files go to the current directory)")
    p.add_argument("--model", type=str, default="gpt2",
                   help="gpt2|gpt2-medium|gpt2-large|gpt2-xl (OpenAI weights), d6|d12|d24|d36|d48 or "
                        "gpt3:c384|c768|...|c12288 (random init: GPT-2's depths, GPT-3's widths), "
                        "or a transformers GPT-2 directory (e.g. dev/eval/export_hf.py's)")
    # explicit shapes (random init); any of them given -> named L{n_layer}H{n_head}C{n_embd}T{block_size}
    p.add_argument("--n_layer", type=int, default=None, help="L, number of layers")
    p.add_argument("--n_head", type=int, default=None, help="NH, number of attention heads")
    p.add_argument("--n_embd", type=int, default=None, help="C, channels")
    p.add_argument("--block_size", type=int, default=None, help="maxT, longest sequence the model takes")
    p.add_argument("--vocab_size", type=int, default=None, help="V (for tests; default 50257, GPT-2's)")
    # token layout for each step of the optimization
    p.add_argument("--batch_size", type=int, default=4, help="batch size B, in number of sequences")
    p.add_argument("--sequence_length", type=int, default=64, help="sequence length T")
    p.add_argument("--total_batch_size", type=int, default=256, help="total desired batch size, in tokens")
    # workload (number of steps)
    p.add_argument("--num_iterations", type=int, default=10, help="number of iterations to run")
    p.add_argument("--inference_only", type=int, default=0, help="only run inference")
    # optimization
    p.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup_iters", type=int, default=0, help="learning rate warmup iterations")
    p.add_argument("--learning_rate_decay_frac", type=float, default=1.0, help="learning rate decays to lr*frac")
    p.add_argument("--weight_decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="maximum gradient norm")
    # evaluation
    p.add_argument("--val_loss_every", type=int, default=0, help="every how many steps to evaluate val loss?")
    p.add_argument("--val_max_steps", type=int, default=20, help="how many batches of val to average?")
    p.add_argument("--sample_every", type=int, default=0, help="how often to sample from the model?")
    # debugging
    p.add_argument("--overfit_single_batch", type=int, default=1, help="overfit just one batch of data")
    # numerics
    p.add_argument("--tensorcores", type=int, default=0, help="use tensorcores (TF32 matmuls)")
    # memory management
    p.add_argument("--device", type=str, default="", help="by default we autodetect, or set it here")
    p.add_argument("--compile", type=int, default=0, help="torch.compile the model")
    p.add_argument("--flash", type=int, default=0, help="use flash attention (F.scaled_dot_product_attention)")
    p.add_argument("--dtype", type=str, default="float32", help="float32|float16|bfloat16 (autocast, CUDA only)")
    p.add_argument("--zero_stage", type=int, default=0, help="zero redundancy optimizer stage (0/1)")
    # python -> C bridge
    p.add_argument("--write_tensors", type=int, default=1, help="write tensors to disk")
    return p.parse_args(argv)


def hf_directory_shape(path):
    """The sizes in a transformers GPT-2 directory's config.json, as GPTConfig names them."""
    import json
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"--model {path}: a directory without config.json; expected a transformers GPT-2 model")
    with open(config_path) as f:
        hf = json.load(f)
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                vocab_size=hf["vocab_size"])


def model_config(args):
    """(GPTConfig, pretrained name or None, size name used in the file names) from the flags."""
    explicit = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                    block_size=args.block_size, vocab_size=args.vocab_size)
    valid = list(PRETRAINED) + list(DEPTHS) + list(GPT3_SHAPES)
    if os.path.isdir(args.model):                       # a transformers GPT-2 directory (dev/eval/export_hf.py)
        shape = hf_directory_shape(args.model)
        size = "L{n_layer}H{n_head}C{n_embd}T{block_size}".format(**shape)
        if shape["vocab_size"] != 50257:
            size += f"V{shape['vocab_size']}"
        return GPTConfig(**shape, flash=args.flash), args.model, size
    if args.model not in valid:
        raise SystemExit(f"unknown --model {args.model!r}; valid: {', '.join(valid)} "
                         "(or explicit --n_layer --n_head --n_embd --block_size)")
    if all(v is None for v in explicit.values()):
        if args.model in PRETRAINED:
            return GPTConfig(**PRETRAINED[args.model], flash=args.flash), args.model, PRETRAINED_SIZE[args.model]
        if args.model in GPT3_SHAPES:                   # no ":" in a file name: gpt2_gpt3_c768.bin
            return GPTConfig(**GPT3_SHAPES[args.model], flash=args.flash), None, args.model.replace(":", "_")
        return GPTConfig(**DEPTHS[args.model], flash=args.flash), None, args.model
    # explicit shapes start from --model's shape (d12's for the pretrained names) and initialise randomly
    base = DEPTHS.get(args.model) or GPT3_SHAPES.get(args.model) or DEPTHS["d12"]
    shape = {"block_size": 1024, **base, "vocab_size": 50257}
    shape.update({k: v for k, v in explicit.items() if v is not None})
    if min(shape.values()) < 1 or shape["n_embd"] % shape["n_head"] != 0:
        raise SystemExit(f"bad shape {shape}: all sizes must be positive and n_embd a multiple of n_head")
    size = "L{n_layer}H{n_head}C{n_embd}T{block_size}".format(**shape)
    if shape["vocab_size"] != 50257:
        size += f"V{shape['vocab_size']}"
    return GPTConfig(**shape, flash=args.flash), None, size


def main(argv=None):
    global master_process
    args = parse_args(argv)
    B, T = args.batch_size, args.sequence_length
    if args.dtype not in {"float32", "float16", "bfloat16"}:
        raise SystemExit(f"unknown --dtype {args.dtype!r}; valid: float32, float16, bfloat16")
    config, pretrained, size = model_config(args)
    if not 1 <= T <= config.block_size:
        raise SystemExit(f"--sequence_length {T} must be between 1 and the model's block size {config.block_size}")
    if B < 1:
        raise SystemExit(f"--batch_size {B} must be at least 1")
    if args.write_tensors:   # an earlier export's files are replaced, a file of another kind under their names is not
        for name, magic in ((f"gpt2_{size}.bin", formats.MODEL_MAGIC), (f"gpt2_{size}_bf16.bin", formats.MODEL_MAGIC),
                            (f"gpt2_{size}_debug_state.bin", formats.STATE_MAGIC),
                            ("gpt2_tokenizer.bin", formats.TOKENIZER_MAGIC)):
            try:
                refuse_foreign_files([name], lambda path: has_magic(path, magic), formats.KINDS[magic],
                                     "move it away, or run in another folder")
            except WriteError as e:
                raise SystemExit(str(e)) from None

    # DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on the CPU
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        from torch.distributed import init_process_group
        ddp_rank = int(os.environ["RANK"])
        ddp_local_rank = int(os.environ["LOCAL_RANK"])
        ddp_world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available() and not args.device.startswith(("cpu", "mps")):
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
            init_process_group(backend="nccl")
        else:
            device = "cpu"
            init_process_group(backend="gloo")
        master_process = ddp_rank == 0
        zero_stage = args.zero_stage
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
        master_process = True
        zero_stage = 0
        if args.device:
            device = args.device
        elif torch.cuda.is_available():
            device = "cuda"
        elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    print0(f"using device: {device}")
    device_type = "cuda" if "cuda" in device else "cpu"

    # gradient accumulation: total_batch_size tokens per optimizer step
    tokens_per_fwdbwd = B * T * ddp_world_size
    if args.total_batch_size % tokens_per_fwdbwd != 0:
        raise SystemExit(f"--total_batch_size {args.total_batch_size} is not a multiple of B*T*processes = "
                         f"{tokens_per_fwdbwd}; pass --total_batch_size {tokens_per_fwdbwd} (or a multiple)")
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    print0(f"total desired batch size: {args.total_batch_size}")
    print0(f"=> calculated gradient accumulation steps: {grad_accum_steps}")

    # autocast on CUDA only; the export forward/backward below always runs outside it, in fp32
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    ctx = torch.amp.autocast(device_type="cuda", dtype=ptdtype) if device_type == "cuda" else nullcontext()

    torch.manual_seed(42)  # the same on every rank (the weights have their own generator, see GPT)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(42)

    # TF32 only when asked: the exported logits and gradients must be exact fp32
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tensorcores)
    torch.backends.cudnn.allow_tf32 = bool(args.tensorcores)
    torch.set_float32_matmul_precision("high" if args.tensorcores else "highest")

    # the data (checked before the model is built, so a bad file fails fast)
    train_loader = data_loader(args.input_bin, B, T, ddp_rank, ddp_world_size, config.vocab_size)
    val_loader = None
    if args.input_val_bin:
        val_loader = data_loader(args.input_val_bin, B, T, ddp_rank, ddp_world_size, config.vocab_size)

    # the tokenizer: GPT-2's via tiktoken (only for GPT-2's vocabulary)
    enc = None
    if config.vocab_size == 50257:
        enc = gpt2_encoding()
        if master_process and args.write_tensors:
            write_tokenizer(enc, "gpt2_tokenizer.bin")

    # the model
    local = pretrained is not None and os.path.isdir(pretrained)
    model = GPT.from_pretrained(pretrained, flash=config.flash, shape=hf_directory_shape(pretrained) if local else None) \
        if pretrained else GPT(config)
    model.train()
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"model {size}: L={config.n_layer} NH={config.n_head} C={config.n_embd} maxT={config.block_size} "
           f"V={config.vocab_size}, {n_params:,} parameters")
    padded = num_parameters(llmc_config(config))
    print0(f"the .bin files hold {padded:,} parameters: {padding_note(llmc_config(config))}")
    if args.compile:
        import torch._inductor.config as inductor_config
        if hasattr(inductor_config, "coordinate_descent_tuning"):
            inductor_config.coordinate_descent_tuning = True
        print0("compiling the model...")
        model = torch.compile(model)

    # the bridge files: one fp32 forward/backward on the first batch, before any update
    debug = None
    if master_process and args.write_tensors and not args.inference_only:
        x, y = next_batch(train_loader, device)
        logits, loss = model(x, y)
        loss.backward()
        raw = model._orig_mod if hasattr(model, "_orig_mod") else model
        params = flat_tensors(raw)
        lconfig = llmc_config(raw.config)
        for filename, dtype in ((f"gpt2_{size}.bin", "float32"), (f"gpt2_{size}_bf16.bin", "bfloat16")):
            formats.write_model_file(filename, lconfig, params, dtype)
            print0(f"wrote {filename} ({os.path.getsize(filename):,} bytes)")
        del params
        # the debug state is written after training, with the loss of every step; keep its parts
        debug = dict(x=x.cpu().numpy().astype(np.int32), y=y.cpu().numpy().astype(np.int32),
                     logits=logits.detach().float().cpu().numpy(), loss=float(loss.item()),
                     grads=flat_tensors(raw, grads=True))
        del logits, loss
        train_loader.reset()

    # wrap in DDP after the export: its hooks would otherwise all-reduce the export's gradients
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    raw_model = model.module if ddp else model
    raw_model = raw_model._orig_mod if hasattr(raw_model, "_orig_mod") else raw_model

    optimizer = raw_model.configure_optimizers(weight_decay=args.weight_decay, learning_rate=args.learning_rate,
                                               betas=(0.9, 0.95), device_type=device_type, zero_stage=zero_stage)

    logger = Logger(args.output_dir if master_process else "")  # main.log, rank 0 only

    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings, losses = [], []
    for step in range(args.num_iterations + 1):
        t0 = time.time()
        last_step = step == args.num_iterations

        # once in a while: the validation loss
        if args.val_loss_every > 0 and (step % args.val_loss_every == 0 or last_step) and val_loader is not None:
            model.eval()
            val_loader.reset()
            with torch.no_grad():
                val_loss = torch.zeros((), device=device)
                for _ in range(args.val_max_steps):
                    x, y = next_batch(val_loader, device)
                    with ctx:
                        _, loss = model(x, y, return_logits=False)
                    val_loss += loss.detach().float()
                val_loss /= args.val_max_steps
            if ddp:  # each rank read its own batches: the mean over all of them, as for lossf
                import torch.distributed as dist
                dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
            val_loss = float(val_loss)
            print0(f"val loss {val_loss}")
            logger.log_val(step, val_loss)

        # once in a while: a sample from the model, from EOT, top-k 40
        if args.sample_every > 0 and (step % args.sample_every == 0 or last_step) and master_process:
            if enc is None:
                print0("(no sample: the model's vocabulary is not GPT-2's)")
            else:
                model.eval()
                xg = torch.tensor([[enc.eot_token]], dtype=torch.long, device=device)  # (1, 1)
                yg = raw_model.generate(xg, 32, temperature=1.0, top_k=40)
                print0("---------------")
                print0(enc.decode(yg[0].tolist()))
                print0("---------------")

        if last_step:
            break

        # one optimizer step: grad_accum_steps forward/backward passes, clip, AdamW
        model.train()
        optimizer.zero_grad(set_to_none=True)
        if args.overfit_single_batch:
            train_loader.reset()
        lossf = 0.0
        for micro_step in range(grad_accum_steps):
            x, y = next_batch(train_loader, device)
            if ddp:  # all-reduce the gradients only on the last micro step
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with ctx, (torch.no_grad() if args.inference_only else nullcontext()):
                _, loss = model(x, y, return_logits=False)
                loss = loss / grad_accum_steps  # the mean over the micro steps
                lossf += loss.detach()
            if not args.inference_only:
                loss.backward()
        if ddp:
            import torch.distributed as dist
            dist.all_reduce(lossf, op=dist.ReduceOp.AVG)
        lossf = float(lossf)
        if args.inference_only:
            norm = 0.0
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        # linear warmup, then cosine decay to lr * frac (frac 1.0, the default: a constant rate)
        lr = get_lr(step, "cosine", args.learning_rate, args.warmup_iters, args.num_iterations,
                               args.learning_rate_decay_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()
        t1 = time.time()
        tokens_per_second = grad_accum_steps * ddp_world_size * B * T / (t1 - t0)
        print0(f"step {step + 1:4d}/{args.num_iterations} | train loss {lossf:.6f} | norm {norm:.4f} | "
               f"lr {lr:.2e} | ({(t1 - t0) * 1000:.2f} ms | {tokens_per_second:.0f} tok/s)")
        logger.log_train(step, lossf, lr, norm)
        losses.append(lossf)
        if step > 0 and step > args.num_iterations - 20:
            timings.append(t1 - t0)

    if timings:
        print0(f"final {np.mean(timings[-20:]) * 1000:.3f} ms")
    if device_type == "cuda":
        print0(f"peak memory consumption: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB")

    if debug is not None:
        # The step losses go into the debug state only when they are what test_gpt2.py can replay:
        # plain AdamW at a constant learning rate on the one batch (x, y), one forward/backward per step.
        filename = f"gpt2_{size}_debug_state.bin"
        optimizer_settings = dict(learning_rate=args.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8,
                                  weight_decay=args.weight_decay, grad_clip=args.grad_clip)
        why_not = [why for why, bad in (
            (f"{grad_accum_steps} gradient accumulation steps (pass --total_batch_size {B * T})",
             grad_accum_steps != 1),
            ("--overfit_single_batch 0", not args.overfit_single_batch),
            ("--warmup_iters > 0", args.warmup_iters > 0),
            ("--learning_rate_decay_frac != 1", args.learning_rate_decay_frac != 1.0),
            (f"--dtype {args.dtype}", device_type == "cuda" and args.dtype != "float32")) if bad]
        if why_not:
            print0(f"note: not recording the step losses in the debug state, they cannot be replayed on (x, y): "
                   f"{'; '.join(why_not)}")
            losses = []
        if len(losses) > formats.MAX_RECORDED_STEPS:
            print0(f"note: recording the first {formats.MAX_RECORDED_STEPS} step losses only")
        formats.write_debug_state(filename, debug["x"], debug["y"], debug["logits"], debug["loss"],
                                  debug["grads"], losses[:formats.MAX_RECORDED_STEPS],
                                     optimizer_settings)
        print0(f"wrote {filename} ({os.path.getsize(filename):,} bytes)")

    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FormatError, FileNotFoundError, WriteError) as e:
        sys.exit(str(e))
