"""The structure of a decoder, found by running a small copy of it rather than listed by hand.

From a model's config, :func:`discover` builds the same architecture at a tiny width (a few
heads, two blocks, a short vocabulary; random weights, float32), runs one forward with hooks
and reads off:

- the decoder blocks: the ModuleList of the model's ``_no_split_modules`` class, else the
  longest ModuleList of identical modules holding Linears;
- the embeddings (parameter-holding modules that run before block 0), the final norm (the last
  one that runs between the last block and the head) and the head (the output embeddings);
- the Linears of a block in execution order, grouped by the input tensor they read (q, k and v
  read one tensor; gate and up another): the true-sequential stages of GPTQ;
- the residual tail: the last Linear when the block's output is exactly the residual plus that
  Linear's output (checked by zeroing it);
- the scaling pairs AWQ and SmoothQuant fold scales through: the norm whose output a group reads
  (norm -> the group's Linears), and, for a group of one Linear, an earlier Linear whose
  outputs become its inputs channel by channel (v -> o, up -> down; head by head under
  grouped-query attention). Each candidate is verified on the block: random positive scales
  folded in must leave the block's output unchanged (to 1e-4 relative); a norm that computes
  ``x * (1 + w)`` is recognised the same way. Candidates that fail are kept with the reason.

The result is cached per config. :data:`llmc.models.adapters.OVERRIDES` can amend it for
what no forward shows (nothing needs it today: Gemma's ``1 + w`` norms and OPT's post-norm and
non-ReLU variants are all read off the forward).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core.tree import first_tensor
from llmc.models.moe import ExpertList, expert_lists, unfuse_experts
from llmc.models.scaling import ScalePair, apply_scales, head_tie

# Linears whose outputs feed the attention scores: AWQ's clipping leaves them alone (their
# error is amplified through the softmax), as AutoAWQ does.
_NO_CLIP = re.compile(r"^(q|k|query|key|qk|qkv|wqkv|query_key_value)(_proj)?$", re.IGNORECASE)
_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Refusal:
    """A scaling pair that was tried and did not hold, and why."""

    prev: str
    linears: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Structure:
    """What :func:`discover` found (the fields of :class:`~llmc.models.adapters.Adapter`)."""

    blocks: str
    embeddings: tuple[str, ...]
    norm: str | None
    head: str
    groups: tuple[tuple[str, ...], ...]
    tail: str | None
    scale_pairs: tuple[ScalePair, ...]
    norm_offset: float
    no_clip: tuple[str, ...]
    refused: tuple[Refusal, ...] = field(default=())
    experts: tuple[str, ...] = ()  # the ExpertList modules of a block (MoE layers)
    routers: tuple[str, ...] = ()  # Linears that gate experts: kept dense unless targeted


class StructureError(ValueError):
    """The structure of an architecture could not be read; the message names what is missing."""


# -- a small copy of the architecture ----------------------------------------------------------
_HEADS = 4
_SMALL = {
    "intermediate_size": 96, "ffn_dim": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "vocab_size": 512,
}
_LAYER_LISTS = ("layer_types",)


def small_config(config: Any, layers: int = 2) -> Any:
    """``config`` at a tiny width: ``_HEADS`` heads (KV heads keep grouped attention), the head
    dimension kept (rope settings depend on it), ``layers`` blocks, a 512-token vocabulary."""
    c = copy.deepcopy(config)
    heads = getattr(c, "num_attention_heads", None)
    hidden = getattr(c, "hidden_size", None)
    if heads and hidden:
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        kv = getattr(c, "num_key_value_heads", None)
        c.num_attention_heads = _HEADS
        if kv is not None:
            c.num_key_value_heads = _HEADS if kv == heads else max(1, _HEADS // 2)
        if getattr(c, "head_dim", None):
            c.head_dim = head_dim
            c.hidden_size = min(hidden, 64)
        else:
            c.hidden_size = _HEADS * head_dim
        if getattr(c, "word_embed_proj_dim", None) is not None:  # OPT
            c.word_embed_proj_dim = c.hidden_size if config.word_embed_proj_dim == hidden \
                else c.hidden_size // 2
    for k, v in _SMALL.items():
        if getattr(c, k, None):
            setattr(c, k, v)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        t = getattr(c, k, None)
        if isinstance(t, int) and t >= c.vocab_size or isinstance(t, list):
            setattr(c, k, None)
    n = getattr(c, "num_hidden_layers", None)
    if n:
        c.num_hidden_layers = min(n, layers)
        for k in _LAYER_LISTS:
            v = getattr(c, k, None)
            if isinstance(v, list):
                setattr(c, k, v[: c.num_hidden_layers])
    return c


def _random_model(config: Any, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms and biases: away from 0 and 1, so foldings are tested
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    model.eval()
    if any(getattr(m, "gate_up_proj", None) is not None for m in model.modules()):
        # MoE: the experts split into per-expert Linears must compute the same logits
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            unfuse_experts(model, config.model_type)
            out = model(input_ids=ids, use_cache=False).logits
        # (a wrong split differs by the logits' own size; float32 sums in another order,
        # as transformers 5.25's fused experts make, by about 1e-6)
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            raise StructureError(
                "its experts split into per-expert Linears compute other logits than the fused "
                f"experts (max difference {float((out - ref).abs().max()):.1e}); llmc cannot "
                "split this MoE layout")
    return model


# -- tracing -------------------------------------------------------------------------------------
@dataclass
class _Call:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None


def _trace(root: nn.Module, run: Callable[[], Any],
           leaf: Callable[[nn.Module], bool] = lambda m: True) -> tuple[list[_Call], Any]:
    """Run ``run()`` with hooks on every submodule of ``root``: the calls in the order they
    started, each with its inputs and output."""
    calls: list[_Call] = []
    handles = []
    for name, m in root.named_modules():
        if not name or not leaf(m):
            continue

        def pre(mod, args, kwargs, name=name):
            calls.append(_Call(name, mod, args, kwargs))

        def post(mod, args, kwargs, out):
            for c in reversed(calls):
                if c.module is mod and c.output is None:
                    c.output = out
                    break

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            out = run()
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    named = [(n, m) for n, m in lists if all(type(c).__name__ in wanted for c in m)]
    if not named:
        named = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1
                 and not isinstance(m, ExpertList)
                 and any(isinstance(x, nn.Linear) for x in m[0].modules())]
    if not named:
        raise StructureError(
            f"no decoder blocks found in {type(model).__name__}: no ModuleList of its "
            f"_no_split_modules ({', '.join(sorted(wanted)) or 'none declared'}) and none of "
            "identical layers holding Linears")
    return max(named, key=lambda x: len(x[1]))


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _outside(model: nn.Module, blocks_name: str) -> tuple[tuple[str, ...], str | None, str]:
    """Embeddings, final norm and head, from one traced forward of the whole model."""
    head_mod = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if head_mod is None or id(head_mod) not in names:
        raise StructureError(f"{type(model).__name__} has no output embeddings (LM head)")
    head = names[id(head_mod)]
    ids = torch.arange(8).reshape(1, 8) % model.config.vocab_size
    calls, _ = _trace(model, lambda: model(input_ids=ids, use_cache=False), _has_params)
    inside = blocks_name + "."
    first = next(i for i, c in enumerate(calls) if c.name.startswith(inside))
    last = max(i for i, c in enumerate(calls) if c.name.startswith(inside))
    embeddings = tuple(dict.fromkeys(c.name for c in calls[:first]))
    after = [c.name for c in calls[last + 1:] if c.name != head]
    return embeddings, after[-1] if after else None, head  # post-norm models have none


def _same(a: Any, b: Any) -> bool:
    """The same tensor, or a view of it with the same elements (a reshape)."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return False
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel()
                      and a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous())


