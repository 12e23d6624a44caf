"""Nothing silently ignored: every bad pass field, recipe value and selection gets a clear error.

ConfigError names the owner, the field and the value; SelectionError names the selector (and the
nearest names). The hypothesis properties at the end check that fuzzed fields and recipes raise
nothing but SurgeryError subclasses; benchmarks/fuzz_config.py runs them with many more examples.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from passes import (AGP, DAM, ChannelPrune, CompressActivations, GumbelMask, Identity, MagnitudePrune, Shrink,
                    Sparsifier, WeightShare)
from passes.channel_prune import CRITERIA
from passes.codecs import METHODS
from passes.sparsifier import PENALTIES
from surgery.app.recipe import available_passes, load_recipe, parse_recipe
from surgery.errors import ConfigError, SelectionError, SurgeryError
from surgery.weights import INITS


def tiny_net() -> nn.Module:
    """conv-BN-ReLU-conv-ReLU-pool-linear: every pass has something to act on."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


NET = tiny_net()
X = torch.randn(2, 3, 8, 8)
SELECTING = [Identity, ChannelPrune, DAM, GumbelMask, Sparsifier, CompressActivations, MagnitudePrune, WeightShare]


# ---------------------------------------------------------------- selections that match nothing

@pytest.mark.parametrize("select, shown", [("nomatch*", r"select='nomatch\*'"), (nn.LSTM, "select=LSTM")])
def test_channel_prune_selecting_nothing_raises(select, shown):
    with pytest.raises(SelectionError, match=shown) as e:
        surgery.compress(NET, [ChannelPrune(select=select)], example_inputs=(X,))
    assert "matched no module" in str(e.value) and e.value.nearest  # and says what is there instead


@pytest.mark.parametrize("cls", SELECTING, ids=lambda c: c.__name__)
@pytest.mark.parametrize("select, shown", [("nomatch*", r"select='nomatch\*'"), (nn.LSTM, "select=LSTM")])
def test_every_pass_selecting_nothing_raises(cls, select, shown):
    with pytest.raises(SelectionError, match=shown):
        surgery.compress(NET, [cls(select=select)], example_inputs=(X,))


@pytest.mark.parametrize("make, culprit", [
    (lambda: ChannelPrune(select=nn.BatchNorm2d), "produce no channel group"),  # selects, prunes nothing
    (lambda: ChannelPrune(select=nn.Conv2d, exclude="[0-9]"), r"exclude='\[0-9\]'"),
    (lambda: GumbelMask(freeze_weights=True, trainable="head*"), r"trainable='head\*'"),
    (lambda: MagnitudePrune({"0.weight": 0.5, "9.weight": 0.5}), r"sparsity keys .*: 9\.weight"),
    (lambda: WeightShare(bits={"3.wieght": 4}), r"bits keys .*: 3\.wieght.*nearest names: 3\.weight"),
], ids=["non-producers", "all-excluded", "trainable", "sparsity-keys", "bits-keys"])
def test_partial_selections_that_match_nothing_raise(make, culprit):
    with pytest.raises(SelectionError, match=culprit):
        surgery.compress(NET, [make()], example_inputs=(X,))


# ---------------------------------------------------------------- pass fields

BAD_FIELDS = [
    (ChannelPrune, "ratio", "half", "expected a number in [0, 1)"),
    (ChannelPrune, "ratio", True, "expected a number in [0, 1)"),  # a bool is not a number
    (ChannelPrune, "round_to", 8.5, "expected an integer >= 1"),
    (ChannelPrune, "select", 5, "expected an nn.Module subclass"),
    (ChannelPrune, "criterion", "fisher",
     "expected one of 'l1', 'l2', 'bn_scale', 'lamp', 'random', 'activation', 'taylor', 'hessian'"),
    (ChannelPrune, "scope", "globl", "did you mean 'global'?"),
    (ChannelPrune, "seed", -1, "expected an integer in [0, "),
    (Identity, "select", [], "expected a non-empty selector"),
    (Identity, "exclude", nn.Conv2d(1, 1, 1), "give the class Conv2d"),
    (DAM, "lam", float("nan"), "expected a finite number >= 0"),
    (DAM, "cold_start", 1.0, "expected an integer >= 0"),
    (GumbelMask, "tau", 0, "expected a finite number > 0"),
    (GumbelMask, "freeze_weights", 1, "expected a bool"),
    (GumbelMask, "trainable", "7", "only means something with freeze_weights=True"),
    (Sparsifier, "penalty", "l3", "expected one of 'l0', 'l1', 'l2'"),
    (Sparsifier, "a_max", 0.5, "expected a number >= 1"),
    (Sparsifier, "b", 0.0, "expected a finite number > 0"),
    (CompressActivations, "method", "jpeg", "expected one of 'none'"),
    (CompressActivations, "keep", math.inf, "expected a number in (0, 1]"),
    (CompressActivations, "group_size", 3, "expected an even integer"),
    (CompressActivations, "wavelet", "bior2.2", "not orthogonal"),
    (MagnitudePrune, "sparsity", "most", "or a dict {tensor name or glob: sparsity}"),
    (MagnitudePrune, "schedule", {"end_step": 10}, 'expected an AGP or None (in a recipe: { type = "AGP", ... })'),
    (MagnitudePrune, "param", "weight.data", "expected a module tensor's name"),
    (WeightShare, "bits", 17, "expected an integer in [1, 16]"),
    (WeightShare, "init", "k-means", "expected one of 'linear', 'density', 'kmeans++'"),
    (AGP, "every", 0, "expected an integer >= 1"),
    (AGP, "end_step", 0, "start_step < end_step"),
    (Shrink, "tol", -1e-4, "expected a finite number >= 0"),
]


