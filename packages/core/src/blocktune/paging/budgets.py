"""Memory budgets from the machine: what `auto` (the default) resolves to, and why.

A run holds, besides the interpreter and torch (already resident when this is read): resident
units (the device budget), the host tier (accelerators), stashed block inputs (the activation
budget, spilled to disk past it), one block's recompute intermediates, one loss chunk's
logits and their gradient, raw unit files in flight between disk and compute, and for a full
fine-tune one unit's gradients and its optimizer step's pieces of state. `resolve` measures the memory free now
(MemAvailable, or a cgroup's limit minus its usage, whichever is smaller; the accelerator's free
memory through the device module), keeps a slack for the allocators, estimates the rest from
the model and the batch, and gives the units what is left. An explicit budget wins; a budget
below the largest unit is an error with the number to use (the pager's).

Ranks on one machine (torchrun's LOCAL_WORLD_SIZE, `--nproc`) share its RAM, and a memory the
device draws on with them (CPU, MPS, emu): each rank's `auto` takes its share of what is free,
not all of it. A GPU is one rank's own (cuda:LOCAL_RANK); more ranks than GPUs would put two
on one GPU, which is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from blocktune.engine.loss import logit_buffers
from blocktune.engine.optim import STATE_PIECE
from blocktune.errors import ConfigError
from blocktune.machine.devices import Device
from blocktune.machine.hostmem import host_memory_free
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.paging.hosttier import BOUNCE_SLOTS
from blocktune.settings import AUTO
from blocktune.store.fileio import round_up

__all__ = ["Budgets", "resolve", "AUTO", "NO_LIMIT", "limit", "holds_two_units", "local_ranks"]

MiB = 1 << 20

# A byte limit no run reaches: where a budget is None (unlimited), the pager, the stash and the
# write-back compare against this, so their arithmetic (room left, slot caps) stays in integers.
NO_LIMIT = 1 << 62


def limit(budget: int | None) -> int:
    """`budget` in bytes, or `NO_LIMIT` where it is None (unlimited)."""
    return NO_LIMIT if budget is None else budget


def holds_two_units(budget: int | None, largest: int) -> bool:
    """The two-unit rule: whether a device budget (None: unlimited) has room for two of the
    largest units.

    With two, the next unit comes in beside the one being computed, so the work around a unit
    overlaps the compute: a full fine-tune's write-back runs behind the backward, a data-parallel
    gradient is summed during the next unit's backward, and idle read buffers are kept for
    reuse. Under two, memory is tight and time is spent to save it: each of those finishes
    before the compute goes on and no idle buffer is kept. (Freed heap memory goes back to the
    OS between units wherever `auto` pages the units through RAM, two of them or one:
    `Budgets.lean`.)
    """
    return budget is None or budget >= 2 * largest


@dataclass(frozen=True)
class Budgets:
    device: int | None  # None: unlimited
    host: int | None
    activation: int | None
    notes: tuple[str, ...] = ()  # how each `auto` was worked out, for the resolved config
    tight: bool = False  # `auto` found room for under two units (`holds_two_units`): spend time to save memory
    keep: int | None = 0  # activations kept to skip the backward's recompute (None: every block's)
    state: int = 0  # a full fine-tune's optimizer state kept in RAM between steps (CPU; `auto` only)
    spill: int = 0  # disk for the activations of blocks past `keep` (`blocktune.paging.spill`; CPU)
    spill_overlap: bool = False  # room for a block's activations more: written and read beside the compute
    # `auto` pages the units through host RAM (they do not all fit): the heap is kept from growing
    # (`blocktune.machine.hostmem.LeanHeap`), tight or not
    lean: bool = False
    # how much the process may grow between two returns of freed heap to the OS (0: before every
    # unit): out of the slack `_host_room` leaves for the allocator's fragmentation
    heap_slack: int = 0


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


# what a LoRA adapter on each linear keeps for the backward: its input (one tensor for the
# linears that share it) and, with dropout, a mask of a byte an element of it
_ADAPTER_INPUTS = {"wq": "x", "wk": "x", "wv": "x", "wo": "attention", "w1": "h", "w3": "h", "w2": "swiglu"}


def _kept_per_token(args: ModelArgs, item: int, lora: LoraConfig | None, device_type: str) -> int:
    """Bytes a block's graph keeps for the backward per token, its weights aside (handles), on the
    high side: what `blocktune.model.llama` keeps, `lora` None for every weight trained."""
    widths = {"x": args.dim, "h": args.dim, "attention": args.n_heads * args.head_dim, "swiglu": args.hidden_dim}
    # grouped keys and values as they are (the CPU's fused kernel), or repeated to every query
    # head (where a kernel without it falls back to the math attention)
    kv = args.kv_heads * args.head_dim if device_type == "cpu" and not args.attn_dropout else widths["attention"]
    # the norms' inputs, q, k, v and the attention's output, the SwiGLU's two inputs; the norms'
    # statistics, residual dropout's masks
    kept = (2 * args.dim + 2 * widths["attention"] + 2 * kv + 2 * args.hidden_dim) * item + 16
    qk = (args.n_heads + args.kv_heads) * args.head_dim if args.qk_norm else 0  # Qwen3's q and k norms' inputs
    kept += qk * item * (2 if lora is None else 1)  # and, training their weights, their outputs before them
    if args.resid_dropout:
        kept += 2 * args.dim
    if args.attn_dropout:  # the math attention (no fused kernel takes dropout): fp32 copies of q, k, v, out
        kept += 4 * widths["attention"] * 4
    if lora is None:  # each linear's input for its weight's gradient, the norms' outputs before their weight
        return kept + (2 * args.dim + sum(widths.values())) * item
    inputs = [_ADAPTER_INPUTS[t] for t in lora.targets if t in _ADAPTER_INPUTS]
    kept += sum(widths[k] for k in set(inputs)) * item + len(inputs) * lora.rank * 4  # and x·Aᵀ, fp32
    return kept + (sum(widths[k] for k in inputs) if lora.dropout else 0)


def working_set(args: ModelArgs, dtype: torch.dtype, batch: int, seq: int, micro: int,
                loss_chunk: int, kv_cache: bool = False, device_type: str = "cuda",
                lora: LoraConfig | None = None) -> dict[str, int]:
    """Bytes of activations a step holds besides the units, by kind (estimates, on the high side),
    on a device of `device_type` as torch names it (the emulated device computes on "cpu"); `lora`:
    the adapters trained, None where every weight is."""
    item = dtype.itemsize
    tokens = batch * seq
    hidden = args.hidden_dim
    return {
        # each block's input, per micro-batch, from the forward until that block's backward
        "stash": (args.n_layers + 1) * micro * tokens * args.dim * item,
        # one block recomputed with a graph, and its backward: q/k/v/o, norms and residuals, the
        # FFN's three hidden-size tensors, and the attention's scores where they are made
        "block": 2 * tokens * (8 * args.dim + 4 * hidden) * item + _scores(args, batch, seq, device_type),
        # one chunk's logits in fp32 (`logit_buffers`: with their log-softmax and gradients), the
        # head's own output in a narrower compute dtype (the final norm keeps its input, a view of
        # the head's); the head input's gradient and one chunk's part of it (whole-size, then added)
        "loss": (min(loss_chunk, tokens) * (logit_buffers(device_type) * 4 + (item if item < 4 else 0))
                 * args.vocab_size + 2 * tokens * args.dim * item),
        # every block's activations kept with their graph (the weights as handles); with attention
        # dropout, the math attention's probabilities, their dropped copy and mask in fp32
        "kept": args.n_layers * micro * (tokens * _kept_per_token(args, item, lora, device_type)
                                         + (3 * batch * args.n_heads * seq * seq * 4 if args.attn_dropout else 0)),
        # generation: keys and values of every layer for every position
        "kv": 2 * args.n_layers * tokens * (args.n_kv_heads or args.n_heads) * args.head_dim * item if kv_cache else 0,
    }


def _scores(args: ModelArgs, batch: int, seq: int, device_type: str) -> int:
    """Bytes of the attention scores (batch x heads x seq x seq) a block's forward and backward
    hold at once. On the CPU, SDPA's fused kernel makes none; with attention dropout it falls
    back to the math kernel, whose scores, probabilities, mask and their gradients came to 3.3-3.9
    fp32 copies at their peak (one block, 256 wide, 8 heads, 1,024 tokens, fp32 and bf16):
    counted as 4. Other devices: 3, as before (not measured here: on the high side where CUDA's
    fused kernels run). Counted as 3 on the CPU without dropout, 32 heads at 2,048 tokens (Llama
    2 7B's) were 1.5 GiB of scores never made: a block 2,048 wide peaked at 164 MiB in all."""
    if device_type != "cpu":
        return 3 * batch * args.n_heads * seq * seq * 4
    return 4 * batch * args.n_heads * seq * seq * 4 if args.attn_dropout else 0


def local_ranks(device: Device) -> int:
    """How many ranks share this machine's memory (torchrun's LOCAL_WORLD_SIZE; 1 outside
    torchrun). More ranks than the machine has GPUs is an error: two would share one GPU."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        ranks = int(text)
    except ValueError:
        raise ConfigError(f"LOCAL_WORLD_SIZE={text!r} is not a number of processes; "
                          "launch with torchrun or blocktune --nproc N") from None
    if ranks < 1:
        raise ConfigError(f"LOCAL_WORLD_SIZE={ranks} must be at least 1")
    devices = device.local_devices()
    if devices is not None and ranks > devices:
        raise ConfigError(f"{ranks} processes on this machine but {devices} {device.type} device(s): two ranks "
                          f"would share one device's memory; use --nproc {devices} (or fewer)")
    return ranks


def _device_room(device: Device, host_free: int | None, host_room: int | None,
                 unit_sizes: dict[str, int], unit_files: dict[str, int],
                 ranks: int = 1) -> tuple[int | None, int, int, str]:
    """The compute device's memory for the resident units, the stash and the working set
    (None: unknown), the bytes of units in flight beside them (and beside one unit, where the
    budget holds no more), and where the room was found.
    `host_free` is already this rank's share; a device whose memory all `ranks` draw on (not
    one GPU each) is shared the same way."""
    if device.is_cpu:
        free, room = host_free, host_room
        # raw unit files on their way in: one in flight and one idle for reuse where they are
        # converted to the compute dtype (with room for one unit only one: the next file is read
        # once this one is converted into its slot, and none is kept idle); otherwise (units kept
        # as stored: frozen embeddings and head) the resident units are the read buffers
        converted = [unit_files[n] for n in unit_files if unit_sizes[n] > unit_files[n]]
        in_flight = 2 * max(converted) if converted else max(unit_files.values())
        return room, in_flight, in_flight // 2 if converted else in_flight, f"{_mib(free)} free" if free is not None else ""
    free = device.memory_free()
    if free is not None and device.local_devices() is None:
        free //= ranks  # one memory for every rank on the machine
    room = None if free is None else int(free * 0.9) - 256 * MiB
    if device.splits_host_ram and room is not None and host_room is not None:
        room = min(room, host_room // 2)  # its "device" memory is host RAM, shared with the tier
    in_flight = max(unit_sizes.values())  # the ring: one unit on its way to the device beside the resident ones
    return room, in_flight, in_flight, f"{_mib(free)} free on {device}" if free is not None else ""


def _host_budget(device: Device, host, host_free: int | None, host_room: int | None, largest_file: int,
                 notes: list[str]) -> int | None:
    """The host tier's budget for `host` given as bytes, None or "auto" (accelerators: what
    RAM holds beside the bounce slots; the CPU has no tier), with a note on how."""
    if device.host_is_device:
        return None if host == AUTO else host  # the CPU has no host tier: RAM is the device
    if host != AUTO:
        return host
    if not device.host_tier_useful:
        notes.append(f"host_budget auto: 0 (on {device} host and device memory are one: no second copy)")
        return 0
    if host_room is None:
        notes.append("host_budget auto: 0 (this OS does not say how much memory is free)")
        return 0
    hroom = host_room // 2 if device.splits_host_ram else host_room
    bounce = BOUNCE_SLOTS * round_up(largest_file)
    host = max(hroom - bounce, 0)
    notes.append(f"host_budget auto: {_mib(host)} = {_mib(host_free)} free - 10% - 192 MiB "
                 f"- bounce slots {_mib(bounce)}" + (" (half: the emulated device uses the other)"
                                                  if device.splits_host_ram else ""))
    return host


def resolve(device: Device, args: ModelArgs, unit_sizes: dict[str, int], unit_files: dict[str, int],
            compute_dtype: torch.dtype, *, method: str,
            device_budget, host_budget, activation_budget, keep_budget=0, spill_budget=0, batch: int = 1, seq: int = 512,
            micro: int = 1, loss_chunk: int = 2048, kv_cache: bool = False, state_kinds: int = 3,
            lora: LoraConfig | None = None) -> Budgets:
    """Budgets in bytes (None: unlimited) for budgets given as bytes, None, or "auto".

    `unit_sizes`: each unit as held resident (compute dtype); `unit_files`: as stored.
    `keep_budget`: activations kept to skip the recompute ("auto": what is left beside every
    unit resident). `spill_budget`: disk for the activations of the blocks past it, which are
    then written and read back instead of recomputed ("auto": as much as they need). `state_kinds`: a full fine-tune's fp32 tensors of optimizer state per
    weight (master, exp_avg, exp_avg_sq: `blocktune.engine.optim.state_kinds`). `lora`: the
    adapters a LoRA run trains (what its blocks keep for the backward), None for a full fine-tune.
    """
    ranks = local_ranks(device)
    if AUTO not in (device_budget, host_budget, activation_budget, keep_budget, spill_budget):
        spill = spill_budget if device.host_is_device and keep_budget is not None else 0
        return Budgets(device_budget, host_budget, activation_budget, keep=keep_budget,
                       spill=limit(spill) if spill != 0 else 0, spill_overlap=spill != 0)
    largest, largest_file = max(unit_sizes.values()), max(unit_files.values())
    work = working_set(args, compute_dtype, batch, seq, micro, loss_chunk, kv_cache, device.torch.type, lora)
    # a full fine-tune's step (generation and eval without an adapter run as "full", read-only:
    # kv_cache, and have neither gradients nor optimizer state)
    trains_full = method == "full" and not kv_cache
    extra = _full_step_bytes(largest // compute_dtype.itemsize, state_kinds) if trains_full else 0
    # on the CPU, units used as they are read (not converted into slots the budget holds): a
    # unit's write-back writes its new version from the unit's own buffer, which it holds after
    # the pager has let the unit go
    held = trains_full and device.is_cpu and all(unit_sizes[n] == unit_files[n] for n in unit_files)
    extra += largest if held else 0
    notes: list[str] = []
    host_free, host_room = _host_room(device, ranks, notes)
    room, in_flight, in_flight_one, where = _device_room(device, host_free, host_room, unit_sizes, unit_files, ranks)
    fixed = work["block"] + work["loss"] + work["kv"] + extra + in_flight
    dev, act, keep, state = device_budget, activation_budget, keep_budget, 0
    spills = _spills(spill_budget, device, _intensity(args, batch * seq * micro, work["kept"], compute_dtype))
    if room is None:  # nothing to go by: unlimited units, no activations kept beyond the stash
        if dev == AUTO:
            dev = None
            notes.append(f"device_budget auto: unlimited ({device} does not say how much memory is free)")
        act = work["stash"] if act == AUTO else act
        if keep == AUTO:
            keep = 0
            notes.append(f"keep_activations auto: 0 ({device} does not say how much memory is free): "
                         "each block is recomputed in the backward")
    else:
        dev, act = _units_and_stash(device, room - fixed, largest, fixed, where, dev, act, work, extra, notes)
        if keep == AUTO:
            keep, dev = _kept(room - fixed - (work["stash"] if act is None else act), dev, device_budget == AUTO,
                              unit_sizes, work["kept"], args.n_layers, notes, spills=spills)
            if trains_full and device.host_is_device:
                state, keep = _state_in_ram(keep, work["kept"], _stepped_sizes(args, unit_sizes, compute_dtype),
                                            compute_dtype, state_kinds, notes)
    host = _host_budget(device, host_budget, host_free, host_room, largest_file, notes)
    fixed_one = fixed - in_flight + in_flight_one  # what one unit resident has beside it
    if device_budget == AUTO and room is not None and room - fixed_one < largest:
        _warn_short(fixed_one, largest, room, extra, notes)
    tight = device_budget == AUTO and not holds_two_units(dev, largest)
    units = sum(unit_sizes.values())  # what the units hold: their budget, or less
    left = None if room is None else room - (fixed_one if tight else fixed) - sum(
        b or 0 for b in (units if dev is None else min(dev, units), act, keep, state))
    spill, overlap, keep = _spill(spill_budget, spills, keep, keep_budget == AUTO, work["kept"], args,
                                  batch * seq * micro, left, device, notes, compute_dtype)
    # glibc's heap keeps what freed activations leave in it, in holes it does not reuse (a 7B bf16
    # LoRA step under 2 GiB with two units resident: 0.66 GB of free heap after one step, and the
    # cgroup's kill in the next): where the units are paged through RAM, freed heap goes back to
    # the OS between units, at some page faults' cost (`blocktune.machine.hostmem.LeanHeap`)
    lean = device.host_is_device and device_budget == AUTO and dev is not None and dev < units
    # LoRA, generation, eval: a unit's tensors come from the heap and are reused within it, given
    # back once the process has grown by 5% of the free RAM (at most 128 MiB: half the 10% slack);
    # a full fine-tune's big gradients and optimizer pieces are mapped fresh and the heap trimmed
    # before every unit (held in the heap, they killed the laptop-shaped full step under 1 GiB)
    heap_slack = 0 if trains_full or host_free is None else min(128 * MiB, host_free // 20)
    given_back = ("after every unit, and a unit's big tensors are mapped fresh" if not heap_slack else
                  f"between units once the process has grown by {_mib(heap_slack)}")
    if tight:
        notes.append(f"memory is tight (room for under two units): freed heap memory goes back to the OS {given_back}")
    elif lean:
        notes.append(f"the units are paged through RAM: freed heap memory goes back to the OS {given_back}")
    return Budgets(dev, host, act, tuple(notes), tight, keep, state, spill, overlap, tight or lean,
                   heap_slack if tight or lean else 0)


def _full_step_bytes(params: int, state_kinds: int) -> int:
    """A full fine-tune's step beside the units: one unit's gradients (at most fp32), and its
    optimizer step's pieces: old and new of each kind of fp32 state (masters, moments), the
    piece of weights and of gradient widened to fp32, and a piece being written."""
    return params * 4 + (2 * state_kinds + 4) * STATE_PIECE * 4


def _host_room(device: Device, ranks: int, notes: list[str]) -> tuple[int | None, int | None]:
    """(this rank's share of the free RAM, the room in it after the slack); None: unknown."""
    host_free = host_memory_free()
    if host_free is not None and ranks > 1:  # the machine's RAM, shared by its ranks
        host_free //= ranks
        notes.append(f"{ranks} ranks on this machine (LOCAL_WORLD_SIZE): each takes 1/{ranks} of the free RAM"
                     + ("" if device.local_devices() is not None else f" and of {device}'s memory"))
    # 10% and 192 MiB: allocator fragmentation, temporaries, the tokenizer and data
    return host_free, None if host_free is None else int(host_free * 0.9) - 192 * MiB


def _units_and_stash(device: Device, avail: int, largest: int, fixed: int, where: str, dev, act,
                     work: dict[str, int], extra: int, notes: list[str]):
    """The device budget and the activation budget from `avail` (the room after the fixed
    working set): the units first, the stash in RAM from what is left (it can spill)."""
    if dev == AUTO:
        stash_wanted = work["stash"] if act == AUTO else min(act or work["stash"], work["stash"])
        dev = max(largest, avail - stash_wanted)
        notes.append(f"device_budget auto: {_mib(dev)} ({dev / largest:.1f}x the largest unit) = {where} "
                     f"- 10% and {256 if not device.is_cpu else 192} MiB slack - {_mib(fixed)} for one block's "
                     f"recompute, the loss chunk, units in flight"
                     + (", a unit's gradients and optimizer step (fp32 state)" if extra else "")
                     + (", the KV cache" if work["kv"] else "") + f" - {_mib(stash_wanted)} of stash")
    if act == AUTO:
        act = min(work["stash"], max(16 * MiB, avail - (dev or 0)))
        notes.append(f"activation_budget auto: {_mib(act)} (the stashed block inputs need ≈"
                     f"{_mib(work['stash'])}" + ("; the rest spills to disk)" if act < work["stash"] else ")"))
    return dev, act


def _kept(spare: int, dev, dev_auto: bool, unit_sizes: dict[str, int], every: int, blocks: int,
          notes: list[str], spills: bool = False) -> tuple[int, int | None]:
    """`keep_activations auto`: the RAM left beside every unit resident (or the device budget,
    where it holds fewer) and the stash keeps blocks' activations so that the backward does not
    recompute them (the fast mode); under one block's, none (each block recomputed, slower).
    Where `auto` chose the device budget too, activations come before units past the two a pass
    needs (the one computing, the one read ahead): a unit more resident saves a reload the read
    ahead hides anyway, a block's activations kept save its recompute, a third of its compute
    (7B shape in RAM: 19.7-22.2 s a step keeping 2 GiB against 26-31 s with 25 units resident).
    `spills`: the blocks left out go to disk (`_spill`), not to a recompute. Returns (the keep budget, the device budget less what was given to it where `auto` chose it)."""
    units = sum(unit_sizes.values())
    held = units if dev is None else min(dev, units)
    one = every // blocks  # `every`: all `blocks` blocks' activations (working_set's "kept")
    if dev_auto and dev is not None and spare - held < every:
        two = min(units, 2 * max(unit_sizes.values()))
        give = max(0, min(held - two, every - (spare - held)))
        if give and spare - held + give >= one:  # room for a block's activations at least
            held -= give
            notes.append(f"device_budget auto: {_mib(held)} after giving {_mib(give)} to kept activations "
                         "(they save the backward's recompute; a unit more resident saves only a reload)")
    spare -= held
    rest = "kept on disk (spill_activations)" if spills else "recomputed"
    if spare < one:
        notes.append(f"keep_activations auto: 0 (no room beside the units for one block's activations, ≈{_mib(one)}):"
                     + (" each block's are kept on disk (spill_activations)" if spills
                        else " each block is recomputed in the backward (slower)"))
        return 0, dev
    notes.append(f"keep_activations auto: up to {_mib(spare)} beside the units resident: "
                 + (f"every block's activations (≈{_mib(every)}) are kept, no recompute in the backward"
                    if spare >= every else f"≈{spare * 100 // every}% of the blocks' ≈{_mib(every)} kept, the rest {rest}"))
    return spare, (held if dev_auto else dev)


def _stepped_sizes(args: ModelArgs, unit_sizes: dict[str, int], dtype: torch.dtype) -> dict[str, int]:
    """Each unit's bytes that its optimizer step steps: a tied head's resident matrix is the
    embeddings', stepped (and its state kept) with embed."""
    if not args.tie_embeddings or "head" not in unit_sizes:
        return unit_sizes
    return {**unit_sizes, "head": max(0, unit_sizes["head"] - args.vocab_size * args.dim * dtype.itemsize)}


def _state_in_ram(keep: int, every: int, unit_sizes: dict[str, int], dtype: torch.dtype, kinds: int,
                  notes: list[str]) -> tuple[int, int]:
    """A full fine-tune's optimizer state kept in RAM between steps, from what `keep_activations
    auto` found beside the units past every block's activations: each unit's state is stepped in
    RAM and only written, not read back from the store (mapped, at about 0.5 GB/s here). Units
    and kept activations come first: they save compute, this saves a read. Returns (the state's
    budget, the keep budget less it)."""
    if not kinds:  # plain SGD keeps no state
        return 0, keep

    def of(size: int) -> int:  # fp32 masters and moments, and the step count
        return size // dtype.itemsize * kinds * 4 + 4

    whole = sum(of(n) for n in unit_sizes.values())
    room = max(0, keep - every)
    one = of(max(unit_sizes.values()))
    if room < one:
        notes.append(f"optimizer_state auto: read back from the store each step (no room beside the units and "
                     f"activations for a unit's, ≈{_mib(one)})")
        return 0, keep
    state = min(whole, room)
    notes.append(f"optimizer_state auto: {_mib(state)} kept in RAM between steps "
                 + ("(all of it" if state == whole else f"(of ≈{_mib(whole)}") + ": stepped there, written to the "
                 "store, not read back)")
    return state, keep - state


# `spill_activations auto` spills a block's activations only where recomputing them costs at least
# this many FLOPs (at fp32's speed) per byte of them: at about 100 GFLOP/s against a disk that
# writes and reads back at 1.5 GB/s each, the two cost the same near 130. Measured in fp32, when a
# block kept 43 and 270 KiB a token: SmolLM2-135M (113) recomputed in 5.9 s a step against 9.0 s
# spilled; the 7B shape (920) took 35.4 s spilled against 40.4 s recomputed. Today's: SmolLM2 in
# fp32 235, in bf16 217; the 7B shape 1,717 and 1,605 (LoRA, 4 x 256 and 1 x 128).
SPILL_MIN_FLOPS_PER_BYTE = 400


def block_flops_per_token(args: ModelArgs) -> int:
    """A block's forward FLOPs per token in its linears (2 per weight; attention's scores aside)."""
    q = args.n_heads * args.head_dim
    kv = (args.n_kv_heads or args.n_heads) * args.head_dim
    return 2 * (args.dim * (2 * q + 2 * kv) + 3 * args.dim * args.hidden_dim)


# how much faster the CPU computes a block in a dtype narrower than fp32, where `auto` chooses
# one (avx512_bf16: a 7B-shaped step 2.8x fp32's, SmolLM2's 1.35-1.55x; the laptop shape's full
# fine-tune under 1 GiB, 485 at this speed, took 11.7 s a step spilled and 11.7 s recomputed)
NARROW_SPEEDUP = 2


def _intensity(args: ModelArgs, tokens: int, every: int, dtype: torch.dtype) -> float:
    """FLOPs of a block's recompute per byte of its activations (`every`: all blocks'), at fp32's
    speed: computed in bf16 the FLOPs count a half (`NARROW_SPEEDUP`), the bytes as they are."""
    speed = NARROW_SPEEDUP if dtype.itemsize < 4 else 1
    return block_flops_per_token(args) * tokens / speed / max(every // args.n_layers, 1)


def _spills(asked, device: Device, intensity: float) -> bool:
    """Whether the blocks' activations that RAM does not keep go to disk rather than to a
    recompute: where host RAM is the device, the spill is not off (`asked` 0), and under `auto`
    a block's recompute costs at least `SPILL_MIN_FLOPS_PER_BYTE` per byte of them (`intensity`).
    `resolve` decides it once: `_kept` words its note by it, `_spill` sizes the spill by it."""
    if asked == 0 or not device.host_is_device:
        return False
    return asked != AUTO or intensity >= SPILL_MIN_FLOPS_PER_BYTE


def _spill(asked, spills: bool, keep, keep_auto: bool, every: int, args: ModelArgs, tokens: int,
           left: int | None, device: Device, notes: list[str], dtype: torch.dtype) -> tuple[int, bool, int | None]:
    """The disk for the activations of the blocks that `keep` leaves out (`asked`: bytes, None
    for no limit, "auto" for what they need, 0 for none: they are recomputed) and whether RAM
    (`left`: what the other budgets leave) holds a block's activations more, so that each block's
    are written while the next computes and read back while the one after it in the backward
    does; without it, each write and read is waited for (still well under a recompute). Where
    `auto` chose the keep budget, it gives a block's room to that. Returns (the spill's budget,
    the overlap, the keep budget)."""
    if asked == 0 or keep is None or keep == AUTO or keep >= every or not device.host_is_device:
        return 0, False, keep
    one = every // args.n_layers
    if not spills:  # `auto`, and the recompute is cheap beside the disk
        notes.append(f"spill_activations auto: 0 (a block's recompute costs ≈{_intensity(args, tokens, every, dtype):.0f} "
                     f"FLOPs at fp32's speed per byte of its activations, under {SPILL_MIN_FLOPS_PER_BYTE}: "
                     "recomputing is quicker than the disk)")
        return 0, False, keep
    overlap = left is None or left >= one
    if not overlap and keep_auto and keep >= one:  # a block more on disk, and every write overlapped
        keep, overlap = keep - one, True
        notes.append(f"keep_activations auto: {_mib(keep)} after giving a block's ({_mib(one)}) to the spill's overlap")
    rest = every - keep
    spill = rest if asked == AUTO else limit(asked)
    notes.append(f"spill_activations {'auto' if asked == AUTO else 'set'}: the blocks' activations past the RAM's "
                 f"(≈{_mib(rest)}) go to disk in the forward and come back for the backward instead of being "
                 "recomputed" + ("" if asked == AUTO else ", up to the disk's room" if asked is None
                                 else f", up to {_mib(spill)}")
                 + ("" if overlap else f" (no room for a block's more, ≈{_mib(one)}: each write and read is waited for)")
                 + "; spill_activations = 0 recomputes them")
    return spill, overlap, keep


def _warn_short(fixed: int, largest: int, room: int, extra: int, notes: list[str]) -> None:
    need = fixed + largest
    hint = ("--method lora, or optimizer = \"sgd\" in --config" if extra else "a smaller --seq-len, --batch-size or --grad-accum")
    notes.append(f"warning: this run needs about {_mib(need)} with one unit resident (the largest, "
                 f"{_mib(largest)}, and {_mib(fixed)} beside it) and {_mib(room)} are there after the slack: "
                 f"it may be killed for memory; try {hint}, or a machine with more memory")