def _input(call: _Call) -> Tensor | None:
    if call.args and isinstance(call.args[0], Tensor):
        return call.args[0]
    return next((v for v in call.kwargs.values() if isinstance(v, Tensor)), None)


def _block_structure(block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    calls, ref = _trace(block, lambda: block(*args, **kwargs))
    ref = first_tensor(ref)
    linear_calls = [c for c in calls if isinstance(c.module, nn.Linear)]
    if not linear_calls:
        raise StructureError(f"{type(block).__name__} runs no nn.Linear")
    seen: set[str] = set()
    for c in linear_calls:
        if c.name in seen:
            raise StructureError(f"{type(block).__name__}.{c.name} runs more than once per "
                                 "forward; llmc needs each Linear to run once")
        seen.add(c.name)
    groups: list[tuple[Tensor, list[str]]] = []
    for c in linear_calls:
        x = _input(c)
        for gx, names in groups:
            if _same(gx, x):
                names.append(c.name)
                break
        else:
            groups.append((x, [c.name]))
    return {"calls": calls, "ref": ref, "linears": linear_calls, "groups": groups}


def _find_tail(block: nn.Module, args: tuple, kwargs: dict, found: dict) -> str | None:
    last = found["linears"][-1]
    if found["groups"][-1][1] != [last.name]:
        return None
    zero = block.get_submodule(last.name).register_forward_hook(
        lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            out0 = first_tensor(block(*args, **kwargs))
    finally:
        zero.remove()
    lin_out = last.output
    if lin_out is None or out0.shape != found["ref"].shape or lin_out.shape != out0.shape:
        return None
    return last.name if torch.equal(out0 + lin_out, found["ref"]) else None


def _holds(block: nn.Module, args: tuple, kwargs: dict, ref: Tensor, pair: ScalePair,
           offset: float, gen: torch.Generator) -> tuple[bool, str]:
    trial = copy.deepcopy(block)
    prev = trial.get_submodule(pair.prev)
    try:
        tie = head_tie(trial, pair)
    except ValueError as e:
        return False, str(e)
    width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()
    s = torch.rand(width, generator=gen) * 1.5 + 0.5
    apply_scales(trial, pair, s, offset, tie)
    with torch.no_grad():
        out = first_tensor(trial(*args, **kwargs))
    err = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    return err <= _TOLERANCE, f"folding random scales changed the block's output by {err:.1e}"


def _norm_like(m: nn.Module, width: int) -> bool:
    """A module with a 1-D weight over ``width`` channels that is not a Linear (a norm)."""
    w = getattr(m, "weight", None)
    return not isinstance(m, nn.Linear) and isinstance(w, Tensor) and w.dim() == 1 \
        and w.numel() == width


def _common_parent(names: list[str]) -> str | None:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) or None


def _tokenwise(block: nn.Module, calls: list[_Call], inspect: str, x: Tensor) -> bool:
    """Whether ``inspect`` treats each token on its own: permuting the tokens of its input
    permutes its output the same way."""
    call = next((c for c in calls if c.name == inspect), None)
    if call is None or x.dim() < 3:
        return False
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(1))

    def swap(v: Any) -> Any:
        return v[:, perm] if _same(v, x) else v

    args = tuple(swap(a) for a in call.args)
    kwargs = {k: swap(v) for k, v in call.kwargs.items()}
    if all(a is b for a, b in zip(args, call.args)) and \
            all(kwargs[k] is call.kwargs[k] for k in kwargs):
        return False
    with torch.no_grad():
        out = first_tensor(call.module(*args, **kwargs))
    ref = first_tensor(call.output)
    return out.shape == ref.shape and torch.allclose(out, ref[:, perm], rtol=1e-5, atol=1e-6)


