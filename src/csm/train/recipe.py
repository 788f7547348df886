"""The fine-tuning recipe: data in, a trained checkpoint (and LoRA adapters) out.

    finetune(FinetuneConfig(model="sesame/csm-1b", data="train.jsonl", out="runs/voice", steps=1000))

The loss is the model's own (the reference's semantics), weighted so that a step's loss and gradient are those
of its whole global batch however it is split over micro-batches and processes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import save_safetensors
from ..model import GENERATION_CONFIG_NAME, TIED_AUDIO_EMBEDDING, CsmForConditionalGeneration
from . import data as D
from . import distributed as dist
from .lora import DEFAULT_TARGETS, LoraConfig, apply_lora, merge_lora, save_adapter

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
LOG_NAME = "log.jsonl"
ADAPTER_DIR = "adapter"
# Changing these changes the data order or the loss of a step: a resumed run must keep them.
RESUME_KEYS = ("data", "global_batch", "seed", "depth_decoder_ratio", "lora_rank", "lora_targets")


@dataclass
class FinetuneConfig:
    """Everything a run needs; the defaults are a LoRA fine-tune."""

    model: str  # checkpoint folder or hub id (with its tokenizer)
    data: str  # training JSON lines
    out: str  # output folder
    val: str | None = None  # validation JSON lines
    steps: int | None = None  # optimizer steps; or
    epochs: int | None = None  # passes over the data (default 1 when neither is given)
    batch_size: int = 4  # examples per forward, per process
    grad_accum: int = 1  # forwards per optimizer step; global batch = batch_size * grad_accum * processes
    lr: float | None = None  # default 2e-4 with LoRA, 2e-5 for full fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default 5% of the steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0: no clipping
    lora_rank: int = 16  # 0: full fine-tuning
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    depth_decoder_ratio: float = (
        1 / 16
    )  # share of audio frames the depth decoder trains on, as Sesame trained
    precision: str = "auto"  # auto (bf16 autocast where supported), bf16 or fp32
    activation_checkpointing: bool = False
    eval_every: int = 100
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = False
    device: str | None = None
    cache_dir: str | None = None  # default: .csm_cache next to each data file
    prepare_only: bool = False  # encode and cache the audio, then stop
    progress: bool = True

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        for name in ("steps", "epochs", "batch_size", "grad_accum", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 for full fine-tuning), got {self.lora_rank}")
        if not 0.0 <= self.depth_decoder_ratio <= 1.0:
            raise ValueError(f"depth_decoder_ratio must be in [0, 1], got {self.depth_decoder_ratio}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.lora_rank:
            LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)  # validates

    @property
    def lora(self) -> LoraConfig | None:
        return (
            LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, list(self.lora_targets))
            if self.lora_rank
            else None
        )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


# ---- data -----------------------------------------------------------------------------------------------


def prepare_data(path: str, model, processor, d: dist.Dist, config: FinetuneConfig) -> list[D.Example]:
    """Read and check a dataset, encode uncached clips (main process only), tokenize."""
    path = Path(path)
    samples = D.read_jsonl(path)
    max_length = model.config.max_position_embeddings
    D.check_lengths(samples, processor, max_length)
    digests = D.clip_digests(samples)
    folder = D.cache_folder(path, D.codec_fingerprint(model.codec_model), config.cache_dir)
    if d.is_main:
        todo = D.missing_clips(digests, folder)
        if todo and config.progress:
            print(f"encoding {len(todo)} clip(s) of {path.name} into {folder}")
        D.encode_clips(todo, model.codec_model, folder, progress=config.progress)
    dist.barrier(d)
    return D.build_examples(samples, D.load_codes(digests, folder), processor, max_length)


def local_micro_batches(global_batch: list[int], d: dist.Dist, config: FinetuneConfig) -> list[list[int]]:
    """This process's share of a global batch: micro-batch j goes to process j % world."""
    size = config.batch_size
    chunks = [global_batch[i : i + size] for i in range(0, len(global_batch), size)]
    return chunks[d.rank :: d.world]


