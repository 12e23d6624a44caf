"""Shrink(into="modules"): the pruned model in the user's own classes and qualified names, its
size attributes updated, verified against the masked model; refused, with the module named,
where the user's forward cannot take the pruned sizes."""
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.errors import ConfigError, SurgeryError
from surgery.verify import max_rel_diff, run_eval

from helpers import n_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _masked_and_small(model, x, **prune):
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5, **prune)], x)
    small = surgery.compress(model, [ChannelPrune(ratio=0.5, **prune), Shrink(into="modules")], x)
    graph = surgery.compress(model, [ChannelPrune(ratio=0.5, **prune), Shrink()], x)
    return masked, small, graph


def test_a_torchvision_resnet_comes_back_as_a_resnet():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(1, 3, 64, 64),)
    masked, small, graph = _masked_and_small(model, x)
    assert type(small) is type(model) and type(small.layer1[0].conv1) is nn.Conv2d
    assert [n for n, _ in small.named_modules()] == [n for n, _ in model.named_modules()]
    assert small.layer1[0].conv1.out_channels == 32 and small.layer1[0].bn1.num_features == 32
    assert n_params(small) == n_params(graph) < n_params(model)
    fresh = torch.randn(2, 3, 64, 64)
    assert max_rel_diff(run_eval(masked, (fresh,)), run_eval(small, (fresh,))) < 1e-5
    assert small.report.params_after == n_params(small)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's is untouched
    assert not any(k.startswith("_tensor_constant") for k in vars(small))


def test_a_timm_convnext_comes_back_with_its_norms_resized():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    x = (torch.randn(1, 3, 64, 64),)
    masked, small, graph = _masked_and_small(model, x, normalised=False)
    assert type(small) is type(model)
    norm = small.stages[0].blocks[0].norm  # timm's LayerNorm (traced as ops): its size follows its weight
    assert type(norm) is type(model.stages[0].blocks[0].norm)
    assert small.stages[0].blocks[0].mlp.fc1.out_channels == model.stages[0].blocks[0].mlp.fc1.out_channels // 2
    assert tuple(norm.normalized_shape) == tuple(norm.weight.shape)
    fresh = torch.randn(2, 3, 64, 64)
    assert max_rel_diff(run_eval(masked, (fresh,)), run_eval(small, (fresh,))) < 1e-5
    assert n_params(small) == n_params(graph) < n_params(model)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hugging_face_models_come_back_in_their_classes(name):
    pytest.importorskip("transformers")
    from _hf_models import build_hf, example_inputs, output_tensors
    model, x = build_hf(name)
    masked, small, graph = _masked_and_small(model, x, normalised=False)
    assert type(small) is type(model) and n_params(small) == n_params(graph) < n_params(model)
    fresh = example_inputs(name, seed=3, batch=2, length=9)
    want, got = output_tensors(run_eval(masked, fresh)), output_tensors(run_eval(small, fresh))
    assert len(want) == len(got) and max(max_rel_diff(a, b) for a, b in zip(want, got)) < 1e-5
    if name == "llama":  # heads pruned (q 4 -> 2 heads, kv 2 -> 1), head size kept
        attn = small.model.layers[0].self_attn
        assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16 and attn.head_dim == 16


@pytest.mark.parametrize("name, path, counts", [
    ("bert", "bert.encoder.layer.0.attention.self", {"num_attention_heads": 2, "all_head_size": 16}),
    ("t5", "encoder.block.0.layer.0.SelfAttention", {"n_heads": 2, "inner_dim": 16}),
    ("vit", "vit.layers.0.attention", {"num_attention_heads": 2}),
    ("gpt2", "transformer.h.0.attn", {"num_heads": 2, "split_size": 16})])
def test_head_counts_follow_the_pruned_heads_where_no_forward_reads_them(name, path, counts):
    """BERT's views say -1 heads, so no literal names its head count: it is read back from the
    projections (4 heads of 8 -> 2). GPT-2 splits its fused qkv by self.split_size, which Shrink
    rewrote to a list of sizes: the size is read back from that list."""
    pytest.importorskip("transformers")
    from _hf_models import build_hf, example_inputs, output_tensors
    model, x = build_hf(name)
    masked, small, graph = _masked_and_small(model, x, normalised=False)
    attn, was = small.get_submodule(path), model.get_submodule(path)
    assert {k: getattr(attn, k) for k in counts} == counts and {k: getattr(was, k) for k in counts} != counts
    assert n_params(small) == n_params(graph) < n_params(model)
    fresh = example_inputs(name, seed=3, batch=2, length=9)
    want, got = output_tensors(run_eval(masked, fresh)), output_tensors(run_eval(small, fresh))
    assert len(want) == len(got) and max(max_rel_diff(a, b) for a, b in zip(want, got)) < 1e-5