def _scale_pairs(block: nn.Module, args: tuple, kwargs: dict, found: dict
                 ) -> tuple[tuple[ScalePair, ...], float, tuple[Refusal, ...]]:
    calls, ref = found["calls"], found["ref"]
    order = [c.name for c in found["linears"]]
    gen = torch.Generator().manual_seed(0)
    pairs: list[ScalePair] = []
    refused: list[Refusal] = []
    offsets: set[float] = set()
    for x, names in found["groups"]:
        lin = tuple(names)
        width = block.get_submodule(names[0]).in_features
        producer = next((c for c in calls if _same(first_tensor(c.output), x)
                         and _norm_like(c.module, width)), None)
        if producer is not None:
            inspect = _common_parent(names)
            pair = ScalePair(producer.name, lin, inspect,
                             tokenwise=bool(inspect) and _tokenwise(block, calls, inspect, x))
            reasons = []
            for offset in (0.0, 1.0):
                ok, why = _holds(block, args, kwargs, ref, pair, offset, gen)
                if ok:
                    pairs.append(pair)
                    offsets.add(offset)
                    break
                reasons.append(f"as x * {'(1 + w)' if offset else 'w'}: {why}")
            else:
                refused.append(Refusal(producer.name, lin, "; ".join(reasons)))
            continue
        if len(names) != 1:
            refused.append(Refusal("", lin, "no norm produces their input"))
            continue
        # a Linear whose outputs become this one's inputs channel by channel (or head by head),
        # the nearest first
        first = order.index(names[0])
        tried = []
        for prev_name in reversed(order[:first]):
            prev = block.get_submodule(prev_name)
            if width % prev.out_features:
                continue
            pair = ScalePair(prev_name, lin)
            ok, why = _holds(block, args, kwargs, ref, pair, 0.0, gen)
            if ok:
                pairs.append(pair)
                break
            tried.append((prev_name, why))
        else:
            if tried:
                refused.append(Refusal(tried[0][0], lin, tried[0][1] + (
                    f" (and {len(tried) - 1} other Linears tried)" if len(tried) > 1 else "")))
            else:
                refused.append(Refusal("", lin, "no norm produces its input and no earlier "
                                                "Linear's outputs map onto its inputs"))
    if len(offsets) > 1:
        raise StructureError("the block's norms mix x * w and x * (1 + w); llmc cannot fold "
                             "scales through both")
    return tuple(pairs), offsets.pop() if offsets else 0.0, tuple(refused)