def make_batch(examples, indices, seed: int, epoch: int, model_config, pad_id, depth_ratio) -> D.Batch:
    """Collate examples with their labels; an example's -101 draw depends on (seed, epoch, index) only."""
    picked = [examples[i] for i in indices]
    ids = (model_config.audio_token_id, model_config.audio_eos_token_id)
    labels = [
        D.labels_for(e, *ids, depth_ratio, D.mix_seed(seed, epoch, i))
        for e, i in zip(picked, indices, strict=True)
    ]
    return D.collate(picked, labels, pad_id)


def weighted_loss(
    net, batch: D.Batch, totals: tuple[float, float], autocast
) -> tuple[torch.Tensor, float, float]:
    """This micro-batch's share of the global batch's loss, and its backbone and depth parts."""
    with autocast:
        # Right padding: real tokens never see padding, so the causal mask alone is exact (and fastest).
        out = net(input_ids=batch.input_ids, labels=batch.labels, audio_codes=batch.audio_codes)
    backbone = out.backbone_loss * (batch.backbone_targets / max(totals[0], 1))
    depth = out.depth_decoder_loss * (batch.depth_targets / max(totals[1], 1))
    return backbone + depth, float(backbone.detach()), float(depth.detach())


@torch.no_grad()
def evaluate(net, examples, d: dist.Dist, config: FinetuneConfig, model_config, pad_id, autocast) -> dict:
    """Loss over the whole validation set (fixed labels), split over processes."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    rounds = -(-len(batches) // d.world)  # every process runs as many forwards (FSDP needs it)
    was_training = net.training
    net.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # backbone loss * targets, targets, depth loss * frames, frames
    for r in range(rounds):
        j = r * d.world + d.rank
        indices = batches[min(j, len(batches) - 1)]
        batch = make_batch(
            examples, indices, config.seed, -1, model_config, pad_id, config.depth_decoder_ratio
        )
        batch = batch.to(d.device)
        with autocast:
            out = net(input_ids=batch.input_ids, labels=batch.labels, audio_codes=batch.audio_codes)
        if j < len(batches):
            sums[0] += float(out.backbone_loss) * batch.backbone_targets
            sums[1] += batch.backbone_targets
            sums[2] += float(out.depth_decoder_loss) * batch.depth_targets
            sums[3] += batch.depth_targets
    net.train(was_training)
    s = dist.all_sum(d, sums)
    backbone, depth = s[0] / max(s[1], 1), s[2] / max(s[3], 1)
    return {"val_loss": backbone + depth, "val_backbone_loss": backbone, "val_depth_decoder_loss": depth}


# ---- checkpoints ----------------------------------------------------------------------------------------


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE_NAME).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(
    net, optimizer, step: int, out: Path, config: FinetuneConfig, d: dist.Dist, global_batch: int
) -> None:
    """Trainable weights, optimizer state and step; written by the main process, atomically.

    The learning rate, data order, labels and dropout are functions of the step, so the step restores them.
    """
    weights = dist.full_state_dict(net, trainable_only=True)
    optim = dist.optimizer_state_dict(net, optimizer)
    if d.is_main:
        final = out / CHECKPOINTS / f"step-{step:07d}"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(weights, tmp)
        (tmp / "model.safetensors").rename(tmp / TRAINABLE_NAME)
        save_optimizer_state(optim, tmp / OPTIMIZER_NAME)
        state = {
            "step": step,
            "global_batch": global_batch,
            "config": asdict(config),
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for p in old[: max(0, len(old) - config.keep_checkpoints)]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier(d)


def load_checkpoint(folder: Path, net, optimizer, config: FinetuneConfig, global_batch: int) -> int:
    state = json.loads((folder / STATE_NAME).read_text())
    saved = {**state["config"], "global_batch": state["global_batch"]}
    now = {**asdict(config), "global_batch": global_batch}
    changed = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(
            f"cannot resume from {folder}: {', '.join(changed)} differ from that run "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); use the same settings or a new --out"
        )
    weights = load_file(folder / TRAINABLE_NAME)
    optim = load_optimizer_state(folder / OPTIMIZER_NAME)
    dist.load_state(net, optimizer, weights, optim)
    return int(state["step"])


PLAIN = (torch.Tensor, str, int, float, bool, type(None))


def check_plain(value, where: str = "state", depth: int = 0) -> None:
    """Raise ValueError unless `value` holds only tensors, numbers, strings, None, lists, tuples and dicts
    (what an optimizer's state is, and what `torch.load(weights_only=True)` reads)."""
    if depth > 16:
        raise ValueError(f"{where} nests too deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where} has a key of type {type(k).__name__}")
            check_plain(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]", depth + 1)
    elif not isinstance(value, PLAIN):
        raise ValueError(f"{where} is a {type(value).__name__}, not a tensor or a plain value")


def save_optimizer_state(optim: dict, path: Path) -> None:
    """The optimizer's state (tensors and plain values only, checked) in a file `torch.load(weights_only=True)`
    reads: resuming never unpickles code."""
    check_plain(optim, "optimizer state")
    torch.save(optim, path)


def load_optimizer_state(path: Path) -> dict:
    """What `save_optimizer_state` wrote, read with `weights_only=True`: a file holding anything but tensors and
    plain values (a planted pickle that would run code) is refused with a ValueError, never run."""
    import pickle

    try:
        optim = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot resume from {path}: it holds more than tensors and plain values, or is damaged ({first[:200]}); "
            "it is not loaded (that could run code): remove that checkpoint folder, or start a new --out"
        ) from None
    if not isinstance(optim, dict) or set(optim) != {"state", "param_groups"}:
        raise ValueError(f"cannot resume from {path}: it is not an optimizer state saved by csm finetune")
    check_plain(optim, "optimizer state")
    return optim