class _ReadsItsHeadCount(nn.Module):
    """A forward that derives its head size from its head count at run time: pruning heads keeps the
    head size, so the count it reads must stay 4."""

    def __init__(self):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = 16, 4, 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        size = self.dim // self.num_heads
        q, k, v = (p(x).reshape(b, t, -1, size).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_a_head_count_the_forward_reads_stays_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), _ReadsItsHeadCount(), nn.Linear(16, 3)).eval()
    x = (torch.randn(2, 5, 8),)
    masked, small, graph = _masked_and_small(net, x)
    assert small[1].q.out_features == 8 and small[1].num_heads == 4  # 2 heads left; the count stays
    assert max_rel_diff(run_eval(masked, x), run_eval(small, x)) < 1e-5


def test_a_decoder_with_its_rmsnorm_stream_pruned_comes_back_exact_and_round_trips(tmp_path):
    # the stream goes too: each RMSNorm over it takes eps * N/K and a weight scaled by sqrt(N/K),
    # and the config states the new widths and eps
    pytest.importorskip("transformers")
    from _hf_models import build_hf, example_inputs, output_tensors
    model, x = build_hf("llama")
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], x)
    small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    assert type(small) is type(model) and n_params(small) / n_params(model) < 0.35
    cfg = small.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 48, 2, 1)
    assert cfg.rms_norm_eps == 2 * model.config.rms_norm_eps and small.model.norm.weight.shape == (32,)
    fresh = example_inputs("llama", seed=3)
    want, got = output_tensors(run_eval(masked, fresh)), output_tensors(run_eval(small, fresh))
    assert max(max_rel_diff(a, b) for a, b in zip(want, got)) < 1e-5
    small.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    assert max(max_rel_diff(a, b) for a, b in zip(got, output_tensors(run_eval(back, fresh)))) < 1e-6


def test_gemma_comes_back_exact_and_reloads_through_the_plan_its_config_carries(tmp_path):
    # Gemma's (1 + w) RMSNorm form is found by trying; its embedding scale is a buffer computed
    # from config.hidden_size, so a config stating the pruned width would rebuild another model
    pytest.importorskip("transformers")
    from _hf_models import build_hf, example_inputs, output_tensors
    model, x = build_hf("gemma")
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], x)
    with pytest.warns(UserWarning, match="GemmaForCausalLM.config keeps its sizes.*reads a size from the config"):
        small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    assert small.model.norm.weight.shape == (32,) and small.config.hidden_size == 64
    fresh = example_inputs("gemma", seed=3)
    want, got = output_tensors(run_eval(masked, fresh)), output_tensors(run_eval(small, fresh))
    assert max(max_rel_diff(a, b) for a, b in zip(want, got)) < 1e-5
    small.save_pretrained(tmp_path)  # tied input and output embeddings: saved once
    back = surgery.load_pruned(type(model), tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(got, output_tensors(run_eval(back, fresh))))


def test_a_layernorm_stream_is_refused_naming_the_norm():
    pytest.importorskip("transformers")
    from _hf_models import build_hf
    model, x = build_hf("bert")
    with pytest.raises(SurgeryError, match=r"LayerNorm 'bert.embeddings.LayerNorm' normalises pruned channels.*"
                                           r"ChannelPrune\(normalised=False\)"):
        surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)


def test_a_uniformly_pruned_decoder_round_trips_through_save_and_from_pretrained(tmp_path):
    pytest.importorskip("transformers")
    from _hf_models import build_hf, output_tensors
    model, x = build_hf("qwen2")  # no head_dim in its config: derived from hidden_size unless written
    small = surgery.compress(model, [ChannelPrune(ratio=0.5, normalised=False), Shrink(into="modules")], x)
    cfg = small.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (48, 2, 1, 16)
    assert model.config.num_attention_heads == 4  # the caller's config is untouched
    small.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    a, b = output_tensors(run_eval(small, x)), output_tensors(run_eval(back, x))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_a_config_that_cannot_state_the_widths_carries_the_plan_for_load_pruned(tmp_path):
    pytest.importorskip("transformers")
    from _hf_models import build_hf
    model, x = build_hf("bert")  # its head size is hidden_size // heads, and the pooler has no config field
    with pytest.warns(UserWarning, match="BertForSequenceClassification.config keeps its sizes") as caught:
        small = surgery.compress(model, [ChannelPrune(ratio=0.5, normalised=False), Shrink(into="modules")], x)
    assert caught[0].filename == __file__  # the warning points at the caller's line, not into surgery
    assert small.config.num_attention_heads == 4 and small.bert.pooler.dense.out_features == 16
    # the config carries the plan instead: save_pretrained writes it, load_pruned reads it back
    assert small.config.surgery_plan == small.report.plan
    small.save_pretrained(tmp_path)
    back = surgery.load_pruned(type(model), tmp_path)
    assert type(back) is type(model) and not back.training
    assert torch.equal(run_eval(back, x).logits, run_eval(small, x).logits)
    with pytest.raises(SurgeryError, match="no plan.json, and the config carries no surgery_plan"):
        surgery.load_pruned(nn.Linear(2, 2), tmp_path / "nowhere")


