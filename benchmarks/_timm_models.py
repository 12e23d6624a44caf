"""timm architecture families for the shrink sweep: one small representative per family, built
with random weights (``pretrained=False``, nothing downloaded).

A family is a timm model module (``timm.list_modules()``) split by the stem of its model names,
so that a module holding several architectures (``efficientnet``: EfficientNet, MixNet, MNASNet,
MobileNet-V1/V2, TinyNet...; ``byobnet``: RepVGG, GERNet, MobileOne...) counts each of them once.
The stem is a name's first ``_``-separated token with its trailing size digits and letters
dropped (``resnet50d`` -> ``resnet``, ``res2net50`` -> ``res2net``, ``deit3`` -> ``deit``), a
version kept (``convnextv2``, ``mobilenetv3``) and the ``tf_``/``legacy_`` prefixes of ported
weights ignored (``tf_efficientnet_b0`` is an EfficientNet). A family is named by its module, or
``module/stem`` where the stem differs from the module (``efficientnet/mixnet``). timm's own
``test_*`` models (toy configurations for its unit tests) are no family.

The representative of a family is its first model in :func:`size_key` order (the rule is on
names and pretrained configs only: nothing is built to choose):

1. the first size word after the stem, smallest first: atto < femto < pico < nano/xxs < tiny/
   xs/ti/mini/t < small/s/lite/slim < (no size word) < base/medium/m < large/l/xl < huge/giant/
   h/g/xxl < a count of billions of parameters (``7b``); a count of millions (``5m``,
   ``so150m``) ranks as small under 50, base under 200, large above; a letter with a number
   right after the stem counts by its letter (``mobileone_s0``, ``gmlp_ti16``,
   ``efficientformer_l1``);
2. a default input size (pretrained_cfg) of at most 224 px before a larger one;
3. the smallest first number after the stem (``resnet10t`` before ``resnet18``, ``regnetx_002``
   before ``regnetx_004``, ``efficientnet_b0`` before ``efficientnet_b1``);
4. the shorter name, then the name.

Where it does not build on CPU, the next one in that order is tried (:func:`build_timm`); a
family none of whose models builds is skipped.

    >>> families()["resnet"][0]
    'resnet10t'

    python benchmarks/_timm_models.py       # prints every family, its representative, the count
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

_SIZE_WORDS: dict[str, int] = {
    "atto": 0, "femto": 1, "pico": 2, "nano": 3, "xxs": 3, "xxsmall": 3,
    "tiny": 4, "xtiny": 4, "ti": 4, "xs": 4, "xsmall": 4, "mini": 4, "t": 4,
    "small": 5, "s": 5, "lite": 5, "light": 5, "slim": 5,
    # 6: no size word
    "base": 7, "medium": 7, "m": 7, "plus": 7,
    "large": 8, "l": 8, "xl": 8, "xlarge": 8, "big": 8,
    "huge": 9, "h": 9, "xxl": 9, "giant": 9, "g": 9, "gigantic": 9, "enormous": 9,
}
_NO_WORD = 6
_BILLIONS = re.compile(r"^\d+b$")  # vit_7b_..., aimv2_1b_...: billions of parameters
_MILLIONS = re.compile(r"^(?:so)?(\d+)m\d*$")  # tiny_vit_5m, qwen3_vit_88m, so150m2: millions of them
_LETTER_NUMBER = re.compile(r"^([a-z]+)(\d+)$")  # s0, ti16, l1: a size word and a number, first after the stem
_LETTER_NUMBER_WORDS = {"s", "xs", "xxs", "t", "ti", "l", "xl", "h", "g", "lite"}
MAX_SIZE = 224  # default input side above which a smaller size is tried


class NoModelBuilds(RuntimeError):
    """No model of a family builds on CPU: the sweep records the family as skipped."""


def family_of(module: str, name: str) -> str | None:
    """The family of timm model `name` from module `module` (see the module docstring), or None
    for timm's own test models."""
    if name.startswith("test_"):
        return None
    stem = _stem(re.sub(r"^(tf|legacy)_", "", name).split("_")[0])
    return module if stem == module else f"{module}/{stem}"


def _stem(first: str) -> str:
    """The architecture part of a name's first token: its letters, a digit that joins two words
    (``res2net``, ``cs3darknet``), a version (``convnextv2``); not its size (``resnet50d``,
    ``dla102x2``) nor a generation number (``deit3``, ``eva02``)."""
    m = re.match(r"[a-z]+(?:\d(?!large|small|tiny|base|huge)[a-z]+)*", first)
    if m is None:
        return first
    stem = m.group()
    if stem.endswith("v"):
        stem += re.match(r"\d*", first[len(stem):]).group()
    return stem