def _block_inputs(model: nn.Module, blocks_name: str) -> tuple[tuple, dict]:
    """The positional and keyword arguments block 0 receives in a forward of the model."""
    block0 = model.get_submodule(blocks_name)[0]
    got: dict[str, Any] = {}

    def grab(mod, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Stop

    h = block0.register_forward_pre_hook(grab, with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    if "args" not in got:
        raise StructureError(f"{type(model).__name__}: block 0 never ran in a forward")
    return got["args"], dict(got["kwargs"])


class _Stop(Exception):
    pass


def discover_model(model: nn.Module) -> Structure:
    """The structure of ``model`` (a small random copy of an architecture: see
    :func:`discover`)."""
    blocks_name, blocks = _find_blocks(model)
    args, kwargs = _block_inputs(model, blocks_name)
    block = blocks[0]
    experts = expert_lists(block)
    for m in experts.values():  # every expert runs, so every expert's Linears are seen
        m.route_all = True
    try:
        return _discover_block(model, blocks_name, blocks, args, kwargs, experts)
    finally:
        for m in experts.values():
            m.route_all = False


def _discover_block(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, args: tuple,
                    kwargs: dict, experts: dict[str, ExpertList]) -> Structure:
    embeddings, norm, head = _outside(model, blocks_name)
    block = blocks[0]
    found = _block_structure(block, args, kwargs)
    names0 = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
    for b, other in enumerate(blocks):
        names = sorted(n for n, m in other.named_modules() if isinstance(m, nn.Linear))
        if names != names0:
            differ = sorted(set(names) ^ set(names0))[:4]
            raise StructureError(
                f"block {b} holds other Linears than block 0 ({', '.join(differ)}); llmc "
                "needs every decoder block to have the same structure")
    tail = _find_tail(block, args, kwargs, found)
    pairs, offset, refused = _scale_pairs(block, args, kwargs, found)
    linears = [c.name for c in found["linears"]]
    return Structure(
        blocks=blocks_name, embeddings=embeddings, norm=norm, head=head,
        groups=tuple(tuple(g) for _, g in found["groups"]), tail=tail, scale_pairs=pairs,
        norm_offset=offset, refused=refused,
        no_clip=tuple(n for n in linears if _NO_CLIP.match(n.rsplit(".", 1)[-1])),
        experts=tuple(experts), routers=_routers(block, experts),
    )


def _routers(block: nn.Module, experts: dict[str, ExpertList]) -> tuple[str, ...]:
    """The Linears of an MoE layer outside its experts and shared experts: what gates them
    (Qwen2-MoE's ``shared_expert_gate``; a router that is an ``nn.Linear``)."""
    out = []
    for path in experts:
        layer = path.rpartition(".")[0]
        owner = block.get_submodule(layer) if layer else block
        out += [f"{layer}.{n}" if layer else n for n, m in owner.named_children()
                if isinstance(m, nn.Linear)]
    return tuple(out)


_CACHE: dict[str, Structure] = {}


def discover(config: Any) -> Structure:
    """The structure of the architecture of ``config`` (a transformers config, or a model),
    found on a small random copy; cached per config."""
    config = getattr(config, "config", config)
    d = config.to_dict()
    for k in ("dtype", "torch_dtype", "_name_or_path", "architectures", "transformers_version",
              "quantization_config"):
        d.pop(k, None)
    key = f"{type(config).__module__}.{type(config).__qualname__}:" + json.dumps(
        d, sort_keys=True, default=str)
    if key not in _CACHE:
        with torch.random.fork_rng(devices=[]):  # transformers' init draws from the global RNG
            try:
                model = _random_model(small_config(config))
            except Exception as e:  # noqa: BLE001 - any failure to build the copy is reported
                raise StructureError(
                    f"could not build a small copy of it to read its structure "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from None
            _CACHE[key] = discover_model(model)
    return _CACHE[key]