def test_a_pruned_decoder_generates_with_its_kv_cache_the_masked_models_tokens():
    # greedy generate() with the KV cache against the masked model decoding greedily: a masked
    # graph is traced at one length, so each step captures and masks the model at the next one
    # (ChannelPrune's l1 scores read the weights only: the same masks every time)
    pytest.importorskip("transformers")
    from _hf_models import build_hf
    model, x = build_hf("llama")
    small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    prompt = x["input_ids"][:1, :5]
    with torch.no_grad():
        out = small.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True,
                             pad_token_id=0)
        ids = prompt
        for _ in range(20):
            step = {"input_ids": ids, "use_cache": False}
            masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], step)
            ids = torch.cat([ids, masked(**step).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape[1] == 25 and torch.equal(out, ids)


class _HardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))  # 4 heads written in
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = _HardCoded()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(torch.relu(self.inp(x))))


def test_a_forward_with_sizes_written_in_is_refused_naming_the_module_and_line():
    torch.manual_seed(0)
    net = _Net().eval()
    x = (torch.randn(2, 5, 8),)
    graph = surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink()], x)  # the graph form rewrites the view
    assert n_params(graph) < n_params(net)
    with pytest.raises(SurgeryError, match=r"_HardCoded 'attn' fails on the pruned sizes: .* at "
                                           r"test_into_modules.py:\d+ \(q, k, v = .*use Shrink\(\)"):
        surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)


def test_a_layernorm_over_pruned_channels_is_refused_and_normalised_false_keeps_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = (torch.randn(4, 8),)
    with pytest.raises(SurgeryError, match=r"LayerNorm '1' normalises pruned channels.*normalised=False"):
        surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    masked = surgery.compress(net, [ChannelPrune(ratio=0.5, normalised=False)], x)
    small = surgery.compress(net, [ChannelPrune(ratio=0.5, normalised=False), Shrink(into="modules")], x)
    assert small[1].normalized_shape == (16,) and small[2].out_features == 8 and small[2].in_features == 16
    assert max_rel_diff(run_eval(masked, x), run_eval(small, x)) < 1e-5


def test_into_is_checked_and_must_be_the_last_pass():
    with pytest.raises(ConfigError, match="into"):
        Shrink(into="module")
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = (torch.randn(4, 8),)
    with pytest.raises(SurgeryError, match="must be the last"):
        surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink(into="modules"), Shrink()], x)
    masked = surgery.compress(net, [ChannelPrune(ratio=0.5)], x)
    assert type(surgery.compress(masked, [Shrink(into="modules")], x)) is nn.Sequential  # a later compress: fine
    buf = io.BytesIO()
    torch.save(masked, buf)  # the pickle keeps the graph alone: it loads without the model's classes
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with pytest.raises(SurgeryError, match="needs the model's own module tree.*loaded from a file"):
        surgery.compress(loaded, [Shrink(into="modules")], x)
    masked.meta["surgery"].pop("source")  # a GraphModule built some other way
    with pytest.raises(SurgeryError, match="needs the model's own module tree.*loaded from a file"):
        surgery.compress(masked, [Shrink(into="modules")], x)


# ------------------------------------------------------------------ the plan, saved and replayed

def _builders():
    """(name, build) pairs: each build makes the same fresh model (same seed, same weights)."""
    tvm = pytest.importorskip("torchvision.models")
    timm = pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from _hf_models import build_hf

    def seeded(make):
        def build():
            torch.manual_seed(0)
            return make().eval()
        return build
    return {
        "resnet18": (seeded(lambda: tvm.resnet18(weights=None)), (torch.randn(1, 3, 64, 64),), {}),
        "convnext": (seeded(lambda: timm.create_model("convnext_atto", pretrained=False)),
                     (torch.randn(1, 3, 64, 64),), {"normalised": False}),
        "bert": (lambda: build_hf("bert")[0], build_hf("bert")[1], {"normalised": False}),
        "llama": (lambda: build_hf("llama")[0], build_hf("llama")[1], {}),
    }