@pytest.mark.parametrize("cls, field, value, allowed", BAD_FIELDS,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in BAD_FIELDS])
def test_bad_field_is_named_when_the_pass_is_built(cls, field, value, allowed):
    with pytest.raises(ConfigError, match=f"^{cls.__name__}: {field} = {re.escape(repr(value)[:40])}.*: ") as e:
        cls(**{field: value})
    assert allowed in e.value.allowed and e.value.field == field and e.value.owner == cls.__name__
    assert isinstance(e.value, SurgeryError)  # callers that catch the root keep working


def test_dict_fields_name_the_entry():
    with pytest.raises(ConfigError,
                       match=r"MagnitudePrune: sparsity\['fc\.\*'\] = 1\.5: expected a number in \[0, 1\]"):
        MagnitudePrune({"0.weight": 0.5, "fc.*": 1.5})
    with pytest.raises(ConfigError, match=r"WeightShare: bits\['\*'\] = 4\.0: expected an integer in \[1, 16\]"):
        WeightShare(bits={"*": 4.0})


# ---------------------------------------------------------------- recipes

def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, field, value, allowed", [
    ("round_to = 8.5", "round_to", "8.5", "expected an integer >= 1"),
    ("select = 5", "select", "5", "expected an nn.Module subclass"),
    ('select = ["Conv2d", 3]', "select", r"\('Conv2d', 3\)", "got an int"),
    ('criterion = "L1"', "criterion", "'L1'", "expected one of"),
    ("ratio = nan", "ratio", "nan", r"expected a number in \[0, 1\)"),
])
def test_recipe_value_names_file_table_and_key(tmp_path, line, field, value, allowed):
    path = _recipe(tmp_path, f'[[passes]]\npass = "Identity"\n\n[[passes]]\npass = "ChannelPrune"\n{line}\n')
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: " + r"\[\[passes\]\] #2 \(ChannelPrune\): "
                                          f"{field} = {value}: .*{allowed}") as e:
        load_recipe(path)  # fails on loading, not when the pass runs
    assert e.value.field == field


def test_recipe_nested_config_names_the_key(tmp_path):
    path = _recipe(tmp_path, '[[passes]]\npass = "MagnitudePrune"\nschedule = { type = "AGP", end_step = -5 }\n')
    with pytest.raises(ConfigError, match=r"#1 \(MagnitudePrune\), key 'schedule' \(AGP\): end_step = -5: "):
        load_recipe(path)


def test_recipe_unknown_key_and_pass_still_raise():
    with pytest.raises(SurgeryError, match="unknown field 'rato'.*did you mean 'ratio'"):
        parse_recipe('[[passes]]\npass = "ChannelPrune"\nrato = 0.5\n')
    with pytest.raises(SurgeryError, match="unknown pass 'ChanelPrune'"):
        parse_recipe('[[passes]]\npass = "ChanelPrune"\n')


@pytest.mark.parametrize("line, shown", [
    ('select = "nomatch*"', r"select='nomatch\*'"),
    ('select = "LSTM"', "select='LSTM'"),
    ('select = "Conv2d"\nexclude = "Conv2d"', r"select='Conv2d' \(exclude='Conv2d'\)"),
    ('exclude = "layer9"', "exclude='layer9'"),
])
def test_recipe_selecting_nothing_fails_at_load_time_with_a_model(tmp_path, line, shown):
    path = _recipe(tmp_path, f'[[passes]]\npass = "DAM"\n\n[[passes]]\npass = "ChannelPrune"\n{line}\n')
    load_recipe(path)  # without the model nothing can be known
    with pytest.raises(SelectionError, match=re.escape(f"{path}: [[passes]] #2 (ChannelPrune): ") + shown
                       + " matched no module of Sequential"):
        load_recipe(path, model=NET)