def _default_side(name: str) -> int:
    """The larger side of `name`'s default input (its pretrained config), 0 when unknown."""
    import timm
    try:
        cfg = timm.get_pretrained_cfg(name)
        return max(cfg.input_size[1:]) if cfg is not None and cfg.input_size else 0
    except Exception:  # a config that does not resolve ranks as unknown, never breaks the listing
        return 0


def size_key(name: str) -> tuple:
    """Sort key putting the smallest-looking model of a family first (see the module docstring)."""
    base = re.sub(r"^(tf|legacy)_", "", name)
    first, _, rest = base.partition("_")
    suffix = first[len(_stem(first)):] + "_" + rest
    suffix = suffix.replace("_xx_small", "_xxsmall").replace("_x_small", "_xsmall")
    rank = _NO_WORD
    for i, token in enumerate(t for t in suffix.split("_") if t):
        if token in _SIZE_WORDS:
            rank = _SIZE_WORDS[token]
            break
        if _BILLIONS.match(token):
            rank = 10
            break
        m = _MILLIONS.match(token)
        if m:
            rank = 5 if int(m.group(1)) < 50 else 7 if int(m.group(1)) < 200 else 8
            break
        m = _LETTER_NUMBER.match(token)
        if i == 0 and m and m.group(1) in _LETTER_NUMBER_WORDS:
            rank = _SIZE_WORDS[m.group(1)]
            break
    number = re.search(r"\d+", suffix)
    return (rank, _default_side(name) > MAX_SIZE, int(number.group()) if number else math.inf, len(name), name)


def families() -> dict[str, list[str]]:
    """Every family -> its models, best representative first (:func:`size_key`), in the order of
    ``timm.list_modules()`` and of the first model of each family there."""
    import timm
    out: dict[str, list[str]] = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            fam = family_of(module, name)
            if fam is not None:
                out.setdefault(fam, []).append(name)
    return {fam: sorted(names, key=size_key) for fam, names in out.items()}


def build_timm(family: str, candidates: list[str] | None = None,
               ) -> tuple[torch.nn.Module, str, list[dict[str, str]]]:
    """Build `family`'s representative: the first of its models (in :func:`families` order, or
    `candidates`) that ``timm.create_model(name, pretrained=False)`` builds on CPU, with a
    1000-class head where its default has none (``num_classes=0``). Returns (the
    model in eval mode, its name, the models that failed to build before it with their errors).
    Raises NoModelBuilds naming the first errors when none builds."""
    import timm
    failed: list[dict[str, str]] = []
    for name in candidates if candidates is not None else families()[family]:
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            if getattr(model, "num_classes", None) == 0:  # an encoder (EVA-02, AIMv2, a VLM's ViT): its
                torch.manual_seed(0)  # stream is its output; with the head one fine-tunes, it is not
                model = timm.create_model(name, pretrained=False, num_classes=1000)
            return model.eval(), name, failed
        except Exception as e:  # the reason is data: the next candidate is tried
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            failed.append({"model": name, "error": f"{type(e).__name__}: {first}"})
    reasons = "; ".join(f"{f['model']}: {f['error']}" for f in failed[:3])
    raise NoModelBuilds(f"no model of {family} builds on CPU ({len(failed)} tried: {reasons})")


def input_size(model: torch.nn.Module, cap: int = MAX_SIZE) -> tuple[int, int, int]:
    """(C, H, W) for `model`: its ``pretrained_cfg["input_size"]``; where a side exceeds `cap`,
    (C, cap, cap) if the model runs on that (and its config does not say its size is fixed)."""
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    c, h, w = cfg.get("input_size") or (3, 224, 224)
    if max(h, w) <= cap or cfg.get("fixed_input_size"):
        return c, h, w
    try:
        with torch.no_grad():
            model(torch.randn(1, c, cap, cap))
        return c, cap, cap
    except Exception:  # this model needs its own size
        return c, h, w


def classifier(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The final classifier layer(s) named by the model's ``pretrained_cfg["classifier"]``
    (a tuple for distilled models' two heads), those that exist and hold parameters."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    out = []
    for n in (names,) if isinstance(names, str) else names:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            continue
        if any(True for _ in m.parameters()):
            out.append(m)
    return out


def main() -> None:
    """Print every family, its representative and how many models it holds."""
    fams = families()
    for fam, names in fams.items():
        print(f"{fam:42s} {names[0]:40s} ({len(names)} models)")
    print(f"{len(fams)} families, {sum(len(v) for v in fams.values())} models")


if __name__ == "__main__":
    main()