@pytest.mark.parametrize("name", ["resnet18", "convnext", "bert", "llama"])
def test_a_plan_replays_on_a_fresh_model_and_takes_the_pruned_weights(name, tmp_path):
    from _hf_models import output_tensors
    build, x, prune = _builders()[name]
    small = surgery.compress(build(), [ChannelPrune(ratio=0.5, **prune), Shrink(into="modules")], x)
    path = surgery.save_plan(small, tmp_path / "plan.json")
    plan = json.loads(path.read_text())
    assert plan["format"] == "surgery-plan/1" and plan["tensors"]
    fresh = surgery.apply_plan(build(), path)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    fresh.load_state_dict(small.state_dict())
    a, b = output_tensors(run_eval(small, x)), output_tensors(run_eval(fresh, x))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # save_pruned / load_pruned: the plan and safetensors weights, no pickle
    surgery.save_pruned(small, tmp_path / "pruned")
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["model.safetensors", "plan.json"]
    again = surgery.load_pruned(build, tmp_path / "pruned")
    assert type(again) is type(small)
    assert all(torch.equal(u, v) for u, v in zip(a, output_tensors(run_eval(again, x))))


def test_a_plan_keeps_the_surviving_indices_of_the_original_weights():
    # replayed on the original weights, the plan gives the pruned model before any fine-tuning:
    # with 0/1 masks nothing is rescaled, so every tensor equals the shrunk model's
    build, x, _ = _builders()["resnet18"]
    small = surgery.compress(build(), [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    replayed = surgery.apply_plan(build(), small.report.plan)
    assert all(torch.equal(v, replayed.state_dict()[k]) for k, v in small.state_dict().items())
    conv = small.report.plan["tensors"]["layer1.0.conv1.weight"]
    assert conv["shape"] == [32, 32, 3, 3] and set(conv["keep"]) == {"0", "1"}


def test_a_plan_for_another_model_is_refused(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = (torch.randn(4, 8),)
    small = surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    plan = small.report.plan
    assert plan["tensors"]["0.weight"] == {"shape": [8, 8], "keep": {"0": plan["tensors"]["0.weight"]["keep"]["0"]}}
    assert plan["attributes"] == {"0": {"out_features": 8}, "2": {"in_features": 8}}
    with pytest.raises(SurgeryError, match="the plan is for torch.nn.modules.container.Sequential, not .*Linear"):
        surgery.apply_plan(nn.Linear(8, 3), plan)
    with pytest.raises(SurgeryError, match="has no parameter or buffer '0.weight'"):
        surgery.apply_plan(nn.Sequential(nn.ReLU()), plan)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SurgeryError, match="bad.json: not a surgery plan"):
        surgery.apply_plan(net, tmp_path / "bad.json")
    graph = surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink()], x)
    with pytest.raises(SurgeryError, match="carries no pruning plan.*Shrink\\(into='modules'\\)"):
        surgery.save_plan(graph, tmp_path / "p.json")


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.inp(x))
        return self.out(h + h * h)


def test_a_soft_mask_that_cannot_fold_is_refused_in_the_modules_form():
    # DAM's soft factors after a GELU read by `h + h * h`: no layer to fold them into, so the
    # graph form keeps them as a per-channel scale, which the model's own classes have no place for
    from passes import DAM
    torch.manual_seed(0)
    net, x = _Mixed().eval(), (torch.randn(4, 8),)
    masked = surgery.compress(net, [DAM(select="inp")], x)
    graph = surgery.compress(masked, [Shrink()], x)
    assert graph.report.masks_scaled
    with pytest.raises(SurgeryError, match=r"reads a tensor 'dam_inp_scale'.*per-channel scale.*use Shrink\(\)"):
        surgery.compress(masked, [Shrink(into="modules")], x)


class _Stores(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.width = 0

    def forward(self, x):
        self.width = x.shape[-1]  # what HF Swin does with its window and shift sizes
        return self.out(torch.relu(self.inp(x)))


def test_what_a_traced_forward_stores_on_its_module_is_undone():
    net, x = _Stores().eval(), (torch.randn(4, 8),)
    gm = surgery.capture(net, x)
    assert gm.meta["surgery"]["source"].module.width == 0 and net.width == 0  # not a Proxy
    small = surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink(into="modules")], x)
    assert type(small) is _Stores and small.width == 8 and small.inp.out_features == 8