def test_recipe_selection_check_leaves_graph_only_names_alone():
    # "dam_*" names the masks the first pass inserts: they exist only in the graph
    text = '[[passes]]\npass = "DAM"\n[[passes]]\npass = "CompressActivations"\nselect = "dam_*"\n'
    gm = surgery.compress(NET, parse_recipe(text, model=NET), example_inputs=(X,))
    assert "compressed_dam_3" in dict(gm.named_modules())
    with pytest.raises(SelectionError, match=r"#2 \(CompressActivations\): select='dma_\*'"):  # DAM adds no such
        parse_recipe(text.replace("dam_*", "dma_*"), model=NET)
    with pytest.raises(SelectionError, match=r"#1 \(CompressActivations\): select='dam_\*'"):  # no DAM before it
        parse_recipe(text.split("\n", 2)[2], model=NET)


def test_cli_compress_checks_the_recipe_before_any_pass_runs(tmp_path, monkeypatch, capsys):
    from surgery.app import cli
    path = _recipe(tmp_path, '[[passes]]\npass = "ChannelPrune"\nselect = "nomatch*"\n')
    monkeypatch.setattr(surgery, "compress", lambda *a, **k: pytest.fail("a pass ran"))
    with pytest.raises(SelectionError, match=re.escape(f"{path}: [[passes]] #1 (ChannelPrune): select='nomatch*'")):
        cli.compress_command(tiny_net(), str(path), "1,3,8,8", str(tmp_path / "out.pt"))
    code = cli.main(["compress", "torchvision.models:resnet18", "--recipe", str(path), "--input-shape",
                     "1,3,32,32", "-o", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "[[passes]] #1 (ChannelPrune): select='nomatch*' matched no module of ResNet" in err


# ---------------------------------------------------------------- properties (fuzzing)

# values of each field's own kind (so that many passes build and get applied) ...
ENUMS = {"criterion": CRITERIA, "scope": ("local", "global"), "penalty": PENALTIES, "method": METHODS,
         "init": INITS, "wavelet": ("haar", "db3", "sym4"), "param": ("weight", "bias"),
         "attention": ("heads", "head_dims"), "into": ("graph", "modules")}
SELECTORS = [None, nn.Conv2d, nn.Linear, nn.LSTM, "Conv2d", "BatchNorm2d", "0", "3", "7", "[03]", "*", "nomatch*",
             (nn.Conv2d, nn.Linear), ["Conv2d", "7"], re.compile(r"^[37]$"), lambda name, m: name == "3"]
TABLES = [{"0.weight": 0.5}, {"*": 4}, {"3.*": 2}, {"9.weight": 0.5}]
# ... and junk: wrong types, NaN/inf, negative and huge numbers, containers, a module instance
JUNK = st.one_of(
    st.text(max_size=6), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
    st.booleans(), st.none(), st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 20), st.floats(allow_nan=True)), max_size=2),
    st.builds(AGP, st.integers(0, 5), st.integers(6, 20), st.integers(1, 3)), st.just(nn.Conv2d(1, 1, 1)))
BUILDABLE = {**available_passes(), "AGP": AGP}


def own_kind(name: str, default: Any, toml: bool = False) -> st.SearchStrategy:
    """Values of the kind field `name` (default `default`) takes, in range or just outside it;
    with `toml`, only what a recipe can hold (no classes, regexes, callables or None)."""
    if name in ENUMS:
        return st.sampled_from([*ENUMS[name], ENUMS[name][0].upper()])
    if name in ("select", "exclude", "trainable"):
        return st.sampled_from([v for v in SELECTORS if not toml or isinstance(v, (str, list))])
    if name in ("sparsity", "bits"):
        return st.one_of(st.sampled_from(TABLES), st.integers(0, 17) if name == "bits" else st.floats(-0.1, 1.1))
    if name == "schedule":
        agp = st.fixed_dictionaries({"type": st.just("AGP"), "end_step": st.integers(-1, 20)}) if toml else \
            st.builds(AGP, st.integers(0, 5), st.integers(6, 20))
        return agp if toml else st.one_of(st.none(), agp)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.integers(0, 20), st.just(-1))
    if isinstance(default, float) or name in ("target_macs", "target_params"):
        return st.one_of(st.floats(0, 1), st.sampled_from([1e-4, 2.0, 300.0, math.inf, -0.1]))
    return TOML_JUNK if toml else JUNK  # callables, calibration batches: in a recipe, only junk


