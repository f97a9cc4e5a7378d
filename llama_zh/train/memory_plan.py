"""Memory per device of a training run, from model x trainer x strategy x batch, before it starts.

Rows (bytes per process):
- params      the weights as the device holds them (ZeRO-3: a 1/W shard plus the layers gathered
              for compute; autocast's 16-bit weight copies, cached for the forward, under *-mixed);
              LoRA adapters and a prefix (finetune=prefix) in fp32; a QLoRA base's quantized projections at their
              packed size
              (nf4: half a byte a weight + an fp32 absmax per block + the 16-entry code per layer;
              int8: a byte a weight + an fp32 scale per row), the rest of the base in fp32
- grads       gradients of the trainable weights (ZeRO-2/3: a shard plus the reduce bucket; DDP:
              plus its bucket copy)
- optimizer   AdamW's two moments, plus the fp32 master copy DeepSpeed keeps (ZeRO: 1/W each);
              8-bit AdamW (bitsandbytes): a byte a moment plus an fp32 absmax per 256 values, 32-bit
              moments for tensors under its min_8bit_size, two 256-entry maps per tensor
- activations what autograd saves for backward for one micro-batch, plus the logits' gradient
- runtime     the process itself: interpreter, libraries, CUDA context (on CPU: the RSS at planning
              time plus CPU_FIT_SETUP)
Offloaded state is counted in the `host` column (CPU RAM of the node, shared by its processes).

Activation sizes per token are fitted to what `torch.autograd.graph.saved_tensors_hooks` records
for this model's forward (tests/test_train_memory.py re-measures them): per block, fp32:
32 C + 16 F + 8 KD bytes (C width, F FFN width, KD kv width); bf16 autocast: 36 C + 8 F + 4 KD;
plus 4 V (fp32 log-softmax) or 6 V (bf16 logits + fp32 log-softmax) for the loss. A prefix adds its
keys and values to every row's cache buffers (saved by attention) and, with an MLP, its activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llama_zh.config import ModelConfig
from llama_zh.dtypes import is_sixteen_bit

GiB = 1024**3
# What Lightning's fit adds to a CPU process before the first step (trainer, loops, lazily imported
# modules), measured on the development machine: RSS at fit start minus RSS at planning time,
# model excluded (0.24 GiB with pytorch-lightning 2.6.6, torch 2.13).
CPU_FIT_SETUP = GiB // 4


@dataclass
class PlanInputs:
    model: ModelConfig  # with vocab_size
    trainable_params: int
    micro_batch: int
    seq_len: int
    world_size: int  # data-parallel processes in all
    local_processes: int  # processes on one node
    precision: str
    on_gpu: bool
    zero_stage: int = 0  # 0: no DeepSpeed
    ddp: bool = False
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket_size: int = 200_000_000
    activation_checkpointing: bool = False
    adapter_params: int = 0  # parameters beyond the base model's (LoRA's A and B), fp32, all trainable
    base_quant: str | None = None  # nf4 | int8: the QLoRA base's quantized projections
    quantized_params: int = 0  # weights in those projections
    quantized_rows: int = 0  # their output rows (int8 keeps a scale per row)
    quantized_layers: int = 0
    quant_blocksize: int = 64  # nf4: weights per absmax
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    eight_bit_params: int = 0  # trainable parameters in tensors an 8-bit optimizer keeps in 8 bits
    eight_bit_tensors: int = 0
    adapter_saved_per_token: int = 0  # what LoRA adapters add to the saved activations, per token, all blocks
    prefix_saved_per_row: int = 0  # finetune=prefix: its keys and values in every row's cache buffers, all layers
    prefix_saved_per_step: int = 0  # finetune=prefix with an MLP: its activations, once a micro-batch


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    device: dict[str, int] = field(default_factory=dict)  # row -> bytes on each device
    host: dict[str, int] = field(default_factory=dict)  # row -> bytes of CPU RAM per process (offload)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def table(self, device_memory: int | None = None) -> str:
        rows = ["params", "grads", "optimizer", "activations", "runtime"]
        width = max(len(r) for r in rows)
        lines = [f"{'':{width}}  {'device GiB':>10}  {'host GiB':>9}"]
        for r in rows:
            lines.append(f"{r:{width}}  {self.device.get(r, 0) / GiB:10.3f}  {self.host.get(r, 0) / GiB:9.3f}")
        lines.append(f"{'total':{width}}  {self.device_total / GiB:10.3f}  {self.host_total / GiB:9.3f}")
        if device_memory:
            lines.append(f"{'available':{width}}  {device_memory / GiB:10.3f}")
        return "\n".join(lines)


def block_params(m: ModelConfig) -> int:
    kv = m.n_kv_heads * m.head_dim
    return m.dim * (m.dim + 2 * kv) + m.dim * m.dim + 3 * m.dim * m.ffn_dim + 2 * m.dim


def block_bytes_per_token(m: ModelConfig, sixteen_bit: bool) -> int:
    """What one block saves for backward, per token."""
    kv = m.n_kv_heads * m.head_dim
    return 36 * m.dim + 8 * m.ffn_dim + 4 * kv if sixteen_bit else 32 * m.dim + 16 * m.ffn_dim + 8 * kv


def saved_bytes_per_token(m: ModelConfig, sixteen_bit: bool, checkpointing: bool) -> int:
    """What autograd saves for backward, per token (no weight copies), at its peak."""
    loss = (6 if sixteen_bit else 4) * m.vocab_size
    outside = 12 * m.dim  # embedding output, final norm (fp32 residual stream)
    if checkpointing:
        # Each block keeps only its input; one block's activations exist again while it is recomputed.
        blocks = m.n_layers * 4 * m.dim + block_bytes_per_token(m, sixteen_bit)
    else:
        blocks = m.n_layers * block_bytes_per_token(m, sixteen_bit)
    return blocks + loss + outside


def activation_bytes_per_token(m: ModelConfig, sixteen_bit: bool, checkpointing: bool) -> int:
    # Plus the logits themselves (alive until the step's loss is returned) and their fp32 gradient,
    # which lives during backward next to everything still saved.
    logits = (2 if sixteen_bit else 4) * m.vocab_size
    return saved_bytes_per_token(m, sixteen_bit, checkpointing) + logits + 4 * m.vocab_size


def quantized_bytes(p: PlanInputs) -> int:
    """The quantized projections of a QLoRA base as bitsandbytes stores them."""
    q = p.quantized_params
    if p.base_quant == "nf4":
        return q // 2 + 4 * math.ceil(q / p.quant_blocksize) + 16 * 4 * p.quantized_layers
    if p.base_quant == "int8":
        return q + 4 * p.quantized_rows
    return 0


def optimizer_bytes(p: PlanInputs) -> int:
    """AdamW's two moments for the trainable parameters: fp32 (8 bytes a parameter), or for an 8-bit
    AdamW one byte each plus an fp32 absmax per 256 values (the tensors it keeps 8-bit) and 8 bytes a
    parameter for the rest."""
    nt = p.trainable_params
    if p.optimizer == "adamw":
        return 8 * nt
    e = p.eight_bit_params
    return 8 * (nt - e) + 2 * e + 2 * 4 * math.ceil(e / 256) + p.eight_bit_tensors * 2 * 256 * 4


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def current_rss() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """This process's peak resident memory since start or the last `reset_peak_rss()` (Linux)."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def plan_memory(p: PlanInputs, runtime_bytes: int | None = None) -> MemoryPlan:
    m, n, nt, w = p.model, p.model.n_params, p.trainable_params, p.world_size
    sixteen = is_sixteen_bit(p.precision)
    plan = MemoryPlan(p)
    dev, host = plan.device, plan.host
    largest = max(block_params(m), m.vocab_size * m.dim)

    if p.zero_stage == 0:
        full = n - p.quantized_params + p.adapter_params  # fp32 weights (+ autocast's cached 16-bit copies)
        dev["params"] = 4 * full + (2 * full if sixteen else 0) + quantized_bytes(p)
        dev["grads"] = 4 * nt * (2 if p.ddp and w > 1 else 1)  # DDP buckets copy the gradients
        dev["optimizer"] = optimizer_bytes(p)
    else:
        pb = 2 if sixteen else 4  # DeepSpeed converts the module to 16 bits under mixed precision
        if p.zero_stage == 3:
            # Shard, plus the layers gathered around the one computing (about two of the largest).
            shard, working = pb * n // w, 2 * pb * largest
            dev["params"] = working + (0 if p.offload_parameters else shard)
            if p.offload_parameters:
                host["params"] = shard
        else:
            dev["params"] = pb * n
        grads_full = pb * nt
        bucket = pb * min(p.reduce_bucket_size, nt)
        dev["grads"] = grads_full if p.zero_stage == 1 else grads_full // w + bucket
        optimizer = (8 + 4) * nt // w  # two moments + the fp32 master copy, sharded
        if p.offload_optimizer:
            host["optimizer"] = optimizer
            host["grads"] = 4 * nt // w  # fp32 gradient partition the CPU optimizer steps from
        else:
            dev["optimizer"] = optimizer
    dev["activations"] = (
        p.micro_batch
        * p.seq_len
        * (activation_bytes_per_token(m, sixteen, p.activation_checkpointing) + p.adapter_saved_per_token)
    )
    dev["activations"] += p.micro_batch * p.prefix_saved_per_row + p.prefix_saved_per_step
    if runtime_bytes is None:
        runtime_bytes = GiB if p.on_gpu else current_rss() + CPU_FIT_SETUP
    dev["runtime"] = runtime_bytes
    return plan


def fits(plan: MemoryPlan, device_memory: int, host_memory: int, on_gpu: bool) -> tuple[bool, str]:
    """Whether the plan fits; on the CPU the device is the host, so both columns share its RAM."""
    local = plan.inputs.local_processes
    if on_gpu:
        if plan.device_total > device_memory:
            return False, f"{plan.device_total / GiB:.1f} GiB per GPU planned, {device_memory / GiB:.1f} GiB available"
        if plan.host_total * local > host_memory:
            return False, (
                f"{plan.host_total * local / GiB:.1f} GiB of CPU RAM planned for offload on this node, "
                f"{host_memory / GiB:.1f} GiB available"
            )
        return True, ""
    need = plan.device_total + plan.host_total
    if need > device_memory:
        return False, (
            f"{need / GiB:.1f} GiB per process planned, {device_memory / GiB:.1f} GiB of RAM available "
            f"per process ({local} on this node)"
        )
    return True, ""