def export(
    net, codec, processor, out: Path, config: FinetuneConfig, d: dist.Dist, dtype: torch.dtype
) -> None:
    """Write the final checkpoint (adapters merged) and, with LoRA, the adapters on their own."""
    model = dist.unwrap(net)
    if config.lora_rank:
        if d.is_main:
            save_adapter(model, config.lora, out / ADAPTER_DIR, base_model=str(config.model))
        merge_lora(model)
    state = dist.full_state_dict(model)
    if not d.is_main:
        return
    state.update({"codec_model." + k: v.cpu() for k, v in codec.state_dict().items()})
    a, b = TIED_AUDIO_EMBEDDING
    if model.config.tie_codebooks_embeddings:  # FSDP may name a tied tensor once
        state.setdefault(a, state.get(b))
        state.setdefault(b, state[a])
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.config.save_pretrained(out)
    save_safetensors(state, out)
    if model.generation_config:
        (out / GENERATION_CONFIG_NAME).write_text(json.dumps(model.generation_config, indent=2) + "\n")
    processor.save_pretrained(out)


def trainable_model(model, config: FinetuneConfig, d: dist.Dist) -> tuple[torch.nn.Module, list]:
    """fp32 weights in training mode, LoRA or all trainable, wrapped for several processes; and what trains."""
    model.float().train()
    if config.lora_rank:
        apply_lora(model, config.lora)
    model.backbone_model.gradient_checkpointing = config.activation_checkpointing
    model.depth_decoder.model.gradient_checkpointing = config.activation_checkpointing
    net = dist.wrap(model, d, shard=not config.lora_rank)
    return net, [p for p in net.parameters() if p.requires_grad]


def train_step(net, optimizer, params, batches, totals, config: FinetuneConfig, d: dist.Dist, autocast):
    """Accumulate the micro-batches' gradients, clip, step. Returns the global batch's two losses and the norm."""
    parts = [0.0, 0.0]
    for j, batch in enumerate(batches):
        with dist.sync_gradients(net, j == len(batches) - 1):
            loss, backbone, depth = weighted_loss(net, batch.to(d.device), totals, autocast)
            (loss * d.world).backward()  # processes average gradients; the weights already sum to 1
        parts[0] += backbone
        parts[1] += depth
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    backbone, depth = dist.all_sum(d, parts)
    return backbone, depth, grad_norm


# ---- the run --------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune `config.model` on `config.data`; returns the output folder, a checkpoint `from_pretrained` loads."""
    d = dist.setup(config.device)
    try:
        return _run(config, d)
    finally:
        dist.teardown(d)


