"""What a run needs before the model loads: context length and memory per device (``sa2va-rl plan``; ``train``
checks the same before loading).

Everything here reads ``config.json`` and the safetensors headers (the shape and dtype of every tensor), never a
weight. The memory estimate is a sum of named parts, each a formula of the run's flags (docs/scale.md has the
formulas, their limits and how they compare with measured peaks):

* ``runtime``: on CPU the process's resident memory before loading (Python, torch, transformers, TRL) plus
  ``CPU_LOOP_GROWTH``; on a GPU 0 (it is not device memory; ``fits`` keeps ``GPU_RESERVE`` free for the CUDA
  context and the allocator's slack).
* ``weights``: every parameter at its training dtype (frozen ones at the compute dtype: bf16 where the run uses
  it, else fp32; trained ones fp32, numerics/precision.py), sharded over the devices under FSDP / ZeRO-3.
* ``grads+adam``: fp32 gradient and AdamW's two fp32 moments per trained parameter (sharded under ZeRO-2/3, FSDP).
* ``reference``: full fine-tuning with ``beta > 0``: a frozen copy of the trained parameters (rl/reference.py);
  LoRA's reference is the adapter-off policy (nothing).
* ``kv_cache``: generation of ``per_device_train_batch_size * steps_per_generation`` rows of prompt + completion
  tokens: 2 (K, V) x layers x kv heads x head dim.
* ``save_copy``: Sa2VA's final save converts every weight to the save dtype (``--save_dtype``; the release's
  bf16 by default) when that differs from the dtype in memory: one copy of the model at that dtype, after the last
  step's transients are gone (the total takes the larger of the two).
* ``activations``: the gradient-carrying scoring forward of one micro-batch (``per_device_train_batch_size`` rows
  of prompt + completion tokens): per token and layer the tensors a decoder layer keeps for its backward
  (``ACT_HIDDEN`` x hidden + ``ACT_FFN`` x intermediate elements), or only the layer input under gradient
  checkpointing (plus one layer's worth, recomputed); plus the chunked fp32 head (models/policy.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

GiB = 1024 ** 3
GPU_RESERVE = 1.5 * GiB  # CUDA context + caching-allocator slack kept free when judging what fits
# CPU: what the training loop adds to the process beyond its resident memory at the check (lazy imports, the data
# loader, allocator arenas, OpenMP buffers); measured on the tiny models (benchmarks/memory_plan.py: 0.16-0.17 GiB)
CPU_LOOP_GROWTH = int(0.17 * GiB)
# elements a decoder layer keeps for its backward, per token: x hidden (norm inputs and outputs, q, k/v, rotated q/k,
# attention output), x intermediate (gate, up, activation, product); LoRA adds, per adapted projection, the
# dropout's output (its input width) and lora_A's output (r)
ACT_HIDDEN, ACT_FFN = 8, 4
TEXT_TOKENS = 256  # a Sa2VA prompt's text around the image tokens (template, region prompt, a GAR caption)
ENGINES = ("none", "ddp", "fsdp", "zero2", "zero3")
TRANSIENT = ("kv_cache", "activations")  # a step's; the final save's copy comes when they are gone
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "wqkv", "wo", "w1",
                "w2", "w3", "qkv_proj", "gate_up_proj")
_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


class PlanError(ValueError):
    """The checkpoint cannot be sized (no config, no safetensors); the message says what is missing."""


@dataclass(frozen=True)
class ModelDims:
    """The decoder LLM's shape and the checkpoint's parameter counts, from config.json and the weight headers."""

    params: int
    llm_params: int
    llm_linear: tuple[tuple[str, int, int], ...]  # (module name, in, out) of the LLM's projection weights
    text_hidden_fcs: int  # Sa2VA's [SEG] projection (trained with the mask loss)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    stored_bytes: int  # bytes of every weight as stored in the checkpoint
    image_tokens: int  # a Sa2VA prompt's image tokens at the most tiles / pixels; 0 for a causal LM
    min_image_tokens: int  # ... at the fewest (one tile; min_pixels)

    @property
    def prompt_tokens(self) -> int:
        return self.image_tokens + TEXT_TOKENS if self.image_tokens else 0


def _llm_config(cfg: dict) -> dict:
    for key in ("llm_config", "text_config"):
        if isinstance(cfg.get(key), dict):
            return cfg[key]
    return cfg


def _image_tokens(path: str, cfg: dict, max_tiles: int | None) -> tuple[int, int]:
    """(most, fewest) image tokens of one Sa2VA prompt."""
    if "llm_config" in cfg:  # InternVL layout: tiles of force_image_size px, num_image_token each, a thumbnail
        vision = cfg.get("vision_config") or {}
        size = int(cfg.get("force_image_size") or vision.get("image_size") or 448)
        patch = int(cfg.get("patch_size") or vision.get("patch_size") or 14)
        per_tile = int((size // patch) ** 2 * float(cfg.get("downsample_ratio", 0.5)) ** 2)
        tiles = int(max_tiles or cfg.get("max_dynamic_patch") or 12)
        return per_tile * (tiles + (1 if tiles > 1 and cfg.get("use_thumbnail", True) else 0)), per_tile
    if "text_config" in cfg:  # Qwen-VL: one token per merged 28x28 (Qwen3-VL 32x32) patch, up to max_pixels
        from sa2va_rl.models.sa2va_qwen import MAX_PIXELS, MIN_PIXELS

        vision = cfg.get("vision_config") or {}
        side = int(vision.get("patch_size", 14)) * int(vision.get("spatial_merge_size", 2))
        pre = os.path.join(path, "preprocessor_config.json")
        p = {}
        if os.path.isfile(pre):
            with open(pre) as f:
                p = json.load(f)
        size = p.get("size") or {}
        most = int(p.get("max_pixels") or size.get("longest_edge") or MAX_PIXELS)
        fewest = int(p.get("min_pixels") or size.get("shortest_edge") or MIN_PIXELS)
        return most // (side * side), fewest // (side * side)
    return 0, 0


def read_dims(path: str, max_tiles: int | None = None) -> ModelDims:
    """The model at ``path`` sized from its config.json and safetensors headers (no weight is read)."""
    from sa2va_rl.models.layout import _header

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}/config.json cannot be read ({e})") from None
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise PlanError(f"{path}: no *.safetensors weights (a .bin checkpoint cannot be sized without unpickling "
                        "it); re-save it with save_pretrained(safe_serialization=True)")
    sa2va = any(k in cfg for k in ("llm_config", "text_config"))
    params = llm = fcs = stored = 0
    linear = []
    for name in files:
        for key, t in _header(os.path.join(path, name)).items():
            if key == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            params += n
            stored += n * _BYTES.get(t["dtype"], 4)
            in_llm = not sa2va or ("language_model" in key and "visual" not in key)
            if "text_hidden_fcs" in key:
                fcs += n
            if not in_llm:
                continue
            llm += n
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and len(t["shape"]) == 2 and module.rsplit(".", 1)[-1] in LINEAR_NAMES:
                linear.append((module, t["shape"][1], t["shape"][0]))
    c = _llm_config(cfg)
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    most, fewest = _image_tokens(path, cfg, max_tiles) if sa2va else (0, 0)
    return ModelDims(params=params, llm_params=llm, llm_linear=tuple(linear), text_hidden_fcs=fcs, hidden=hidden,
                     layers=int(c["num_hidden_layers"]), heads=heads,
                     kv_heads=int(c.get("num_key_value_heads") or heads),
                     head_dim=int(c.get("head_dim") or hidden // heads), ffn=int(c.get("intermediate_size", 4 * hidden)),
                     vocab=int(c["vocab_size"]), context=int(c.get("max_position_embeddings") or 0),
                     stored_bytes=stored, image_tokens=most, min_image_tokens=fewest)


@dataclass(frozen=True)
class RunShape:
    """The flags that size a run (per device)."""

    rows: int  # completions per micro-batch: per_device_train_batch_size
    generation_rows: int  # completions generated at once: rows * steps_per_generation
    prompt_tokens: int
    completion_tokens: int
    lora_r: int = 0  # 0: the LLM trains whole
    lora_targets: tuple[str, ...] = ()  # empty: every projection of LINEAR_NAMES
    lora_dropout: float = 0.0
    save_bytes: int = 0  # bytes per parameter of the saved model where saving converts the dtype (0: no copy)
    extra_trained: int = 0  # parameters trained beside the LLM / its LoRA (text_hidden_fcs, ...)
    compute_bytes: int = 4  # 2 under bf16
    gradient_checkpointing: bool = False
    beta: float = 0.0
    engine: str = "none"
    devices: int = 1


@dataclass
class MemoryPlan:
    parts: dict[str, int] = field(default_factory=dict)  # name -> bytes per device

    @property
    def total(self) -> int:
        """The peak: what stays all run, plus the larger of a step's transients and the final save's copy."""
        p = self.parts
        held = sum(v for k, v in p.items() if k not in TRANSIENT and k != "save_copy")
        return held + max(sum(p.get(k, 0) for k in TRANSIENT), p.get("save_copy", 0))

    def table(self) -> list[str]:
        width = max(len(k) for k in self.parts)
        return [f"  {k:<{width}}  {v / GiB:8.2f} GiB" for k, v in self.parts.items()] + [
            f"  {'total':<{width}}  {self.total / GiB:8.2f} GiB  (held parts + the larger of kv_cache + activations "
            "and save_copy)"]


def _adapted(dims: ModelDims, shape: RunShape) -> list[tuple[int, int]]:
    """(in, out) of every LLM projection LoRA adapts."""
    targets = set(shape.lora_targets) or set(LINEAR_NAMES)
    return [(i, o) for m, i, o in dims.llm_linear if m.rsplit(".", 1)[-1] in targets]


def trained_params(dims: ModelDims, shape: RunShape) -> int:
    if shape.lora_r == 0:
        return dims.llm_params + shape.extra_trained
    return sum(shape.lora_r * (i + o) for i, o in _adapted(dims, shape)) + shape.extra_trained


def _lora_saved(dims: ModelDims, shape: RunShape) -> int:
    """Elements per token and layer that LoRA keeps for the backward: lora_A's output (r) per adapted projection,
    and with dropout the dropped input (the projection's input width)."""
    if not shape.lora_r or not dims.layers:
        return 0
    per_layer = sum(shape.lora_r + (i if shape.lora_dropout > 0 else 0) for i, _ in _adapted(dims, shape))
    return per_layer // dims.layers


def estimate(dims: ModelDims, shape: RunShape, runtime: int = 0) -> MemoryPlan:
    """Bytes per device, by part (the module docstring says what each part holds)."""
    if shape.engine not in ENGINES:
        raise PlanError(f"engine {shape.engine!r}: use one of {', '.join(ENGINES)}")
    n = max(1, shape.devices)
    shard_weights = n if shape.engine in ("fsdp", "zero3") else 1
    shard_states = n if shape.engine in ("fsdp", "zero2", "zero3") else 1
    trained = trained_params(dims, shape)
    base_trained = dims.llm_params + shape.extra_trained if shape.lora_r == 0 else shape.extra_trained
    frozen = dims.params - base_trained
    b, act = shape.compute_bytes, shape.compute_bytes
    tokens = shape.prompt_tokens + shape.completion_tokens
    per_token_layer = (ACT_HIDDEN * dims.hidden + ACT_FFN * dims.ffn + _lora_saved(dims, shape)) * act
    if shape.gradient_checkpointing:
        activations = shape.rows * tokens * (dims.layers * dims.hidden * act + per_token_layer)
    else:
        activations = shape.rows * tokens * dims.layers * per_token_layer
    from sa2va_rl.models.policy import CHUNK_ELEMENTS

    head = 3 * 4 * min(CHUNK_ELEMENTS, max(1, shape.rows * shape.completion_tokens) * dims.vocab)
    parts = {
        "runtime": runtime,
        "weights": (frozen * b + trained * 4) // shard_weights,
        "grads+adam": trained * 12 // shard_states,
        "reference": (base_trained * 4 // shard_weights) if shape.beta > 0 and shape.lora_r == 0 else 0,
        "kv_cache": shape.generation_rows * tokens * 2 * dims.layers * dims.kv_heads * dims.head_dim * b,
        "activations": activations + head,
        "save_copy": dims.params * shape.save_bytes,
    }
    return MemoryPlan(parts)


def largest_fitting(dims: ModelDims, shape: RunShape, budget: int, runtime: int, per: int) -> int:
    """The largest group size G (rows scale with it: ``per`` prompts per device step) whose estimate fits."""
    from dataclasses import replace

    steps = max(1, shape.generation_rows // max(1, shape.rows))

    def fits(g: int) -> bool:
        return estimate(dims, replace(shape, rows=per * g, generation_rows=per * g * steps), runtime).total <= budget

    best, g = 0, 1
    while g <= 1 << 20 and fits(g):
        best, g = g, g * 2
    if best == 0:
        return 0
    lo, hi = best, best * 2  # the answer lies in [best, 2 best)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def prompt_token_lengths(tokenizer, prompts) -> list[int]:
    """Each causal-LM prompt's length in tokens (the context check takes the longest)."""
    return [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]


def current_rss() -> int:
    """This process's resident bytes now (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def device_memory() -> tuple[int, str]:
    """(bytes a run may use on this device, its description): a GPU's total minus ``GPU_RESERVE``; on CPU the
    memory available now (MemAvailable)."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return int(total - GPU_RESERVE), f"{torch.cuda.get_device_name(0)} ({total / GiB:.0f} GiB)"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail = int(info["MemAvailable"].split()[0]) * 1024
        return avail, f"CPU RAM ({avail / GiB:.1f} GiB available)"
    except (OSError, KeyError, ValueError):
        return 0, "CPU RAM (unknown)"


def engine_of(config) -> tuple[str, int]:
    """(engine, devices) of the run ``config`` describes: TrainingArguments' ``deepspeed`` / ``fsdp`` fields or
    accelerate's launch environment, and the number of processes."""
    devices = int(os.environ.get("WORLD_SIZE", "1") or 1)
    ds = getattr(config, "deepspeed", None) or (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")
    if ds:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        plugin = getattr(config, "hf_deepspeed_config", None)
        if plugin is not None:
            stage = plugin.config.get("zero_optimization", {}).get("stage", stage)
        return ("zero3" if str(stage) == "3" else "zero2"), devices
    if getattr(config, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp", devices
    return ("ddp" if devices > 1 else "none"), devices


def run_shape(dims: ModelDims, config, lora_r: int, lora_targets: str = "auto", extra_trained: int = 0,
              prompt_tokens: int | None = None, lora_dropout: float = 0.0) -> RunShape:
    """The RunShape of a Sa2VAGRPOConfig (its per-device batch, steps per generation, completion length, dtype)."""
    from dataclasses import replace

    engine, devices = engine_of(config)
    rows = int(config.per_device_train_batch_size)
    steps = int(getattr(config, "steps_per_generation", None) or config.gradient_accumulation_steps or 1)
    targets = () if lora_targets == "auto" else tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    shape = RunShape(rows=rows, generation_rows=rows * steps, prompt_tokens=0,
                     completion_tokens=int(config.max_completion_length or 0), lora_r=lora_r, lora_targets=targets,
                     lora_dropout=lora_dropout,
                     extra_trained=extra_trained, compute_bytes=2 if (config.bf16 or config.fp16) else 4,
                     gradient_checkpointing=bool(config.gradient_checkpointing), beta=float(config.beta or 0.0),
                     engine=engine, devices=devices)
    prompt = dims.prompt_tokens if prompt_tokens is None else prompt_tokens
    if dims.context:
        prompt = min(prompt, max(0, dims.context - shape.completion_tokens))
    return replace(shape, prompt_tokens=prompt)


def context_problem(dims: ModelDims, completion_tokens: int, shortest_prompt: int, what: str) -> str | None:
    """A completion that cannot fit the model's context after even the shortest prompt (``what`` says which)."""
    if not dims.context or shortest_prompt + completion_tokens <= dims.context:
        return None
    room = dims.context - shortest_prompt
    fix = (f"the largest --max_completion_length that fits is {room}" if room > 0 else
           "no completion fits: shorten the prompts (--max_tiles for Sa2VA)")
    return (f"--max_completion_length {completion_tokens}: {what} ({shortest_prompt} tokens) plus the completion is "
            f"{shortest_prompt + completion_tokens} tokens, over the model's context of {dims.context} "
            f"(max_position_embeddings in config.json); {fix}")


def memory_problem(dims: ModelDims, shape: RunShape, prompts_per_step: int, budget: int | None = None,
                   where: str | None = None) -> tuple[str | None, MemoryPlan, int, int]:
    """(why the run cannot fit or None, the estimate, the budget in bytes, the largest G that fits). ``budget``:
    bytes the run may use (default: this device's, ``device_memory``)."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        import sa2va_rl.rl.trainer  # noqa: F401 - the training stack, so that the runtime part includes it
    held = 0 if on_gpu else current_rss()
    runtime = 0 if on_gpu else held + CPU_LOOP_GROWTH
    if budget is None:
        budget, where = device_memory()
        budget += held  # MemAvailable excludes what this process holds already (0 on a GPU)
    plan = estimate(dims, shape, runtime)
    best = largest_fitting(dims, shape, budget, runtime, prompts_per_step) if budget else 0
    if not budget or plan.total <= budget:
        return None, plan, budget, best
    g = shape.rows // max(1, prompts_per_step)
    fix = (f"the largest --num_generations that fits is {best} (at --batch_size {prompts_per_step})" if best >= 2
           else "not even 2 generations fit: use LoRA (--lora_r), --gradient_checkpointing true, bf16, a shorter "
                "--max_completion_length or more devices (FSDP / ZeRO-3)")
    return (f"the estimated memory per device, {plan.total / GiB:.1f} GiB (at --num_generations {g}, --batch_size "
            f"{prompts_per_step}, {shape.prompt_tokens} prompt + {shape.completion_tokens} completion tokens), is more "
            f"than {where or 'the device'} allows ({budget / GiB:.1f} GiB): {fix}. `sa2va-rl plan` prints the "
            "estimate by part (docs/scale.md); --memory_check false skips this check"), plan, budget, best


@dataclass
class Limits:
    """What ``check_limits`` found: an error for the context and for the memory (None when fine)."""

    dims: ModelDims
    shape: RunShape
    context_error: str | None
    memory_error: str | None
    plan: MemoryPlan
    budget: int
    largest_g: int


def check_limits(model_path: str, config, margs=None, prompt_lengths=None, max_prompt_tokens: int = 8192,
                 budget: int | None = None, where: str | None = None, engine: str | None = None,
                 devices: int | None = None) -> Limits:
    """The run's limits before the model loads: the completion against the model's context (after the shortest
    Sa2VA prompt, ``margs`` given; or the longest causal-LM prompt of ``prompt_lengths``), and the memory estimate
    against ``budget`` (default: the device's). Raises PlanError when the checkpoint cannot be sized."""
    from dataclasses import replace

    dims = read_dims(model_path, margs.max_tiles if margs is not None else None)
    if margs is not None:  # Sa2VA: at least one image tile (or min_pixels) plus the template
        shortest, what = dims.min_image_tokens + 16, "the shortest Sa2VA prompt (one image tile and the template)"
        expected = min(dims.prompt_tokens, max_prompt_tokens)
        extra = dims.text_hidden_fcs if (config.mask_loss_weight > 0 or margs.train_mask_decoder) else 0
        lora_r, targets, dropout = margs.lora_r, margs.lora_target_modules, margs.lora_dropout
    else:
        shortest = expected = max(prompt_lengths or [0])
        what, extra, lora_r, targets, dropout = "the longest prompt", 0, 0, "auto", 0.0
    context = context_problem(dims, int(config.max_completion_length or 0), shortest, what)
    shape = run_shape(dims, config, lora_r, targets, extra, expected, dropout)
    if margs is not None:  # models/sa2va.py save_sa2va: the release layout, converted to the save dtype
        save = {"float32": 4, "bfloat16": 2, "float16": 2}.get(margs.save_dtype) or round(
            dims.stored_bytes / max(1, dims.params))
        shape = replace(shape, save_bytes=0 if save == shape.compute_bytes else save)
    if engine is not None or devices is not None:
        shape = replace(shape, engine=engine or shape.engine, devices=devices or shape.devices)
    per = max(1, config.per_device_train_batch_size // max(1, config.num_generations))
    memory, plan, budget, best = memory_problem(dims, shape, per, budget, where)
    return Limits(dims, shape, context, memory, plan, budget, best)