def _mostly(own: st.SearchStrategy, junk: st.SearchStrategy) -> st.SearchStrategy:
    """About two draws of the field's own kind to one of junk, so that many examples build and get
    applied (st.one_of would flatten junk's many branches and draw junk nearly always)."""
    return st.sampled_from([False, False, True]).flatmap(lambda bad: junk if bad else own)


def _outcome(fn) -> str:
    """'ok' or the SurgeryError subclass `fn` raised; any other exception propagates."""
    try:
        fn()
    except SurgeryError as e:
        return type(e).__name__
    return "ok"


def fuzz_pass_fields(data: st.DataObject) -> list[tuple[str, str]]:
    """Build a random pass with random values for some fields, then apply it; return the
    (stage, outcome) events. Only SurgeryError subclasses may come out of either stage."""
    cls = data.draw(st.sampled_from(sorted(BUILDABLE)), label="pass")
    fields = {f.name: f.default for f in dataclasses.fields(BUILDABLE[cls]) if f.init}
    chosen = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True), label="fields")
    kwargs = {f: data.draw(_mostly(own_kind(f, fields[f]), JUNK), label=f) for f in chosen}
    built: list[Any] = []
    events = [("build", _outcome(lambda: built.append(BUILDABLE[cls](**kwargs))))]
    if built:
        p = MagnitudePrune(0.5, schedule=built[0]) if cls == "AGP" else built[0]
        events.append(("apply", _outcome(lambda: surgery.compress(NET, [p], example_inputs=(X,)))))
    return events


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)  # a TOML basic string is a JSON string for printable text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"


_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6)
_SCALARS = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                     _TEXT)
TOML_JUNK = st.one_of(
    _SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(_TEXT, _SCALARS, max_size=2),
    st.fixed_dictionaries({"type": st.sampled_from(["AGP", "AGB", "Shrink"])},
                          optional={"start_step": _SCALARS, "end_step": _SCALARS, "every": _SCALARS}))


def fuzz_recipe(data: st.DataObject) -> list[tuple[str, str]]:
    """A random recipe (1-2 tables of a known pass, random keys and values, now and then a
    misspelt key) loaded with the model, then compressed: only SurgeryErrors may come out."""
    lines = []
    for _ in range(data.draw(st.integers(1, 2), label="tables")):
        name = data.draw(st.sampled_from(sorted(available_passes())), label="pass")
        fields = {f.name: f.default for f in dataclasses.fields(available_passes()[name]) if f.init}
        chosen = data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True), label="keys")
        values = {k: data.draw(_mostly(own_kind(k, fields[k], toml=True), TOML_JUNK), label=k) for k in chosen}
        if data.draw(st.sampled_from([False] * 9 + [True]), label="misspelt"):
            values["bogus_key"] = 1
        lines += ["[[passes]]", f"pass = {json.dumps(name)}", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    text = "\n".join(lines) + "\n"
    loaded: list[Any] = []
    events = [("load", _outcome(lambda: loaded.append(parse_recipe(text, "fuzz.toml", model=NET))))]
    if loaded:
        events.append(("apply", _outcome(lambda: surgery.compress(NET, loaded[0], example_inputs=(X,)))))
    return events


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@FUZZ
@given(st.data())
def test_fuzzed_pass_fields_raise_only_surgery_errors(data):
    fuzz_pass_fields(data)


@FUZZ
@given(st.data())
def test_fuzzed_recipes_raise_only_surgery_errors(data):
    fuzz_recipe(data)


NUMERIC = [(c, f.name, f.default) for c in BUILDABLE.values() for f in dataclasses.fields(c)
           if type(f.default) in (int, float)]


def fuzz_wrong_number_types(data: st.DataObject) -> list[tuple[str, str]]:
    """A value of a wrong type for a number field: ConfigError naming the field, always."""
    cls, field, default = data.draw(st.sampled_from(NUMERIC), label="field")
    bad = [st.booleans(), st.none(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
           st.dictionaries(st.text(max_size=2), st.booleans(), max_size=1), st.just(math.nan)]
    # a float is never an integer here, not even 8.0; an int past float range is no float
    bad.append(st.floats() if type(default) is int else st.just(10**400))
    value = data.draw(st.one_of(bad), label="value")
    try:
        cls(**{field: value})
    except ConfigError as e:
        # a dict entry is named as sparsity['0.weight']
        assert e.field.partition("[")[0] == field and f"{e.field} = " in str(e), str(e)
        assert e.value is value or isinstance(value, dict)
        return [("build", "ConfigError")]
    raise AssertionError(f"{cls.__name__}({field}={value!r}) was accepted")


@FUZZ
@given(st.data())
def test_wrong_types_for_number_fields_are_config_errors_naming_the_field(data):
    fuzz_wrong_number_types(data)