def _run(config: FinetuneConfig, d: dist.Dist) -> Path:
    from tqdm import tqdm

    from ..processor import CsmProcessor

    out = Path(config.out)
    if not config.resume and not config.prepare_only and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pass --resume to continue that run, or choose a new --out")
    torch.manual_seed(config.seed)
    processor = CsmProcessor.from_pretrained(config.model)
    model = CsmForConditionalGeneration.from_pretrained(config.model, device=d.device)
    if model.quantization is not None:
        raise ValueError(
            f"{config.model} holds {model.quantization.scheme}-quantized weights, which cannot be trained; "
            "fine-tune its full-precision checkpoint, then quantize the result"
        )
    cfg = model.config
    if (
        processor.audio_token_id != cfg.audio_token_id
        or processor.audio_eos_token_id != cfg.audio_eos_token_id
    ):
        raise ValueError(f"{config.model}: the tokenizer's audio tokens do not match the model's config")
    pad_id = processor.pad_token_id
    train = prepare_data(config.data, model, processor, d, config)
    val = prepare_data(config.val, model, processor, d, config) if config.val else []
    if config.prepare_only:
        return out

    codec, saved_dtype = model.codec_model.cpu(), model.dtype
    model.codec_model = None  # codes are cached: training never runs the codec
    net, params = trainable_model(model, config, d)
    lr = config.lr or (2e-4 if config.lora_rank else 2e-5)
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)

    global_batch = config.batch_size * config.grad_accum * d.world
    per_epoch = D.steps_per_epoch(len(train), global_batch)
    total = config.steps or per_epoch * (config.epochs or 1)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total))

    step = 0
    last = latest_checkpoint(out) if config.resume else None
    if last is not None:
        step = load_checkpoint(last, net, optimizer, config, global_batch)
    log_path = out / LOG_NAME
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        kept = (
            [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            if log_path.is_file()
            else []
        )
        log_path.write_text("".join(ln + "\n" for ln in kept))
        if config.progress:
            mode = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full fine-tuning"
            n_total = sum(p.numel() for p in dist.unwrap(net).parameters())  # DTensors count whole
            print(f"{mode}: {sum(p.numel() for p in params):,} of {n_total:,} parameters train; {len(train)} "
                  f"examples, global batch {global_batch}, {total} steps"
                  + (f", resuming at step {step} from {last}" if last else ""))  # fmt: skip
    lengths = [len(e) for e in train]
    autocast = torch.autocast(
        d.device.type, dtype=torch.bfloat16, enabled=use_bf16(config.precision, d.device)
    )
    bar = tqdm(total=total, initial=step, disable=not (d.is_main and config.progress), unit="step")
    epoch_order: tuple[int, list] = (-1, [])
    t0, tokens = time.perf_counter(), 0.0

    while step < total:
        epoch, index = divmod(step, per_epoch)
        if epoch_order[0] != epoch:
            epoch_order = (epoch, D.epoch_batches(lengths, global_batch, config.seed, epoch))
        micro = local_micro_batches(epoch_order[1][index], d, config)
        batches = [
            make_batch(train, m, config.seed, epoch, cfg, pad_id, config.depth_decoder_ratio) for m in micro
        ]
        local = [
            sum(b.backbone_targets for b in batches),
            sum(b.depth_targets for b in batches),
            sum(b.num_tokens for b in batches),
        ]
        totals = dist.all_sum(d, local)
        # The learning rate and dropout are functions of the step: a resumed run takes the same path.
        step_lr = lr * lr_factor(step, warmup, total, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        torch.manual_seed(D.mix_seed(config.seed, step, d.rank))
        backbone, depth, grad_norm = train_step(net, optimizer, params, batches, totals, config, d, autocast)
        step += 1
        tokens += totals[2]
        record = {"step": step, "loss": backbone + depth, "backbone_loss": backbone, "depth_decoder_loss": depth,
                  "lr": step_lr, "grad_norm": grad_norm}  # fmt: skip
        if val and (step % config.eval_every == 0 or step == total):
            record.update(evaluate(net, val, d, config, cfg, pad_id, autocast))
            if d.is_main and config.progress:
                bar.write(f"step {step}: val loss {record['val_loss']:.4f}")
        if d.is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{rate:.0f}")
            bar.update(1)
        if step % config.save_every == 0 or step == total:
            save_checkpoint(net, optimizer, step, out, config, d, global_batch)
    bar.close()
    export(net, codec, processor, out, config, d, saved_dtype)
    dist.barrier(d)
    return out
